"""docs/plugins.md works as written: its Python snippets run, its TOML parses, its `dd2` commands parse.

The guide's fenced blocks are read in document order:

- ```python blocks run in one namespace per `##` section, in order; `test_*` functions a block defines are
  then called (fixtures: `monkeypatch`, `tmp_path`). A first line `# file: PATH` marks the content of PATH in
  the example package: it runs as that module (its `__file__`, relative imports) in a namespace of its own,
  and when it defines the hook it is registered and every variant it registers is loaded. A first line
  `# not run: REASON` marks a block that is shown only.
- ```toml blocks parse, and their entry points are the example package's.
- ```bash lines that start with `dd2` parse against the real command line; the cheap ones are run.

The snippets run as a reader runs them: with `dd2-raster-digits` installed and every entry point loading
(`DD2_LOAD_PLUGINS` unset), not with the empty registry the rest of the suite uses.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import shlex
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dd2cli import plugins
from dd2cli.cli import app

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "examples" / "dd2-raster-digits"
FILE_MARK = re.compile(r"#\s*file:\s*(\S+)\s*$")
SKIP_MARK = re.compile(r"#\s*not run:\s*\S")
#: `dd2` subcommands cheap enough to run for real (the others are only parsed)
RUN = {("plugins",), ("teachers",)}


@dataclass(frozen=True)
class Block:
    section: str
    lang: str
    line: int  # 1-based line of the first line of code
    code: str

    @property
    def where(self) -> str:
        return f"{DOC.relative_to(ROOT)}:{self.line}"


def read_blocks(text: str) -> list[Block]:
    """Every fenced block of `text` with its language, first code line and `##` section."""
    blocks: list[Block] = []
    section, fence, lang, start, body = "", None, "", 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            m = re.match(r"^(```+)\s*([\w+-]*)", line)
            if m:
                fence, lang, start, body = m.group(1), m.group(2).lower(), number + 1, []
            elif line.startswith("## "):
                section = line[3:].strip()
        elif line.strip() == fence:
            blocks.append(Block(section, lang, start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{DOC.name}: a fenced block opened at line {start - 1} is never closed"
    return blocks


BLOCKS = read_blocks(DOC.read_text(encoding="utf-8"))
PY_SECTIONS = [
    # a section that runs the contract suite takes seconds, not milliseconds
    pytest.param(s, marks=pytest.mark.slow) if any("check_teacher(" in b.code for b in BLOCKS if b.section == s) else s
    for s in dict.fromkeys(b.section for b in BLOCKS if b.lang == "python")
]


def _compile(block: Block):
    # pad so that tracebacks name the guide's own line numbers
    return compile("\n" * (block.line - 1) + block.code, str(DOC), "exec")


def _first_line(block: Block) -> str:
    return block.code.lstrip("\n").splitlines()[0] if block.code.strip() else ""


@pytest.fixture
def as_installed(monkeypatch):
    """What a reader has: the example plugin installed, and entry points loading."""
    pytest.importorskip("dd2_raster_digits", reason="pip install -e examples/dd2-raster-digits (docs/plugins.md uses it)")
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)}
    assert eps.get("raster") == "dd2_raster_digits", "dd2_raster_digits imports but its entry point is not installed"
    monkeypatch.delenv(plugins.LOAD_ENV, raising=False)
    plugins.reset()
    yield
    plugins.reset()


def _call_tests(namespace: dict, block: Block, before: set[str], tmp_path: Path) -> list[str]:
    """Call the `test_*` functions `block` defined, each with a fresh monkeypatch."""
    called = []
    for name in [n for n in namespace if n not in before and n.startswith("test_")]:
        fn = namespace[name]
        if not callable(fn):
            continue
        with pytest.MonkeyPatch.context() as mp:
            fixtures = {"monkeypatch": mp, "tmp_path": tmp_path}
            params = list(inspect.signature(fn).parameters)
            unknown = [p for p in params if p not in fixtures]
            assert not unknown, f"{block.where}: {name} asks for fixture(s) {unknown} this test does not provide"
            fn(**{p: fixtures[p] for p in params})
        called.append(name)
    return called


def _run_file_block(block: Block, path: str) -> None:
    """Run a `# file: PATH` block as that module of the example package; register it if it is a plugin."""
    file = EXAMPLE / path
    assert file.is_file(), f"{block.where}: '# file: {path}' is not a file of {EXAMPLE.relative_to(ROOT)}"
    package = ".".join(file.relative_to(EXAMPLE / "src").parent.parts)
    module = types.ModuleType(package if file.name == "__init__.py" else f"{package}.{file.stem}")
    module.__file__, module.__package__ = str(file), package
    exec(_compile(block), module.__dict__)
    if not hasattr(module, "dd2_register_teachers"):
        return
    real = importlib.import_module(module.__name__)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(plugins.LOAD_ENV, "")  # the shown module alone (the installed copy holds the same names)
        plugins.reset()
        try:
            plugins.register_plugin(module, name="doc")
            families = plugins.registry().families
            assert families, f"{block.where}: the hook registers no family"
            for family in families.values():
                for variant in family.variants:
                    teacher = variant.load(device="cpu")
                    assert teacher.spec.image_size == variant.image_size, (
                        f"{block.where}: {variant.name}: Variant.image_size {variant.image_size} != "
                        f"spec.image_size {teacher.spec.image_size}")
                    # the guide shows the package's real variant, shortened: the facts a user sees must agree
                    shown = [v for v in vars(real).values() if getattr(v, "name", None) == variant.name
                             and hasattr(v, "loader")]
                    assert shown, f"{block.where}: {path} defines no variant '{variant.name}'"
                    for key in ("image_size", "features"):
                        assert getattr(variant, key) == getattr(shown[0], key), f"{block.where}: {variant.name}.{key}"
                    assert [(w.key, w.filename, w.bundled) for w in variant.weights] == [
                        (w.key, w.filename, w.bundled) for w in shown[0].weights], f"{block.where}: {variant.name}.weights"
        finally:
            plugins.reset()


@pytest.mark.parametrize("section", PY_SECTIONS)
def test_python_snippets_run(section, as_installed, tmp_path):
    namespace: dict = {"__name__": "__plugins_doc__"}
    for block in (b for b in BLOCKS if b.lang == "python" and b.section == section):
        first = _first_line(block)
        if SKIP_MARK.match(first):
            continue
        mark = FILE_MARK.match(first)
        if mark:
            _run_file_block(block, mark.group(1))
            continue
        before = set(namespace)
        exec(_compile(block), namespace)
        _call_tests(namespace, block, before, tmp_path)


def test_snippets_are_found_and_rarely_skipped():
    python = [b for b in BLOCKS if b.lang == "python"]
    assert len(python) >= 4 and {"toml", "bash"} <= {b.lang for b in BLOCKS}
    skipped = [b.where for b in python if SKIP_MARK.match(_first_line(b))]
    assert len(skipped) <= 1, f"more than one Python block is marked '# not run': {skipped}"


def test_toml_snippets_parse_and_match_the_example():
    real = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))
    blocks = [b for b in BLOCKS if b.lang == "toml"]
    assert blocks
    for block in blocks:
        shown = tomllib.loads(block.code)
        if "entry-points" in shown.get("project", {}):
            assert shown["project"]["entry-points"] == real["project"]["entry-points"], block.where
            assert shown["project"]["name"] == real["project"]["name"], block.where


def _dd2_commands() -> list[tuple[Block, list[str]]]:
    out = []
    for block in (b for b in BLOCKS if b.lang == "bash"):
        for line in block.code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "dd2":
                out.append((block, words[1:]))
    return out


def test_dd2_commands_parse_and_cheap_ones_run(as_installed):
    commands = _dd2_commands()
    assert commands, "the guide shows no dd2 command"
    runner = CliRunner()
    for block, args in commands:
        shown = f"{block.where}: `dd2 {shlex.join(args)}`"
        # with --help appended the command line is parsed (subcommand, option names, arguments) but not run
        res = runner.invoke(app, [*args, "--help"])
        assert res.exit_code == 0, f"{shown} does not parse:\n{res.output}"
        if tuple(args[:1]) in RUN:
            res = runner.invoke(app, args)
            assert res.exit_code == 0, f"{shown} failed:\n{res.output}"
            assert "raster" in res.output, f"{shown} does not show the raster plugin:\n{res.output}"
