"""`dd2 distill --list-settings` prints the settings the run would use, each with where its value comes from, readable
at 80 columns, and writes nothing."""

import dataclasses
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dd2cli import cli_distill, hookimpl, plugins
from dd2cli.cli import app
from dd2cli.config import describe
from dd2cli.settings import DistillSettings
from dd2cli.teachers import Family

runner = CliRunner()
KEYS = [key for key, *_ in describe(DistillSettings)]


@pytest.fixture
def listed_variant():
    """A registered test variant whose defaults change stage1.steps, stage2.lr and threads."""
    from synthetic import SYNTHETIC_VARIANTS

    variant = dataclasses.replace(SYNTHETIC_VARIANTS[0], name="synthetic-listed",
                                  distill_defaults={"threads": -1, "stage1": {"steps": 7}, "stage2": {"lr": 2e-4}})

    class Listed:
        @hookimpl
        def dd2_register_teachers(self, register):
            register(Family(name="listed", description="a synthetic teacher with distillation defaults",
                            variants=(variant,)))

    plugins.register_plugin(Listed(), name="listed")
    return variant


@pytest.fixture
def narrow(monkeypatch):
    """The command's stdout console at 80 columns, whatever the terminal running the tests."""
    monkeypatch.setattr(cli_distill, "console", Console(width=80, color_system=None))


def _rows(output: str) -> dict[str, tuple[str, str]]:
    """`{key: (value, source)}` from the lines that start with a setting's key; each key must be on one line."""
    rows = {}
    for key in KEYS:
        found = [m for line in output.splitlines()
                 if (m := re.match(rf"^\s*{re.escape(key)}\s+(.+?){re.escape(cli_distill.SOURCE_MARK)}(.+?)\s*$",
                                   line))]
        assert len(found) == 1, (key, output)
        rows[key] = found[0].group(1), found[0].group(2)
    return rows


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_new_run_shows_each_value_with_its_layer(listed_variant, narrow, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DD2_RUNS_DIR", str(tmp_path / "runs"))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[stage2]\nsteps = 450\nlr = 5e-5\n")
    before = _files(tmp_path)
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-listed", "--config", str(recipe),
                              "--set", "head.width=48", "--set", "stage1.timesteps.kind=logit-normal",
                              "--list-settings"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert all(len(line) <= 80 for line in out.splitlines()), max(out.splitlines(), key=len)
    rows = _rows(out)  # every key, whole, on one line, with a value and a source
    assert rows["stage1.steps"] == ("7", "synthetic-listed defaults")
    assert rows["threads"] == ("-1", "synthetic-listed defaults")
    assert rows["stage2.steps"] == ("450", "recipe.toml")
    assert rows["stage2.lr"] == ("5e-05", "recipe.toml")  # the file wins over the variant
    assert rows["head.width"] == ("48", "--set")
    assert rows["stage1.timesteps.kind"] == ('"logit-normal"', "--set")
    assert rows["stage2.timesteps.kind"] == ('"uniform"', "dd2 default")
    assert rows["seed"] == ("0", "dd2 default") and rows["stage1.sampling.cfg"] == ("unset", "dd2 default")
    # help and types in brackets are text, not rich markup: the interval and the choices stay
    text = " ".join(out.split())
    assert "distribution of t in [t_min, 1] (ours) ('uniform' | 'logit-normal')" in text
    assert "synthetic-listed" in out.splitlines()[0]
    assert _files(tmp_path) == before  # no run folder, nothing else


def test_a_resumed_run_shows_its_config_json_and_the_new_overrides(synthetic_plugin, narrow, tmp_path, monkeypatch):
    from dd2cli.engine import distill

    monkeypatch.setattr(distill, "_stage1", lambda r, ckpt: None)  # config.json is all this test needs
    monkeypatch.setattr(distill, "_flow_init", lambda r, ckpt: None)
    run_dir = tmp_path / "run"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(run_dir), "--stage", "1",
                              "--set", "stage1.steps=6", "--set", "threads=2"])
    assert res.exit_code == 0, res.output
    config = (run_dir / "config.json").read_text()
    before = _files(tmp_path)
    res = runner.invoke(app, ["distill", "--resume", str(run_dir), "--set", "stage2.lr=3e-5", "--seed", "4",
                              "--list-settings"])
    assert res.exit_code == 0, res.output
    rows = _rows(res.stdout)
    assert rows["stage1.steps"] == ("6", "run's config.json")
    assert rows["threads"] == ("2", "run's config.json")
    assert rows["stage2.lr"] == ("3e-05", "--set")
    assert rows["seed"] == ("4", "--seed")
    assert set(source for _, source in rows.values()) == {"run's config.json", "--set", "--seed"}
    assert "computes with the 2 torch thread(s) recorded in config.json" in " ".join(res.stdout.split())
    assert (run_dir / "config.json").read_text() == config and _files(tmp_path) == before
    assert json.loads(config)["threads"] == 2


def test_what_the_run_would_refuse_is_refused_before_listing(listed_variant, tmp_path):
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-listed", "--set", "stage2.lrr=1", "--list-settings"])
    assert res.exit_code == 2 and "Unknown setting 'stage2.lrr'" in res.output
    res = runner.invoke(app, ["distill", "--resume", str(tmp_path), "--list-settings"])
    assert res.exit_code != 0 and "not a dd2 distillation run" in res.output
