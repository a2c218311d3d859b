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


def _overlapped_vs_after(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from dd2cli.engine.distributed import DistInfo, OverlappedAveraging, average_gradients_per_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank)

    def net():
        torch.manual_seed(0)  # the same weights on every rank
        m = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 64), "b": torch.nn.Linear(64, 64), "c": torch.nn.Linear(64, 3),
                                 "frozen": torch.nn.Linear(6, 6)})
        m.frozen.requires_grad_(False)
        m.half_w = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
        m.unused = torch.nn.Parameter(torch.zeros(5))
        return m

    def loss(m, x):
        h = m.b(torch.tanh(m.a(m.frozen(x)))).relu()
        return (m.c(h) * m.half_w.float()).pow(2).mean()

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + rank))  # every rank its own batch
    after, during = net(), net()
    loss(after, x).backward()
    average_gradients_per_tensor(after.parameters(), info)
    averaging = OverlappedAveraging(during.parameters(), info, bucket_bytes=4096)
    loss(during, x).backward()
    started_in_backward = len(averaging.in_flight)
    averaging.finish()
    if rank == 0:
        torch.save({"after": [p.grad for p in after.parameters()], "during": [p.grad for p in during.parameters()],
                    "buckets": len(averaging.buckets), "started": started_in_backward}, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


def test_averaging_while_the_backward_runs_equals_averaging_after_it_bit_for_bit(tmp_path):
    import torch.multiprocessing as mp

    init = tempfile.mktemp(dir=tmp_path)
    mp.start_processes(_overlapped_vs_after, args=(2, init, str(tmp_path)), nprocs=2, start_method="spawn")
    out = torch.load(tmp_path / "results.pt", weights_only=True)
    assert len(out["after"]) == len(out["during"]) == 10
    for a, b in zip(out["after"], out["during"]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b)
    # frozen weights and bias, and the parameter no loss reaches, got no gradient; the others were averaged
    assert [g is None for g in out["during"]] == [False, True] + [False] * 6 + [True, True]  # own params first
    assert out["buckets"] >= 3 and out["started"] >= 1  # several buckets, some on their way before backward ended


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
def test_a_run_resumes_on_another_number_of_processes(tmp_path, synthetic_plugin, mode, before, after, port):
    """A checkpoint holds the weights and Adam states (whole, or an FSDP run's shards: one file per rank) and
    every rank's random streams: a run stopped in stage 2 continues with more or fewer processes from the same
    weights (a rank the checkpoint has no streams for starts its own from the seed)."""
    from dd2cli.engine.checkpoint import Checkpoint, latest_checkpoint

    env, run = _env(), tmp_path / "run"
    common = ["--set", "stage1.steps=3", "--set", "stage1.batch_size=8", "--set", "stage2.batch_size=8",
              "--set", "head.width=32", "--set", "run.sample_every=0", "--set", "run.log_every=1",
              "--set", "flow_init.steps=0", "--set", f"parallel={mode}", "--device", "cpu"]
    _distill(["--teacher", "synthetic-corr", "--out", str(run), "--set", "stage2.steps=2", *common], env, before, port)
    stopped = latest_checkpoint(run)
    assert (stopped.stage, stopped.step) == (2, 2)
    _assert_layout(stopped, sharded_by=before if mode == "fsdp" else 1)
    _distill(["--resume", str(run), "--set", "stage2.steps=4"], env, after, port)
    done = latest_checkpoint(run)
    assert (done.stage, done.step) == (2, 4)
    _assert_layout(done, sharded_by=after if mode == "fsdp" else 1)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stage2 = [r for r in rows if r["stage"] == 2]
    assert [r["step"] for r in stage2] == [1, 2, 3, 4]
    assert all(abs(r["loss_csd"]) < 1e3 and abs(r["loss_fcs"]) < 1e3 for r in stage2)
    # the resumed updates started from the stopped weights and moved them; both read back whole in one process
    a, b = Checkpoint(run / "checkpoints" / "stage2-0000002"), done
    for name in ("generator", "ema", "guidance"):
        wa, wb = a.module_state(name), b.module_state(name)
        assert set(wa) == set(wb) and all(wa[k].shape == wb[k].shape for k in wa)
    assert any(not torch.equal(v, b.module_state("generator")[k]) for k, v in a.module_state("generator").items())
    # the one-step generator of a (possibly sharded) run loads as a whole module, as dd2 sample / export load it
    from dd2cli.engine.runs import load_generator_from_run

    gen, teacher, _ = load_generator_from_run(run)
    with torch.no_grad():
        q = gen(torch.randn(2, teacher.spec.num_tokens, teacher.spec.latent_dim), torch.tensor([0, 1]))
    assert torch.isfinite(q).all()


def _assert_layout(ckpt, sharded_by: int) -> None:
    """An FSDP checkpoint written by N ranks is N files of shards plus an index; any other is whole safetensors."""
    files = sorted(p.name for p in ckpt.path.rglob("*") if p.is_file())
    if sharded_by > 1:
        assert ckpt.sharded and "modules.safetensors" not in files, files
        assert [f for f in files if f.endswith(".distcp")] == [f"__{r}_0.distcp" for r in range(sharded_by)], files
        assert ".metadata" in files and "rng.safetensors" in files
    else:
        assert not ckpt.sharded and "modules.safetensors" in files and "optim.safetensors" in files, files


@pytest.mark.slow
def test_a_sharded_run_resumed_on_as_many_processes_continues_exactly(tmp_path, synthetic_plugin):
    """FSDP over 2 processes, killed during stage 1's head-only phase and stopped again in stage 2, resumed from its
    sharded checkpoints each time (every rank reading only its own slices), ends with the same weights as the
    same run uninterrupted: weights, Adam states (a frozen backbone's absent ones too) and random streams all
    come back."""
    from dd2cli.engine.checkpoint import latest_checkpoint

    env = _env()
    common = ["--set", "stage1.batch_size=8", "--set", "stage2.batch_size=8", "--set", "head.width=32",
              "--set", "run.sample_every=0", "--set", "run.checkpoint_every=2", "--set", "stage1.head_only_steps=3",
              "--set", "stage1.steps=6", "--set", "flow_init.steps=2", "--set", "parallel=fsdp", "--device", "cpu"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _distill(["--teacher", "synthetic-corr", "--out", str(whole), "--set", "stage2.steps=4", *common], env, 2, 29536)
    # killed with stage-1 step 4's checkpoint written but not yet the latest: the run resumes from step 2
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29537", DRIVER, "--quiet", "distill", "--teacher", "synthetic-corr", "--out", str(parts),
                             "--set", "stage2.steps=4", *common],
                            env={**env, "DD2_TEST_KILL_INSIDE": "after-stage1-0000004:latest.json"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0
    assert (latest_checkpoint(parts).stage, latest_checkpoint(parts).step) == (1, 2)
    assert latest_checkpoint(parts).sharded
    _distill(["--resume", str(parts), "--set", "stage2.steps=2"], env, 2, 29538)
    assert latest_checkpoint(parts).sharded and latest_checkpoint(parts).step == 2
    _distill(["--resume", str(parts), "--set", "stage2.steps=4"], env, 2, 29539)
    a, b = latest_checkpoint(whole), latest_checkpoint(parts)
    assert (a.stage, a.step) == (b.stage, b.step) == (2, 4) and a.sharded and b.sharded
    for name in ("generator", "ema", "guidance"):
        wa, wb = a.module_state(name), b.module_state(name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
