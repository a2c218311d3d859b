"""Fault injection: `dd2 distill` killed at any moment (SIGKILL: no cleanup at all) resumes to the very weights of
an uninterrupted run, the head-only phase of stage 1 included. Disk-full, read-only and interrupted writes are
tested beside the code they concern (test_distill.py, test_export.py, test_sample_faults.py)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dd2cli.files import load_safetensors

DRIVER = str(Path(__file__).parent / "distill_driver.py")
# stage 1 starts with its head-only phase (backbone frozen) and ends after it; checkpoints every 2 steps
ARGS = ["--quiet", "distill", "--teacher", "synthetic-corr", "--device", "cpu", "--set", "stage1.steps=8",
        "--set", "stage1.head_only_steps=3", "--set", "stage2.steps=6", "--set", "stage1.batch_size=8",
        "--set", "stage2.batch_size=8", "--set", "head.width=32", "--set", "head.depth=1",
        "--set", "run.checkpoint_every=2", "--set", "run.sample_every=0", "--set", "flow_init.steps=0"]
FINAL = "checkpoints/stage2-0000006/modules.safetensors"


def _env(**extra) -> dict:
    return {**os.environ, "DD2_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1", **extra}


def _run(args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, DRIVER, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("faults") / "reference"
    t0 = time.perf_counter()
    proc = _run([*ARGS, "--out", str(out)], _env())
    assert proc.returncode == 0, proc.stderr
    return out, time.perf_counter() - t0


def _assert_same_final_weights(a: Path, b: Path) -> None:
    wa, wb = load_safetensors(a / FINAL)[0], load_safetensors(b / FINAL)[0]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _resume_until_done(run_dir: Path) -> None:
    proc = _run(["--quiet", "distill", "--resume", str(run_dir)], _env())
    assert proc.returncode == 0, proc.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == 2]
    assert steps == sorted(set(steps)), "a resume logged a step twice"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_weights(reference, tmp_path, seed):
    ref_dir, seconds = reference
    run_dir = tmp_path / "run"
    p = subprocess.Popen([sys.executable, DRIVER, *ARGS, "--out", str(run_dir)], env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and not (run_dir / "latest.json").exists() and p.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.8 * seconds))  # anywhere in the rest of the run
    p.send_signal(signal.SIGKILL)
    p.wait()
    _resume_until_done(run_dir)
    _assert_same_final_weights(ref_dir, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["stage1-0000004:optim.safetensors",   # inside the head-only phase
                                   "stage1-0000008:state.json",          # the final stage-1 checkpoint
                                   "stage2-0000004:modules.safetensors",
                                   "after-stage2-0000004:latest.json"])  # folder in place, pointer not yet
def test_sigkill_inside_a_checkpoint_write_then_resume_gives_the_uninterrupted_weights(reference, tmp_path, where):
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    proc = _run([*ARGS, "--out", str(run_dir)], _env(DD2_TEST_KILL_INSIDE=where))
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # the hook fired
    _resume_until_done(run_dir)
    _assert_same_final_weights(ref_dir, run_dir)
    assert not list((run_dir / "checkpoints").glob(".stage*"))  # the cut-short write was cleaned up
