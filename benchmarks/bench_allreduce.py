"""Data parallel: a backward pass and its gradient averaging, three ways side by side.

    python benchmarks/bench_allreduce.py                    # 2 gloo processes on this machine, a GPT-B-sized gradient set
    python benchmarks/bench_allreduce.py --params 20 --repeats 12
    python benchmarks/bench_allreduce.py --network var-digits --repeats 8   # a one-step generator's training step

Spawns `--procs` processes (gloo, loopback) and builds on each the same network: `--tensors` parameters holding
`--params` million floats in all, sized like a transformer's (many small norms and biases, a few large
matrices), whose backward is a fill; or, with `--network VARIANT`, the one-step generator dd2 would train on that
teacher (its backbone and a width-64 head), for `--steps` training steps (forward, backward, Adam). Each round
runs the backward passes and averages the gradients over the processes:

- `per-tensor`: a plain backward, then one blocking all-reduce per gradient;
- `ddp`: torch's DistributedDataParallel with its defaults;
- `dd2`: `dd2cli.engine.distributed.data_parallel`, what `dd2 distill` trains through (DistributedDataParallel with
  a static graph and gradients kept in its buckets).

Each round starts with another contender (whoever runs first after the barrier pays for refilled caches); the
median of `--repeats` rounds is printed, with the ratios, and whether the three give the same averages.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

CONTENDERS = ("per-tensor", "ddp", "dd2")


def _tensors(params_m: float, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    big = max(1, count // 4)  # a quarter are weight matrices holding ~all the floats, the rest norms and biases
    small_numel = 768
    big_numel = max(1, int((params_m * 1e6 - (count - big) * small_numel) / big))
    sizes = [big_numel if i % 4 == 0 else small_numel for i in range(count)]
    return [torch.randn(n, generator=g) for n in sizes]


class _Weights(torch.nn.Module):
    """Parameters of the gradient set's sizes and a forward that uses each once, scaled by the rank's factor (so
    the ranks' gradients differ and the average is a real one)."""

    def __init__(self, base: list[torch.Tensor]) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in base])

    def forward(self, scale: float) -> torch.Tensor:
        return sum((p * scale).sum() for p in self.ps)


def _generators(variant: str, rank: int):
    """A one-step generator per contender (the same weights), and a training step's inputs for this rank."""
    from dd2cli.networks import Generator, build_model
    from dd2cli.plugins import get_variant

    teacher = get_variant(variant).load()
    spec = teacher.spec
    nets = {name: Generator(build_model(teacher.new_backbone(), spec.latent_dim, 64, 2, seed=0)) for name in CONTENDERS}
    g = torch.Generator().manual_seed(rank)
    eps = torch.randn(4, spec.num_tokens, spec.latent_dim, generator=g)
    return nets, (eps, torch.arange(4) % spec.num_classes)


def _worker(rank: int, world: int, init_file: str, args, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dd2cli.engine.distributed import DistInfo, data_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if args.network:
        nets, inputs = _generators(args.network, rank)
        steps = args.steps
    else:
        base = _tensors(args.params, args.tensors)
        nets, inputs, steps = {name: _Weights(base) for name in CONTENDERS}, (0.5 * (rank + 1),), 1
    opts = {name: torch.optim.Adam(net.parameters(), lr=1e-4) for name, net in nets.items()}
    callers = {"per-tensor": nets["per-tensor"], "ddp": DistributedDataParallel(nets["ddp"]),
               "dd2": data_parallel(nets["dd2"], DistInfo(rank=rank, world_size=world, local_rank=rank))}
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for r in range(args.repeats + 1):
        first = r % len(CONTENDERS)
        for name in CONTENDERS[first:] + CONTENDERS[:first]:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                nets[name].zero_grad(set_to_none=True)
                callers[name](*inputs).square().mean().backward()
                if name == "per-tensor":
                    for p in nets[name].parameters():
                        dist.all_reduce(p.grad)
                        p.grad.div_(world)
                if args.network:
                    opts[name].step()
            dist.barrier()
            if r:  # the first round warms up the connections (and lets DDP settle its buckets)
                times[name].append((time.perf_counter() - t0) / steps)
    grads = {name: [p.grad for p in nets[name].parameters()] for name in CONTENDERS}
    same = {name: all(torch.equal(a, b) for a, b in zip(grads["per-tensor"], grads[name])) for name in ("ddp", "dd2")}
    if rank == 0:
        queue.put({"times": times, "same": same})
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--params", type=float, default=110.0, help="Million floats in all (GPT-B: ~110).")
    ap.add_argument("--tensors", type=int, default=150, help="How many gradient tensors (GPT-B: ~150).")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--network", default=None, metavar="VARIANT",
                    help="Time training steps of the one-step generator of this teacher instead (e.g. var-digits).")
    ap.add_argument("--steps", type=int, default=20, help="With --network: training steps per round.")
    args = ap.parse_args()
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, args.procs, init, args, queue)) for r in range(args.procs)]
        for p in procs:
            p.start()
        out = queue.get()
        for p in procs:
            p.join()
    med = {name: statistics.median(out["times"][name]) for name in CONTENDERS}
    what = (f"{args.network}'s one-step generator, a training step" if args.network else
            f"{args.tensors} tensors, {args.params:g} M floats, backward + averaging")
    print(f"{args.procs} gloo processes, {what}, median of {args.repeats}")
    print(f"  one all-reduce per tensor after the backward: {med['per-tensor'] * 1e3:8.1f} ms")
    print(f"  DistributedDataParallel, defaults:            {med['ddp'] * 1e3:8.1f} ms   "
          f"{med['per-tensor'] / med['ddp']:.2f}x per-tensor's speed")
    print(f"  dd2 data_parallel (what dd2 distill uses):    {med['dd2'] * 1e3:8.1f} ms   "
          f"{med['per-tensor'] / med['dd2']:.2f}x per-tensor's speed, {med['ddp'] / med['dd2']:.2f}x DDP defaults'")
    print(f"  same averages as per-tensor, bit for bit: ddp {out['same']['ddp']}, dd2 {out['same']['dd2']}")


if __name__ == "__main__":
    main()
