"""The training engine end to end on the synthetic teacher: files, errors, resume, data parallelism."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_output import plain
from typer.testing import CliRunner

from dd2cli import plugins
from dd2cli.cli import app
from dd2cli.files import load_safetensors

runner = CliRunner()
DRIVER = str(Path(__file__).parent / "distill_driver.py")
TINY = ["--set", "stage1.steps=6", "--set", "stage2.steps=4", "--set", "stage1.batch_size=8",
        "--set", "stage2.batch_size=8", "--set", "head.width=32", "--set", "head.depth=1",
        "--set", "run.checkpoint_every=2", "--set", "run.log_every=1", "--set", "run.grid_per_class=2"]


def _env():
    env = {k: v for k, v in os.environ.items()}
    env["DD2_LOAD_PLUGINS"] = ""
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_distill_writes_a_complete_run(synthetic_plugin, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY,
                              "--set", "run.grid_classes=1"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["teacher"] == "synthetic-corr" and cfg["settings"]["stage1"]["steps"] == 6
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["stage"] == 1] == list(range(1, 7))
    assert [m["step"] for m in metrics if m["stage"] == 2] == list(range(1, 5))
    assert all(torch.isfinite(torch.tensor(m.get("loss_gts", m.get("loss_csd")))) for m in metrics)
    latest = json.loads((out / "latest.json").read_text())
    assert latest == {"stage": 2, "step": 4, "path": "checkpoints/stage2-0000004"}
    weights, _ = load_safetensors(out / latest["path"] / "modules.safetensors")
    assert {k.split(".")[0] for k in weights} == {"generator", "ema", "guidance"}
    assert (out / "checkpoints" / "stage1-0000006" / "FINAL").exists()  # kept to seed stage 2
    assert (out / "samples" / "final.png").is_file()
    from PIL import Image

    with Image.open(out / "samples" / "final.png") as grid:  # one class row of 2 (of the teacher's 2 classes)
        assert grid.height < grid.width
    assert "Sample grid" in res.output


def test_threads_setting_applies_during_the_run_and_is_restored_after(synthetic_plugin, tmp_path, monkeypatch):
    from dd2cli.engine import distill

    seen = []
    monkeypatch.setattr(distill, "_stage2", lambda r, psi0, ckpt, init=None: seen.append(torch.get_num_threads()) or
                        (None, 0, None))
    before = torch.get_num_threads()
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(tmp_path / "run"), *TINY,
                              "--set", f"threads={before + 1}"])
    assert res.exit_code == 0, res.output
    assert seen == [before + 1]  # stage 2 ran with the configured count
    assert torch.get_num_threads() == before  # and the caller's count is back


def test_resume_of_a_finished_run_changes_nothing_and_extending_continues(synthetic_plugin, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY]).exit_code == 0
    before = load_safetensors(out / "checkpoints/stage2-0000004/modules.safetensors")[0]
    res = runner.invoke(app, ["distill", "--resume", str(out), "--set", "stage2.steps=6"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "latest.json").read_text())["step"] == 6
    assert not torch.equal(before["generator.model.head.out.weight"],
                           load_safetensors(out / "checkpoints/stage2-0000006/modules.safetensors")[0][
                               "generator.model.head.out.weight"])


def test_invalid_combinations_are_one_sentence(synthetic_plugin, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY]).exit_code == 0
    cases = [
        (["distill", "--teacher", "synthetic-scales", "--resume", str(out)], "distils teacher 'synthetic-corr'"),
        (["distill", "--teacher", "synthetic-corr", "--out", str(out)], "already exists and is not empty"),
        (["distill", "--teacher", "nope", "--out", str(tmp_path / "x")], "No teacher 'nope'"),
        (["distill", "--teacher", "synthetic-corr", "--set", "stage2.lrr=1", "--out", str(tmp_path / "y")],
         "Unknown setting 'stage2.lrr'"),
        (["distill", "--teacher", "synthetic-corr", "--set", "stage1.steps=-1", "--out", str(tmp_path / "y")],
         "must be >= 0"),
        (["distill", "--resume", str(tmp_path / "missing")], "not a dd2 distillation run"),
        (["distill", "--stage", "3", "--teacher", "synthetic-corr"], "is not one of '1', '2', 'all'"),
        (["distill", "--weights", "nokey", "--teacher", "synthetic-corr"], "KEY=PATH"),
    ]
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[stage1\nsteps = 2")
    cases.append((["distill", "--teacher", "synthetic-corr", "--config", str(bad_toml)], "not valid TOML"))
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code != 0, args
        assert message in plain(res.output), (args, res.output)
        assert "Traceback" not in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    from dd2cli import hookimpl
    from dd2cli.teachers import Family, Variant, WeightFile

    class NeedsWeights:
        @hookimpl
        def dd2_register_teachers(self, register):
            register(Family(name="heavy", description="", variants=(Variant(
                name="heavy-1", description="", loader=lambda v, w, d: None,
                weights=(WeightFile("net", "heavy_net.pth", "the network", url="https://example.org/heavy"),)),)))

    monkeypatch.setenv("DD2_WEIGHTS_DIR", str(tmp_path / "weights"))
    plugins.register_plugin(NeedsWeights(), name="heavy")
    res = runner.invoke(app, ["distill", "--teacher", "heavy-1", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "needs heavy_net.pth" in res.output and str(tmp_path / "weights") in res.output
    assert not (tmp_path / "run" / "config.json").exists()


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(synthetic_plugin, tmp_path, monkeypatch):
    from dd2cli.engine import distill

    real = distill.gts_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(distill, "gts_loss", poisoned)
    out = tmp_path / "run"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY])
    assert res.exit_code == 2
    assert "gts loss became nan at stage 1 step 5" in res.output
    assert "stage1-0000004" in res.output
    assert json.loads((out / "latest.json").read_text())["step"] == 4


def test_nan_in_the_flow_map_phase_names_its_step_and_learning_rate(synthetic_plugin, tmp_path, monkeypatch):
    from dd2cli.engine import distill

    real = distill.flow_map_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, agree = real(*a, **k)
        return (loss * float("nan") if calls["n"] == 3 else loss), agree

    monkeypatch.setattr(distill, "flow_map_loss", poisoned)
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(tmp_path / "run"), *TINY,
                              "--set", "flow_init.steps=4", "--set", "flow_init.batch_size=8",
                              "--set", "flow_init.euler_steps=2"])
    assert res.exit_code == 2
    assert "flow loss became nan at stage 1 step 9" in res.output and "flow_init.lr" in res.output
    assert "stage1-0000008" in res.output  # (checkpoint_every = 2: the phase's second update)


def _run_driver(args, env, **kw):
    return subprocess.run([sys.executable, DRIVER, *args], env=env, capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["distill", "--teacher", "synthetic-corr", "--set", "stage1.steps=40", "--set", "stage2.steps=30",
            "--set", "stage1.batch_size=16", "--set", "stage2.batch_size=16", "--set", "head.width=32",
            "--set", "run.checkpoint_every=5", "--set", "run.sample_every=0"]
    env = _env()
    ref = tmp_path / "ref"
    proc = _run_driver(["--quiet", *args, "--out", str(ref)], env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # kill a second run with SIGKILL once stage 2 has checkpointed, then resume it
    run_dir = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, DRIVER, "--quiet", *args, "--out", str(run_dir)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline:
        latest = run_dir / "latest.json"
        if latest.exists() and json.loads(latest.read_text())["stage"] == 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = json.loads((run_dir / "latest.json").read_text())
    assert killed_at["stage"] == 2 and killed_at["step"] < 30
    # a checkpoint write cut short leaves a hidden temporary folder; resume must ignore it
    (run_dir / "checkpoints" / ".stage2-0000099.partial.tmp").mkdir()
    proc = _run_driver(["--quiet", "distill", "--resume", str(run_dir)], env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    a = load_safetensors(ref / "checkpoints/stage2-0000030/modules.safetensors")[0]
    b = load_safetensors(run_dir / "checkpoints/stage2-0000030/modules.safetensors")[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == 2]
    assert steps == sorted(set(steps)), "metrics were duplicated by the resume"


def test_resume_refuses_a_new_architecture_before_writing_anything(synthetic_plugin, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    before = (out / "config.json").read_bytes()
    res = runner.invoke(app, ["distill", "--resume", str(out), "--set", "head.width=64"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "Setting 'head.width' cannot change when resuming" in plain(res.output)
    assert (out / "config.json").read_bytes() == before  # nothing rewritten: the run stays usable
    res = runner.invoke(app, ["distill", "--resume", str(out), "--set", "stage2.steps=5"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "latest.json").read_text())["step"] == 5


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_resume_falls_back_to_the_newest_checkpoint_that_reads_back(synthetic_plugin, tmp_path, damage):
    import shutil

    out = tmp_path / "run"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    latest = out / "checkpoints" / "stage2-0000004"
    if damage == "corrupt":
        data = bytearray((latest / "modules.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (latest / "modules.safetensors").write_bytes(bytes(data))
    else:
        shutil.rmtree(latest)
    partial = out / "checkpoints" / ".stage2-0000006.abc123"  # a checkpoint write a kill cut short
    partial.mkdir()
    res = runner.invoke(app, ["distill", "--resume", str(out), "--set", "stage2.steps=6"])
    assert res.exit_code == 0, res.output
    text = plain(res.output)
    assert "checkpoint stage2-0000004 cannot be read" in text and "resuming from stage2-0000002" in text
    assert json.loads((out / "latest.json").read_text())["step"] == 6
    assert not partial.exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == 2]
    assert steps == [1, 2, 3, 4, 5, 6]  # the steps after the fallback point were logged again, once


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_sentence_and_the_run_resumes_exactly(synthetic_plugin, tmp_path,
                                                                               monkeypatch, code):
    from dd2cli import files

    reference = tmp_path / "reference"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(reference), *TINY])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run"
    real_fsync = files.os.fsync

    def failing_fsync(fd):  # the disk fills up once the step-2 checkpoint of stage 2 is complete
        latest = out / "latest.json"
        if latest.exists() and json.loads(latest.read_text())["path"] == "checkpoints/stage2-0000002":
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY])
    monkeypatch.undo()
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    text = plain(res.output)
    assert f"Could not write checkpoint {out / 'checkpoints' / 'stage2-0000004'} ({os.strerror(code)})" in text
    assert json.loads((out / "latest.json").read_text())["path"] == "checkpoints/stage2-0000002"
    assert not list((out / "checkpoints").glob(".stage*"))  # the cut-short write cleaned up after itself
    res = runner.invoke(app, ["distill", "--resume", str(out)])
    assert res.exit_code == 0, res.output
    a = load_safetensors(reference / "checkpoints" / "stage2-0000004" / "modules.safetensors")[0]
    b = load_safetensors(out / "checkpoints" / "stage2-0000004" / "modules.safetensors")[0]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_prints_one_line_exits_130_and_resume_continues(tmp_path):
    env = _env()
    run_dir = tmp_path / "run"
    args = ["distill", "--teacher", "synthetic-corr", "--device", "cpu", "--set", "stage1.steps=100000",
            "--set", "stage1.batch_size=4", "--set", "head.width=16", "--set", "head.depth=1",
            "--set", "run.checkpoint_every=2", "--set", "stage1.head_only_steps=0"]
    # (Ctrl-C acts by default in the run, even where this test process was started with it ignored, as a shell
    # starts background jobs)
    p = subprocess.Popen([sys.executable, DRIVER, "--quiet", *args, "--out", str(run_dir)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "latest.json").exists():
        time.sleep(0.05)
    assert (run_dir / "latest.json").exists(), "no checkpoint was written"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    last = json.loads((run_dir / "latest.json").read_text())
    assert lines[0].startswith("Interrupted at stage 1 (GTS) step ")
    assert f"the last complete checkpoint is stage 1 step {last['step']}" in lines[0]
    assert f"resume with `dd2 distill --resume {run_dir}`" in lines[0]
    # the last checkpoint is intact: the run continues from it (here with stage 1 shortened to end soon)
    steps = last["step"] + 2
    proc = _run_driver(["--quiet", "distill", "--resume", str(run_dir), "--set", f"stage1.steps={steps}",
                        "--set", "stage2.steps=2", "--set", "stage2.batch_size=4", "--set", "flow_init.steps=0"],
                       env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "latest.json").read_text()) == {"stage": 2, "step": 2,
                                                                   "path": "checkpoints/stage2-0000002"}
    stage1 = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["stage"] == 1]
    assert stage1[-1] == steps and stage1 == sorted(set(stage1))


def test_a_ctrl_c_that_something_swallowed_still_stops_the_run_at_its_next_step(synthetic_plugin, tmp_path,
                                                                                monkeypatch):
    import dd2cli.engine.distill as engine

    calls = []
    gts = engine.gts_loss

    def gts_then_ctrl_c_lost_in_a_finalizer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            try:  # what Python does to an exception raised while a finalizer runs: it is printed and dropped
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                pass
        return gts(*args, **kwargs)

    monkeypatch.setattr(engine, "gts_loss", gts_then_ctrl_c_lost_in_a_finalizer)
    # (a shell starts background jobs with Ctrl-C ignored, and so would this test process be: Python's own handler)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(tmp_path / "run"), *TINY,
                                  "--set", "stage1.steps=50"])
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert res.exit_code == 130, res.output
    assert "Interrupted at stage 1 (GTS) step 3" in plain(res.output) and len(calls) == 3
    assert after is signal.default_int_handler  # the run put the handler back as it was


@pytest.mark.slow
def test_two_process_gloo_replicas_stay_identical_and_batch_is_split(tmp_path):
    env = _env()
    env["DD2_TEST_RECORD"] = str(tmp_path)
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", DRIVER,
            "--quiet", "distill", "--teacher", "synthetic-corr", "--out", str(tmp_path / "run"), "--device", "cpu",
            "--set", "stage1.steps=4", "--set", "stage2.steps=3", "--set", "stage1.batch_size=8",
            "--set", "stage2.batch_size=8", "--set", "head.width=32", "--set", "run.sample_every=0"]
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["generator_sum"] == r1["generator_sum"] and r0["generator_abs_sum"] == r1["generator_abs_sum"]
    for b0, b1 in zip(r0["gts_batches"], r1["gts_batches"]):
        assert b0["shape"][0] == 4 and b1["shape"][0] == 4  # the global batch of 8, split in two
        assert b0["tokens"] != b1["tokens"] or b0["labels"] != b1["labels"]  # different data per rank
        assert b0["model"] == b1["model"] == "DistributedDataParallel"  # what the loss trains through
    assert len(r0["gts_batches"]) == 4


@pytest.mark.slow
def test_two_process_run_of_a_digits_teacher_ends_with_its_quality_report(tmp_path):
    """Under torchrun the quality report at the end is rank 0's alone (the others have left the process group):
    it samples in one process instead of waiting for ranks that are gone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DD2_LOAD_PLUGINS", None)  # (the bundled families: var-digits)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29518", "-m", "dd2cli", "--quiet", "distill", "--teacher", "var-digits", "--out", str(out),
                           "--device", "cpu", *TINY, "--set", "stage1.head_only_steps=2", "--set", "flow_init.steps=0",
                           "--set", "run.sample_every=0", "--set", "run.eval_samples=20"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["one-step", "teacher", "set-prediction"]
    assert all(r["n"] == 20 for r in report["rows"])


def _torchrun(args, port, env, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), DRIVER, "--quiet", "distill", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_resume_and_fsdp_match_an_uninterrupted_ddp_run(tmp_path):
    """2 ranks: DDP stopped after 2 stage-2 updates and resumed equals DDP run straight through, bit for bit
    (each rank continues its own random streams). FSDP (sharded parameters, gradients, Adam state), also
    stopped and resumed, follows the same trajectory with the usual learning rates: the same losses, Adam
    moments and weights to rounding (FSDP reduces in another order, so it is not bit-identical; measured:
    losses equal, weights within 1.5e-8, moments within 1.5e-6 relative).

    This test also guards stage 2's start under FSDP: every rank must load the same finished stage 1. Rank 1
    once read the run folder before rank 0 had marked its stage-1 checkpoint final, started from an untuned
    model, and about one run in three trained half-tuned shards (first stage-2 loss 7e-5 off)."""
    from dd2cli.engine.checkpoint import latest_checkpoint

    env = _env()
    common = ["--teacher", "synthetic-corr", "--device", "cpu", "--set", "stage1.steps=4", "--set",
              "stage1.head_only_steps=2", "--set", "stage1.batch_size=8", "--set", "stage2.batch_size=8",
              "--set", "head.width=32", "--set", "run.sample_every=0", "--set", "run.log_every=1",
              # stage 1 ends with a short flow-map phase: stage 2's generator starts from its result in both modes
              "--set", "flow_init.steps=2", "--set", "flow_init.batch_size=8", "--set", "flow_init.euler_steps=4"]
    _torchrun([*common, "--out", str(tmp_path / "ddp"), "--set", "stage2.steps=3"], 29521, env)
    for mode, port in (("ddp", 29522), ("fsdp", 29523)):
        out = str(tmp_path / f"{mode}-resumed")
        _torchrun([*common, "--out", out, "--set", "stage2.steps=2", "--set", f"parallel={mode}"], port, env)
        _torchrun(["--resume", out, "--set", "stage2.steps=3"], port, env)

    def stage2_losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss_csd"], r["loss_fcs"]) for r in rows if r["stage"] == 2]

    ref = latest_checkpoint(tmp_path / "ddp")
    ref_losses = stage2_losses(tmp_path / "ddp")
    assert [s for s, _, _ in ref_losses] == [1, 2, 3]
    for mode in ("ddp", "fsdp"):
        run = tmp_path / f"{mode}-resumed"
        got = latest_checkpoint(run)
        assert got.step == ref.step == 3 and got.sharded == (mode == "fsdp")  # (FSDP: each rank writes its shards)
        exact = mode == "ddp"
        losses = stage2_losses(run)
        assert [s for s, _, _ in losses] == [1, 2, 3]  # the resumed run re-logs nothing twice
        for (_, a, b), (_, c, d) in zip(losses, ref_losses):
            assert (a, b) == (c, d) if exact else abs(a - c) <= 1e-6 * abs(c) and abs(b - d) <= 1e-6 * abs(d), \
                (mode, (a, b), (c, d))
        for name in ("generator", "ema", "guidance"):
            want, have = ref.module_state(name), got.module_state(name)
            assert set(want) == set(have)
            for k, v in want.items():
                assert torch.allclose(have[k], v, rtol=0, atol=0 if exact else 2e-7), (mode, name, k)
        for name in ("generator", "guidance"):
            a, b = ref.optimizer_moments(name), got.optimizer_moments(name)
            assert len(a) == len(b) > 0
            for i, (entry_a, entry_b) in enumerate(zip(a, b)):
                assert entry_a.keys() == entry_b.keys()
                for key, value in entry_a.items():
                    assert torch.allclose(entry_b[key], value, rtol=0 if exact else 1e-4,
                                          atol=0 if exact else 1e-8), (mode, name, i, key)
        assert sorted(got.rng()) == sorted(ref.rng())  # both ranks' random streams are stored


def test_stage1_cosine_decay_reaches_the_final_fraction(synthetic_plugin, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY, "--stage", "1",
                              "--set", "stage1.warmup_steps=2", "--set", "stage1.lr=1e-3",
                              "--set", "stage1.lr_decay=cosine", "--set", "stage1.lr_final=0.1"])
    assert res.exit_code == 0, res.output
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 6 and lrs[1] == pytest.approx(1e-3)  # warmed up
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] == pytest.approx(1e-4)


def test_flow_init_ends_stage1_seeds_the_generator_and_resumes_exactly(synthetic_plugin, tmp_path):
    """`flow_init.steps`: after GTS, the generator is regressed onto the teacher's flow map; its updates count on
    from stage 1's steps, the last checkpoint (ψ₀ + generator) is stage 1's final one, and stage 2's generator
    starts from it. Stopped after 2 of its 4 updates and resumed, it ends bit for bit where a straight run does."""
    from dd2cli.engine.checkpoint import final_stage1_checkpoint

    flow = ["--set", "flow_init.batch_size=8", "--set", "flow_init.euler_steps=4", "--set", "flow_init.warmup_steps=2",
            "--set", "run.keep_checkpoints=0"]
    a = tmp_path / "a"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(a), *TINY, *flow,
                              "--set", "flow_init.steps=4", "--stage", "1"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss_gts" in r] == list(range(1, 7))
    assert [r["step"] for r in rows if "loss_flow" in r] == [7, 8, 9, 10]
    assert all(0 <= r["flow_agree"] <= 1 for r in rows if "loss_flow" in r)
    final = final_stage1_checkpoint(a)
    assert final.path.name == "stage1-0000010" and final.has_module("generator") and final.has_module("model")
    assert not (a / "checkpoints" / "stage1-0000006" / "FINAL").exists()  # GTS alone no longer ends stage 1
    gts_end = load_safetensors(a / "checkpoints" / "stage1-0000006" / "modules.safetensors")[0]
    for k, v in final.module_state("model").items():
        assert torch.equal(v, gts_end[f"model.{k}"]), k  # ψ₀ is carried unchanged
    assert any(not torch.equal(v, final.module_state("model")[k[len("model."):]])
               for k, v in final.module_state("generator").items())  # the generator did move

    b = tmp_path / "b"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(b), *TINY, *flow,
                              "--set", "flow_init.steps=2", "--stage", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["distill", "--resume", str(b), "--set", "flow_init.steps=4", "--stage", "1"])
    assert res.exit_code == 0, res.output
    resumed = final_stage1_checkpoint(b)
    assert resumed.path.name == "stage1-0000010"
    for k, v in final.module_state("generator").items():
        assert torch.equal(resumed.module_state("generator")[k], v), k

    res = runner.invoke(app, ["distill", "--resume", str(a), "--stage", "2", "--set", "stage2.steps=0"])
    assert res.exit_code == 0, res.output
    start = load_safetensors(a / "checkpoints" / "stage2-0000000" / "modules.safetensors")[0]
    for k, v in final.module_state("generator").items():
        assert torch.equal(start[f"generator.{k}"], v) and torch.equal(start[f"ema.{k}"], v), k
    for k, v in final.module_state("model").items():
        assert torch.equal(start[f"guidance.{k}"], v), k  # the guidance network starts from ψ₀, as without it


def test_stage1_alone_then_stage2_on_resume(synthetic_plugin, tmp_path):
    """`--stage 1` stops after stage 1 without the end-of-run quality table (there is no generator to score
    yet; it used to fail with 'no stage-2 checkpoint'); `--resume RUN --stage 2` then trains stage 2 alone."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY, "--stage", "1",
                              "--set", "run.eval_samples=8"])
    assert res.exit_code == 0, res.output
    assert "stage-2" not in res.output and not (out / "quality.json").exists()
    assert json.loads((out / "latest.json").read_text())["stage"] == 1
    res = runner.invoke(app, ["distill", "--resume", str(out), "--stage", "2", "--set", "run.eval_samples=0"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "latest.json").read_text()) == {"stage": 2, "step": 4,
                                                             "path": "checkpoints/stage2-0000004"}


def test_stage2_trains_the_backbone_after_a_head_only_stage1_with_or_without_a_resume(synthetic_plugin, tmp_path):
    """Stage 1 ends inside its head-only phase (backbone frozen); stage 2 trains the whole generator either way, so
    the run resumed at stage 2 ends with the same weights as the uninterrupted one."""
    head_only = [*TINY, "--set", "stage1.steps=2", "--set", "stage1.head_only_steps=5", "--set", "stage2.steps=2"]
    whole = tmp_path / "whole"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(whole), *head_only])
    assert res.exit_code == 0, res.output
    split = tmp_path / "split"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(split), *head_only, "--stage", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["distill", "--resume", str(split)])
    assert res.exit_code == 0, res.output
    final1 = load_safetensors(whole / "checkpoints" / "stage1-0000002" / "modules.safetensors")[0]
    a = load_safetensors(whole / "checkpoints" / "stage2-0000002" / "modules.safetensors")[0]
    b = load_safetensors(split / "checkpoints" / "stage2-0000002" / "modules.safetensors")[0]
    backbone = [k for k in a if k.startswith("generator.model.backbone.") and a[k].is_floating_point()]
    assert backbone and any(not torch.equal(a[k], final1["model." + k[len("generator.model."):]]) for k in backbone)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stage1_from_token_dataset_and_cached_shards(synthetic_plugin, tmp_path):
    from synthetic import SyntheticTeacher

    from dd2cli.files import save_safetensors

    t = SyntheticTeacher()
    labels = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(0))
    tokens = t.sample(labels, t.spec.stage1, generator=torch.Generator().manual_seed(1))
    save_safetensors(tmp_path / "tokens.safetensors", {"tokens": tokens, "labels": labels})
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(tmp_path / "a"), *TINY,
                              "--set", f"stage1.data={tmp_path / 'tokens.safetensors'}", "--stage", "1"])
    assert res.exit_code == 0, res.output
    save_safetensors(tmp_path / "bad.safetensors", {"tokens": tokens[:, :2], "labels": labels})
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(tmp_path / "b"), *TINY,
                              "--set", f"stage1.data={tmp_path / 'bad.safetensors'}"])
    assert res.exit_code == 2 and "needs (N, 3)" in res.output
    out = tmp_path / "c"
    res = runner.invoke(app, ["distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY,
                              "--set", "stage1.cache_sequences=100", "--set", "activation_checkpointing=true"])
    assert res.exit_code == 0, res.output
    shard = load_safetensors(out / "data" / "shard-00000.safetensors")[0]
    assert shard["tokens"].shape == (100, 3)


def test_llamagen_digits_with_continuous_input_adaptation(tmp_path):
    import importlib

    plugins.register_plugin(importlib.import_module("dd2_llamagen"), name="llamagen")
    out = tmp_path / "run"
    res = runner.invoke(app, ["distill", "--teacher", "llamagen-digits", "--out", str(out), *TINY,
                              "--set", "adapt.steps=3", "--set", "adapt.batch_size=4", "--set", "run.eval_samples=0"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "adaptation.json").read_text())
    assert report["steps"] == 3 and "kl" in report["after"]
    assert "adaptation: KL" in res.output


@pytest.mark.gpu
def test_a_tiny_run_on_cuda_in_bf16_resumes_and_samples(synthetic_plugin, tmp_path):
    out = tmp_path / "run"
    args = ["distill", "--teacher", "synthetic-corr", "--device", "cuda", "--set", "precision=bf16", *TINY]
    res = runner.invoke(app, [*args, "--out", str(out), "--stage", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["distill", "--resume", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "latest.json").read_text())["stage"] == 2
    res = runner.invoke(app, ["sample", "--from", str(out), "-n", "8", "--device", "cuda", "--precision", "bf16",
                              "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "s").glob("*.png"))) == 9  # 8 images + the preview

