"""Data parallel (DistributedDataParallel over 2 gloo processes) and resuming a run on another number of processes."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

DRIVER = str(Path(__file__).parent / "distill_driver.py")


def _average_per_tensor(params, world: int) -> None:
    """The reference: one blocking all-reduce per gradient, then the division."""
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _wrapped_vs_reference(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from dd2cli.engine.distributed import DistInfo, data_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)  # the same weights on every rank
            self.a, self.b, self.c = torch.nn.Linear(6, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 3)
            self.frozen = torch.nn.Linear(6, 6).requires_grad_(False)
            self.half_w = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
            self.unused = torch.nn.Parameter(torch.zeros(5))  # (a backbone's output head: never in the loss)

        def forward(self, x):
            h = self.b(torch.tanh(self.a(self.frozen(x)))).relu()
            return self.c(h) * self.half_w.float()

    wrapped_net, reference = Net(), Net()
    wrapped = data_parallel(wrapped_net, info)
    steps = []
    for step in range(4):
        if step == 2:  # which parameters train changes (a head-only phase ending the other way round): rebuild
            for net in (wrapped_net, reference):
                net.a.requires_grad_(False)
            wrapped = None
            wrapped = data_parallel(wrapped_net, info)
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank))  # every rank its own batch
        for net in (wrapped_net, reference):
            net.zero_grad(set_to_none=True)
        wrapped(x).pow(2).mean().backward()
        reference(x).pow(2).mean().backward()
        _average_per_tensor(reference.parameters(), world)
        steps.append({"wrapped": [p.grad.clone() if p.grad is not None else None for p in wrapped_net.parameters()],
                      "reference": [p.grad for p in reference.parameters()]})
        with torch.no_grad():
            for net in (wrapped_net, reference):
                for p in net.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
            wrapped_net(x)  # the network itself, between updates (a sample grid, EMA): no collective
        # and frozen as the guidance is in a generator update: a gradient only into its input, nothing averaged
        wrapped_net.requires_grad_(False)
        x.requires_grad_(True)
        wrapped_net(x).sum().backward()
        wrapped_net.requires_grad_(True).frozen.requires_grad_(False)
        if step >= 2:
            wrapped_net.a.requires_grad_(False)
    if rank == 0:
        torch.save({"steps": steps, "kind": type(wrapped).__name__}, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


def test_data_parallel_wrapper_averages_exactly_like_one_all_reduce_per_tensor(tmp_path):
    """dd2's data parallel is torch's DistributedDataParallel, set up for how dd2 trains: frozen parameters,
    a parameter no loss reaches, mixed dtypes, a rebuild when which parameters train changes, and the network
    used without the wrapper in between. Its gradients are the per-tensor averages, bit for bit (2 ranks: the
    division by 2 is exact, before or after the sum)."""
    import torch.multiprocessing as mp

    init = tempfile.mktemp(dir=tmp_path)
    mp.start_processes(_wrapped_vs_reference, args=(2, init, str(tmp_path)), nprocs=2, start_method="spawn")
    out = torch.load(tmp_path / "results.pt", weights_only=True)
    assert out["kind"] == "DistributedDataParallel" and len(out["steps"]) == 4
    for i, step in enumerate(out["steps"]):
        assert len(step["wrapped"]) == len(step["reference"]) == 10
        for a, b in zip(step["reference"], step["wrapped"]):
            assert (a is None) == (b is None), i
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), i
        # own parameters first (half_w, unused), then a, b, c, frozen (weight and bias each)
        a_trains = i < 2
        assert [g is None for g in step["wrapped"]] == [False, True] + [not a_trains] * 2 + [False] * 4 + [True] * 2


def test_one_process_trains_the_network_itself():
    from dd2cli.engine.distributed import DistInfo, data_parallel

    net = torch.nn.Linear(2, 2)
    assert data_parallel(net, DistInfo()) is net


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


@pytest.mark.slow
def test_the_data_parallel_benchmark_runs_and_its_contenders_agree():
    bench = Path(__file__).parent.parent / "benchmarks" / "bench_allreduce.py"
    proc = subprocess.run([sys.executable, str(bench), "--params", "0.5", "--tensors", "20", "--repeats", "1"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same averages as per-tensor, bit for bit: ddp True, dd2 True" in proc.stdout, proc.stdout
