"""The house rules of docs/architecture.md, checked on the source: no import cycles, families import only
`dd2cli` and themselves, the engine never imports a family, modules stay small."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package name -> folder, for every package whose modules are checked
PACKAGES = {"dd2cli": ROOT / "dd2cli", "dd2_var": ROOT / "plugins" / "dd2_var",
            "dd2_llamagen": ROOT / "plugins" / "dd2_llamagen",
            "dd2_raster_digits": ROOT / "examples" / "dd2-raster-digits" / "src" / "dd2_raster_digits"}
FAMILIES = ("dd2_var", "dd2_llamagen", "dd2_raster_digits")
MAX_LINES = 600
LONG_ALLOWED = {"dd2cli.engine.distill"}  # the training loops: one concept, read top to bottom


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, tests excluded."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if "tests" in rel.parts:
                continue
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of `MODULES` that `name` imports, at any depth of the file (function-level included)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import a.b.c` of a non-module name: its nearest module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_imports_only_dd2cli_top_level_and_itself(family):
    wrong = {f"{name} -> {target}" for name, targets in GRAPH.items() if name.split(".")[0] == family
             for target in targets if target != "dd2cli" and target.split(".")[0] != family}
    assert not wrong


def test_dd2cli_never_imports_a_family():
    wrong = {f"{name} -> {target}" for name, targets in GRAPH.items() if name.split(".")[0] == "dd2cli"
             for target in targets if target.split(".")[0] in FAMILIES}
    assert not wrong


def test_modules_stay_small():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_ALLOWED}
    assert not long


def test_the_engine_holds_one_concept_per_module():
    engine = {p.stem for p in (ROOT / "dd2cli" / "engine").glob("*.py")}
    for concept in ("distill", "runs", "runtime", "progress", "checkpoint", "distributed", "sample", "labels",
                    "sample_sets", "adm_npz", "metrics", "features", "evaluate", "speed", "bundle", "export",
                    "model_card", "report"):
        assert concept in engine


def test_every_document_a_source_file_cites_ships_with_the_repository():
    cited = {}
    for folder in ("dd2cli", "plugins", "examples", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in re.findall(r"\bdocs/[\w./-]+\.md\b", path.read_text()):
                cited.setdefault(name, path.relative_to(ROOT))
    assert cited, "the docstrings cite docs/ pages; the pattern finds none"
    missing = {name: str(where) for name, where in cited.items() if not (ROOT / name).is_file()}
    assert not missing
