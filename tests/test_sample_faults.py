"""`dd2 sample` under faults: one writer per folder (a lock), temporary names per process, a kill at any moment."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_output import plain
from typer.testing import CliRunner

from dd2cli.cli import app
from dd2cli.engine.adm_npz import write_adm_npz
from dd2cli.engine.sample_sets import IDS_PARTS, LOCK_NAME, SampleFolderLock
from dd2cli.errors import DD2Error
from dd2cli.files import write_json

runner = CliRunner()
TESTS = Path(__file__).parent
SAMPLE = ["sample", "--teacher", "synthetic-corr", "--block-size", "4", "--batch-size", "2"]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and modification time (what 'untouched' means)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _finals(folder: Path) -> dict[str, bytes]:
    """The files a finished set is made of, without the manifest (it records times) and the per-batch token-id
    parts (working files: tokens.npy, made from them, is compared)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if not p.name.startswith(".") and p.name not in ("manifest.json", IDS_PARTS)}


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds the folder's lock (as a running `dd2 sample` does) until it is killed."""
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder / LOCK_NAME)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_at_once_and_touches_nothing(synthetic_plugin, tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(app, ["-q", *SAMPLE, "-n", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    refusal = f"Another dd2 sample is writing to {out}; wait for it to finish or choose another --out."
    # 1. a finished set that another process is extending; 2. a new folder whose writer has only just begun
    for folder, n in ((out, "8"), (tmp_path / "new", "4")):
        holder = _hold_lock(folder)
        try:
            before = _snapshot(folder)
            res = runner.invoke(app, [*SAMPLE, "-n", n, "--out", str(folder)])
            assert res.exit_code == 2, res.output
            assert refusal.replace(str(out), str(folder)) in plain(res.output) and "Traceback" not in res.output
            assert _snapshot(folder) == before
        finally:
            holder.kill()  # however its holder ends (SIGKILL here), the kernel releases the lock
            holder.wait()
    # the lock file left behind blocks nothing: both folders are written now
    for folder, n in ((out, 8), (tmp_path / "new", 4)):
        res = runner.invoke(app, ["-q", *SAMPLE, "-n", str(n), "--out", str(folder)])
        assert res.exit_code == 0, res.output
        assert json.loads((folder / "manifest.json").read_text())["complete"] is True
        assert len(list(folder.glob("[0-9]*.png"))) == n and (folder / LOCK_NAME).is_file()


def test_the_lock_is_exclusive_within_a_process_and_released(tmp_path):
    first, second = SampleFolderLock(tmp_path / "f"), SampleFolderLock(tmp_path / "f")
    first.acquire()
    try:
        with pytest.raises(DD2Error, match="Another dd2 sample is writing to"):
            second.acquire()
        assert second.fd is None
    finally:
        first.release()
    second.acquire()
    second.release()
    assert [p.name for p in (tmp_path / "f").iterdir()] == [LOCK_NAME]


def test_a_folder_that_is_not_a_sample_set_gets_no_lock_file(synthetic_plugin, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    res = runner.invoke(app, [*SAMPLE, "-n", "2", "--out", str(tmp_path / "other")])
    assert res.exit_code == 2 and "not a dd2 sample set" in plain(res.output)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_temporary_names_differ_between_processes(tmp_path, monkeypatch):
    """The npz, manifest, preview and PNGs are written under names no other process can be using."""
    code = ("import os, sys\n"
            "import numpy as np\n"
            "from dd2cli.engine.adm_npz import write_adm_npz\n"
            "real = os.replace\n"
            "os.replace = lambda src, dst: (print(os.path.basename(src)), real(src, dst))\n"
            "write_adm_npz(sys.argv[1], iter([np.zeros((2, 4, 4, 3), np.uint8)]), 2, 4, 4)\n")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path / "samples_2x4x4x3.npz")], capture_output=True,
                           text=True, timeout=120, check=True)
    (child_name,) = child.stdout.split()
    names = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (names.append(Path(src).name), real(src, dst)))
    for _ in range(2):
        write_adm_npz(tmp_path / "samples_2x4x4x3.npz", iter([np.zeros((2, 4, 4, 3), np.uint8)]), 2, 4, 4)
        write_json(tmp_path / "manifest.json", {"complete": False})  # PNGs and the preview use the same writer
    npz_names = [n for n in names if n.startswith(".samples_")]
    assert len(npz_names) == 2 and all(n.startswith(f".samples_2x4x4x3.npz.{os.getpid()}-") for n in npz_names)
    assert child_name.startswith(".samples_2x4x4x3.npz.") and child_name not in npz_names
    assert len(set(names)) == 4 and all(n.endswith(".tmp") for n in names)


_KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from synthetic import SyntheticPlugin
from dd2cli import plugins
from dd2cli.cli import app
plugins.register_plugin(SyntheticPlugin(), name="synthetic")
kind, at = sys.argv[2], int(sys.argv[3])
real, counts = os.replace, {}

def replace(src, dst):
    name = os.path.basename(dst)
    if os.path.basename(os.path.dirname(dst)) == "ids-parts":
        k = "ids"
    else:
        k = "npz" if name.endswith(".npz") else name if name in ("manifest.json", "preview.png", "tokens.npy") else "png"
    counts[k] = counts.get(k, 0) + 1
    if k == kind and counts[k] == at:  # written and synced, not yet renamed into place
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)

os.replace = replace
app(sys.argv[4:], prog_name="dd2")
"""


@pytest.mark.parametrize("kind, at", [("png", 3), ("ids", 2), ("npz", 1), ("tokens.npy", 1), ("preview.png", 1),
                                      ("manifest.json", 2)])
def test_a_kill_at_any_write_leaves_a_set_that_a_rerun_finishes(synthetic_plugin, tmp_path, kind, at):
    """SIGKILL just before a rename: the old state stays (never `complete` with a half-written file); a re-run
    finishes with the files of an uninterrupted run."""
    args = [*SAMPLE, "-n", "6"]
    res = runner.invoke(app, ["-q", *args, "--out", str(tmp_path / "ref")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    env = {**os.environ, "DD2_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILLER, str(TESTS), kind, str(at), "-q", *args, "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert list(out.rglob(".*.tmp"))  # the write it was killed in
    for npz in out.glob("*.npz"):  # whatever carries a final name is whole
        assert np.load(npz)["arr_0"].shape == (6, 4, 4, 3)
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert _finals(out) == _finals(tmp_path / "ref")
    assert not list(out.rglob(".*.tmp"))


def test_an_interrupted_npz_rename_and_a_damaged_npz_are_written_again(synthetic_plugin, tmp_path, monkeypatch):
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = [*SAMPLE, "-n", "6"]
    assert runner.invoke(app, ["-q", *args, "--out", str(ref)]).exit_code == 0
    real = os.replace

    def interrupted(src, dst):
        if str(dst).endswith(".npz") and Path(dst).parent.name != IDS_PARTS:  # the ADM npz, not a token-id part
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 130, res.output
    monkeypatch.setattr(os, "replace", real)
    assert not list(out.glob("*.npz")) and not list(out.glob(".*.tmp"))
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0 and "6 already there" in plain(res.output)
    assert _finals(out) == _finals(ref)
    # an npz damaged after the set was finished (a full disk, a bad copy) is not taken as up to date
    npz = next(out.glob("*.npz"))
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0 and "Nothing to do" not in res.output
    assert _finals(out) == _finals(ref)


@pytest.mark.slow
def test_torchrun_ranks_share_the_lock_and_refuse_together(tmp_path):
    """Rank 0 holds the lock for its job (test_sample.py's torchrun test: the job's own ranks are not shut out);
    when another process holds it, every rank stops with the sentence and nothing is written."""
    env = {k: v for k, v in os.environ.items() if k != "DD2_LOAD_PLUGINS"}  # the bundled teachers load
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "s"
    holder = _hold_lock(out)
    try:
        before = _snapshot(out)
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              "29533", "-m", "dd2cli", "sample", "--teacher", "var-digits", "-n", "8", "--device",
                              "cpu", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    finally:
        holder.kill()
        holder.wait()
    assert two.returncode != 0
    assert plain(two.stderr).count(f"Another dd2 sample is writing to {out};") == 2, two.stderr[-3000:]
    assert _snapshot(out) == before
