"""Data-parallel gradient averaging (2 gloo processes) and resuming a run on another number of processes."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

DRIVER = str(Path(__file__).parent / "distill_driver.py")


def _average_both_ways(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from dd2cli.engine.distributed import DistInfo, average_gradients, average_gradients_per_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank)
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own gradients
    shapes = [(3,), (50, 40), (7,), (1000,), (2, 3, 4), (0,), (300, 300), (5,)]
    dtypes = [torch.float32, torch.float32, torch.float16, torch.float32, torch.bfloat16, torch.float32,
              torch.float32, torch.float64]
    grads = [torch.randn(s, generator=g).to(dt) for s, dt in zip(shapes, dtypes)]
    results = {}
    for name, fn in (("reference", average_gradients_per_tensor), ("dd2", average_gradients)):
        params = [SimpleNamespace(grad=t.clone()) for t in grads] + [SimpleNamespace(grad=None)]
        # a bucket size that makes every kind: tensors alone, several buckets of one dtype, one per dtype
        fn(params, info, **({"bucket_bytes": 4096} if name == "dd2" else {}))
        results[name] = [p.grad for p in params]
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


def test_bucketed_in_flight_averaging_equals_one_all_reduce_per_tensor_bit_for_bit(tmp_path):
    import torch.multiprocessing as mp

    init = tempfile.mktemp(dir=tmp_path)
    mp.start_processes(_average_both_ways, args=(2, init, str(tmp_path)), nprocs=2, start_method="spawn")
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    ref, got = results["reference"], results["dd2"]
    assert got[-1] is None and ref[-1] is None
    for a, b in zip(ref[:-1], got[:-1]):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    # an average of rank 0's and rank 1's gradients (which differ): rank 0's own first tensor was randn(3) of seed 100
    own = torch.randn((3,), generator=torch.Generator().manual_seed(100))
    assert not torch.equal(got[0], own) and torch.allclose(got[0], (own + torch.randn((3,), generator=torch.Generator()
                                                                                        .manual_seed(101))) / 2)


def _env():
    env = {**os.environ, "DD2_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    env.pop("DD2_TEST_KILL_INSIDE", None)
    return env


def _distill(args, env, nproc, port=None):
    cmd = [sys.executable, DRIVER]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), DRIVER]
    proc = subprocess.run([*cmd, "--quiet", "distill", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("mode, before, after, port", [("ddp", 2, 1, 29531), ("ddp", 1, 2, 29532),
                                                       ("fsdp", 2, 1, 29533), ("fsdp", 1, 2, 29534)])
def test_a_run_resumes_on_another_number_of_processes(tmp_path, mode, before, after, port):
    """Checkpoints hold whole (unsharded) weights and Adam states, and every rank's random streams: a run
    stopped in stage 2 continues with more or fewer processes from the same weights (a rank the checkpoint has
    no streams for starts its own from the seed)."""
    from dd2cli.engine.checkpoint import latest_checkpoint

    env, run = _env(), tmp_path / "run"
    common = ["--set", "stage1.steps=3", "--set", "stage1.batch_size=8", "--set", "stage2.batch_size=8",
              "--set", "head.width=32", "--set", "run.sample_every=0", "--set", "run.log_every=1",
              "--set", "flow_init.steps=0", "--set", f"parallel={mode}", "--device", "cpu"]
    _distill(["--teacher", "synthetic-corr", "--out", str(run), "--set", "stage2.steps=2", *common], env, before, port)
    stopped = latest_checkpoint(run)
    assert (stopped.stage, stopped.step) == (2, 2)
    _distill(["--resume", str(run), "--set", "stage2.steps=4"], env, after, port)
    done = latest_checkpoint(run)
    assert (done.stage, done.step) == (2, 4)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stage2 = [r for r in rows if r["stage"] == 2]
    assert [r["step"] for r in stage2] == [1, 2, 3, 4]
    assert all(abs(r["loss_csd"]) < 1e3 and abs(r["loss_fcs"]) < 1e3 for r in stage2)
    # the resumed updates started from the stopped weights and moved them
    from dd2cli.files import load_safetensors

    a, _ = load_safetensors(run / "checkpoints" / "stage2-0000002" / "modules.safetensors")
    b, _ = load_safetensors(done.path / "modules.safetensors")
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a if k.startswith("generator."))
