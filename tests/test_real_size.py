"""benchmarks/real_size.py: the user's whole path at llamagen-b's real shapes through the public CLI, and its runner."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "real_size.py"

#: what `--smallest` must run, each as its own process (its killed and resumed run is also the one sampled and
#: exported, in place of a separate uninterrupted `distill`)
SMALLEST_STEPS = [
    "Inception weights + 256 px reference",
    "weights (random, official layout)",
    "distill, SIGKILL at 1st checkpoint",
    "distill --resume",
    "distill torchrun x2 ddp",
    "distill torchrun x2 fsdp",
    "sample torchrun x2",
    "sample --steps 2",
    "sample --teacher",
    "eval fid",
    "eval is",
    "eval prec-recall",
    "export --format pt2",
    "load_generator",
]


def _module():
    spec = importlib.util.spec_from_file_location("real_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_size"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_failing_command_is_a_failed_row_with_its_error_line(tmp_path):
    rs = _module()
    runner = rs.Runner(tmp_path, threads=1)
    code = "import sys; print('progress', file=sys.stderr); sys.exit('Error: the weights file is damaged.')"
    row = runner.step("llamagen-b", "distill", [sys.executable, "-c", code])
    assert row.status == "FAILED" and row.detail == "exit code 1: Error: the weights file is damaged."
    ok = runner.step("llamagen-b", "sample", [sys.executable, "-c", "x = bytearray(200 << 20)"],
                     check=lambda: "")
    assert ok.status == "ok" and ok.peak_rss_bytes >= 200 << 20 and ok.seconds >= 0
    bad = runner.step("llamagen-b", "export", [sys.executable, "-c", "pass"], check=lambda: "bundle/generator.pt2 missing")
    assert bad.status == "FAILED" and bad.detail == "bundle/generator.pt2 missing"


def test_a_step_meant_to_be_killed_is_killed_by_its_condition(tmp_path):
    rs = _module()
    runner = rs.Runner(tmp_path, threads=1)
    flag = tmp_path / "latest.json"
    code = f"import pathlib, time; pathlib.Path({str(flag)!r}).write_text('{{}}'); time.sleep(60)"
    row = runner.step("var-d16", "distill, SIGKILL", [sys.executable, "-c", code], stop_when=flag.is_file,
                      expect_stop=True)
    assert row.status == "ok" and row.seconds < 30
    row = runner.step("var-d16", "distill, SIGKILL", [sys.executable, "-c", "pass"], stop_when=lambda: False,
                      expect_stop=True)
    assert row.status == "FAILED" and "before it could be killed" in row.detail


def test_bad_input_is_one_sentence(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--teachers", "var-d99", "--json-out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--teachers takes a comma list of llamagen-b, var-d16" in res.stderr
    res = subprocess.run([sys.executable, str(SCRIPT), "--skip", "ddp,zero", "--json-out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--skip takes a comma list of ddp, fsdp; got 'ddp,zero'" in res.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_smallest_real_size_path_passes_every_step(tmp_path):
    """Every step of the user's path at llamagen-b's real shapes (about 16 min on 2 idle cores)."""
    out = tmp_path / "real_size.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--smallest", "--json-out", str(out)], capture_output=True,
                         text=True)
    assert out.is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in rows] == SMALLEST_STEPS
    failed = [f"{r['step']}: {r['status']} {r['detail']}" for r in rows if r["status"] != "ok"]
    assert not failed, "\n".join(failed)
    assert res.returncode == 0, res.stdout[-3000:]
    assert all(r["seconds"] > 0 and r["peak_rss_bytes"] > 0 for r in rows)
    print(res.stdout[res.stdout.rfind("\nteacher "):])  # the table, for `pytest -s`
