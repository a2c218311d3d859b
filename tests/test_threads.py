"""One thread policy on every command (-1 = one per idle core, 0 = torch's default, N = N), and distillation
results that do not depend on the load of the machine at resume time: a run records the count it used in its
config.json and `--resume` keeps it (the `threads` setting's help says why)."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from dd2cli.cli import app
from dd2cli.engine import runtime
from dd2cli.errors import DD2Error
from dd2cli.files import load_safetensors

runner = CliRunner()
TINY = ["--set", "stage1.steps=6", "--set", "stage2.steps=4", "--set", "stage1.batch_size=8",
        "--set", "stage2.batch_size=8", "--set", "head.width=32", "--set", "head.depth=1",
        "--set", "run.checkpoint_every=2", "--set", "run.log_every=1", "--set", "run.grid_per_class=2",
        "--set", "run.sample_every=0"]
FINAL = "checkpoints/stage2-0000004/modules.safetensors"


@pytest.fixture
def idle(monkeypatch):
    """`idle(n)`: make auto (-1) see a 4-core machine with n idle cores, whatever this machine is doing."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_idle(n: float) -> None:
        monkeypatch.setattr(runtime, "_idle_cores", lambda cpus: n)

    return set_idle


def _recorded(run_dir) -> int:
    return json.loads((run_dir / "config.json").read_text())["threads"]


def _spy_stage2(monkeypatch, real: bool = True) -> list[int]:
    """The torch thread count stage 2 runs with, one entry per run (the real stage 2 still trains unless `real`)."""
    from dd2cli.engine import distill

    seen, original = [], distill._stage2

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs) if real else (None, 0, None)

    monkeypatch.setattr(distill, "_stage2", spy)
    return seen


def test_one_and_two_threads_and_a_resume_that_keeps_the_recorded_count(synthetic_plugin, tmp_path, monkeypatch,
                                                                        idle):
    before = torch.get_num_threads()
    weights = {}
    for n in (1, 2):
        out = tmp_path / f"threads{n}"
        res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY,
                                  "--set", f"threads={n}"])
        assert res.exit_code == 0, res.output
        assert _recorded(out) == n  # the count the run computed with
        weights[n] = load_safetensors(out / FINAL)[0]
        assert torch.get_num_threads() == before
    same = all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    # On this machine the two generators differ in rounding (CPU kernels split their sums by thread); were they
    # identical, the record below would still hold but would matter less.
    print("1 and 2 threads give", "identical" if same else "different", "weights")

    # auto picks 2 at the start of a run that stops after stage 1 ...
    idle(2.0)
    part = tmp_path / "part"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(part), *TINY,
                              "--set", "threads=-1", "--stage", "1"])
    assert res.exit_code == 0, res.output
    assert "2 torch thread(s): one per idle core" in res.stderr and "torch thread" not in res.stdout
    assert _recorded(part) == 2
    # ... and the machine is busier when it resumes: auto would pick 1, the run keeps its 2
    idle(1.0)
    seen = _spy_stage2(monkeypatch)
    res = runner.invoke(app, ["distill", "--resume", str(part)])
    assert res.exit_code == 0, res.output
    assert seen == [2]
    assert "keeping the 2 torch thread(s) recorded in config.json (one per idle core would be 1 now)" in res.stderr
    assert _recorded(part) == 2
    assert torch.get_num_threads() == before
    resumed = load_safetensors(part / FINAL)[0]
    for k in resumed:  # bit for bit the uninterrupted 2-thread run, whatever the load at resume time
        assert torch.equal(resumed[k], weights[2][k]), k
    if not same:
        assert any(not torch.equal(resumed[k], weights[1][k]) for k in resumed)


def test_a_different_count_on_resume_is_used_with_a_warning_and_recorded(synthetic_plugin, tmp_path, monkeypatch):
    out = tmp_path / "run"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY,
                              "--set", "threads=1", "--stage", "1"])
    assert res.exit_code == 0, res.output
    assert _recorded(out) == 1
    seen = _spy_stage2(monkeypatch, real=False)
    res = runner.invoke(app, ["distill", "--resume", str(out), "--set", "threads=2"])
    assert res.exit_code == 0, res.output
    assert seen == [2]  # the user asked for it
    assert ("warning: threads = 2 differs from the 1 torch thread(s) this run was recorded with" in res.stderr
            and "drop --set threads=2 to keep 1" in res.stderr)
    assert _recorded(out) == 2  # a later resume continues as this one computed
    res = runner.invoke(app, ["distill", "--resume", str(out)])
    assert res.exit_code == 0, res.output
    assert seen == [2, 2] and "warning" not in res.output


def test_torchs_default_on_resume_also_keeps_the_recorded_count(synthetic_plugin, tmp_path, monkeypatch):
    out = tmp_path / "run"
    before = torch.get_num_threads()
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY,
                              "--set", f"threads={before + 1}", "--stage", "1"])
    assert res.exit_code == 0, res.output
    seen = _spy_stage2(monkeypatch, real=False)
    res = runner.invoke(app, ["distill", "--resume", str(out), "--set", "threads=0"])  # 0: the caller's count
    assert res.exit_code == 0, res.output
    assert seen == [before + 1]
    assert f"keeping the {before + 1} torch thread(s) recorded in config.json (torch's default is {before} now)" \
        in res.stderr
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("command", ["sample", "eval speed", "eval fid"])
def test_sample_and_eval_resolve_threads_by_the_same_policy_and_restore_the_callers_count(command, monkeypatch,
                                                                                          idle):
    """-1 (the default) = one per idle core, said on stderr; 0 = torch's default; N = N; the count holds while the
    engine runs and the caller's count is back afterwards, also when the engine fails."""
    from dd2cli.engine import evaluate, sample, speed

    seen = []

    def engine(result):
        def fake(req, progress=None):
            seen.append(torch.get_num_threads())
            if result is None:
                raise DD2Error("Stopped by the test; nothing to do.")
            return result
        return fake

    monkeypatch.setattr(sample, "run", engine(SimpleNamespace(manifest=None)))  # (a rank other than 0: no report)
    monkeypatch.setattr(speed, "measure_speed", engine(None))
    monkeypatch.setattr(evaluate, "evaluate", engine(None))
    ok = 0 if command == "sample" else 2
    idle(3.0)
    before = torch.get_num_threads()
    assert before != 3
    res = runner.invoke(app, command.split())
    assert res.exit_code == ok, res.output
    assert seen == [3]
    assert "3 torch thread(s): one per idle core (--threads -1)" in res.stderr and "torch thread" not in res.stdout
    assert torch.get_num_threads() == before
    for flag, expected in (("0", before), ("2", 2), ("-1", 3)):
        res = runner.invoke(app, [*command.split(), "--threads", flag])
        assert res.exit_code == ok, res.output
        assert seen[-1] == expected, flag
        assert ("one per idle core" in res.stderr) == (flag == "-1")
        assert torch.get_num_threads() == before
    res = runner.invoke(app, [*command.split(), "--threads", "-2"])
    assert res.exit_code == 2 and "--threads must be -1 (one per idle core), 0 (torch's default) or a count" in \
        " ".join(res.output.replace("│", " ").split())
    assert len(seen) == 4  # refused before the engine ran
