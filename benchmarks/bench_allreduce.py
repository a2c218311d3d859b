"""Gradient averaging for data parallel: one all-reduce per tensor vs dd2's `average_gradients` (small tensors in
flat buckets, large ones in place, every call in flight at once).

    python benchmarks/bench_allreduce.py                    # 2 gloo processes on this machine, a GPT-B-sized gradient set
    python benchmarks/bench_allreduce.py --params 30 --tensors 200

Spawns `--procs` processes (gloo, loopback), builds the same list of gradient tensors on each (`--tensors`
tensors holding `--params` million floats in all, sizes like a transformer's: many small norms and biases, a
few large matrices), and times the ways side by side, alternating, median of `--repeats`; also checks they give
the same averages bit for bit. Prints the ratios (> 1: faster than one blocking all-reduce per tensor). Then a
backward pass with its averaging, through torch's DistributedDataParallel, through dd2's `overlapped_averaging`
(buckets reduced while the backward runs: what `dd2 distill` does) and through a plain backward followed by
`average_gradients`, side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch


def _tensors(params_m: float, count: int):
    import torch

    g = torch.Generator().manual_seed(0)
    big = max(1, count // 4)  # a quarter are weight matrices holding ~all the floats, the rest norms and biases
    small_numel = 768
    big_numel = max(1, int((params_m * 1e6 - (count - big) * small_numel) / big))
    sizes = [big_numel if i % 4 == 0 else small_numel for i in range(count)]
    return [torch.randn(n, generator=g) for n in sizes]


def _worker(rank: int, world: int, init_file: str, params_m: float, count: int, repeats: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from dd2cli.engine.distributed import DistInfo, average_gradients, average_gradients_per_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank)
    base = _tensors(params_m, count)
    params = [SimpleNamespace(grad=None) for _ in base]  # what average_gradients reads of a parameter
    times = {"per-tensor": [], "bucketed": [], "async": []}

    def per_tensor_async(params, info):  # every all-reduce in flight at once, no copies
        works = [dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True) for p in params if p.grad is not None]
        for w in works:
            w.wait()
        for p in params:
            if p.grad is not None:
                p.grad.div_(info.world_size)

    results = {}
    for r in range(repeats + 1):
        for name, fn in (("per-tensor", average_gradients_per_tensor), ("bucketed", average_gradients),
                         ("async", per_tensor_async)):
            for p, t in zip(params, base):
                p.grad = t * (rank + 1)
            dist.barrier()
            t0 = time.perf_counter()
            fn(params, info)
            dist.barrier()
            if r:  # the first round warms up the connections
                times[name].append(time.perf_counter() - t0)
            results[name] = [p.grad.clone() for p in params]
    same = all(torch.equal(a, b) for a, b in zip(results["per-tensor"], results["bucketed"]))
    times.update(_backward_with_averaging(base, info, repeats))
    if rank == 0:
        queue.put({"times": times, "same": same})
    dist.destroy_process_group()


class _Weights(torch.nn.Module):
    """Parameters of the gradient set's sizes and a forward that uses each once (its backward is a fill)."""

    def __init__(self, base) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in base])

    def forward(self):
        return sum((p * 0.5).sum() for p in self.ps)


def _backward_with_averaging(base, info, repeats: int) -> dict[str, list[float]]:
    """A backward pass and its gradient averaging: torch's DistributedDataParallel (its buckets reduced while the
    backward runs), dd2's `overlapped_averaging` (the same, what `dd2 distill` uses), and a plain backward followed
    by `average_gradients`, side by side."""
    import contextlib

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dd2cli.engine.distributed import average_gradients, overlapped_averaging

    plain, overlapped = _Weights(base), _Weights(base)
    ddp = DistributedDataParallel(_Weights(base))
    contenders = [("ddp", ddp), ("dd2 overlapped", overlapped), ("dd2 backward", plain)]
    times = {name: [] for name, _ in contenders}
    for r in range(repeats + 1):
        # each round starts with another contender: whoever runs first after the barrier pays for caches refilled
        first = r % len(contenders)
        for name, module in contenders[first:] + contenders[:first]:
            module.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            during = overlapped_averaging(module.parameters(), info) if name == "dd2 overlapped" else \
                contextlib.nullcontext()
            with during:
                module().backward()
            if name == "dd2 backward":
                average_gradients(plain.parameters(), info)
            dist.barrier()
            if r:
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--params", type=float, default=110.0, help="Million floats in all (GPT-B: ~110).")
    ap.add_argument("--tensors", type=int, default=150, help="How many gradient tensors (GPT-B: ~150).")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, args.procs, init, args.params, args.tensors, args.repeats, queue))
                 for r in range(args.procs)]
        for p in procs:
            p.start()
        out = queue.get()
        for p in procs:
            p.join()
    per, buck = statistics.median(out["times"]["per-tensor"]), statistics.median(out["times"]["bucketed"])
    print(f"{args.procs} gloo processes, {args.tensors} tensors, {args.params:g} M floats, median of {args.repeats}")
    print(f"  one all-reduce per tensor: {per * 1e3:8.1f} ms")
    print(f"  dd2 (average_gradients):   {buck * 1e3:8.1f} ms   ratio {per / buck:.2f}x")
    asy = statistics.median(out["times"]["async"])
    print(f"  per tensor, all in flight: {asy * 1e3:8.1f} ms   ratio {per / asy:.2f}x")
    print(f"  same averages bit for bit: {out['same']}")
    ddp = statistics.median(out["times"]["ddp"])
    print(f"  backward + averaging, {'DistributedDataParallel:':<36} {ddp * 1e3:8.1f} ms")
    for name, label in (("dd2 overlapped", "dd2 overlapped_averaging (distill)"), ("dd2 backward", "dd2 average_gradients after it")):
        ours = statistics.median(out["times"][name])
        print(f"  backward + averaging, {label + ':':<36} {ours * 1e3:8.1f} ms   ratio {ddp / ours:.2f}x "
              f"(> 1: dd2 faster)")


if __name__ == "__main__":
    main()
