"""Data parallelism under `torchrun` (gloo on CPU, NCCL on CUDA); a no-op in a single process.

Gradients are averaged in flat buckets while each backward pass runs (`overlapped_averaging`): what
DistributedDataParallel computes, written out so it works with the alternating optimisers and frozen networks
of stage 2 and with losses that call the networks' methods rather than their forward. Rank 0 writes every
file, except the shards of an FSDP checkpoint.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's weights."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


#: small gradients (norms, biases: most of a transformer's tensors, few of its floats) are all-reduced in flat
#: buckets of about this many bytes; a tensor of a quarter of that or more goes on its own (copying it into a
#: bucket would cost more than the call it saves). Every call is in flight at once.
BUCKET_BYTES = 25 * 1024 * 1024


def average_gradients(params, info: DistInfo, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average every rank's gradients (data parallel): large tensors all-reduced in place, small ones in flat
    buckets of one dtype and device, all collectives in flight together. The same sums as one blocking
    all-reduce per tensor, bit for bit (tests/test_distributed.py; benchmarks/bench_allreduce.py times both)."""
    if not info.enabled:
        return
    alone: list[torch.Tensor] = []
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.nbytes * 4 >= bucket_bytes:
            alone.append(g)
            continue
        groups = buckets.setdefault((g.dtype, g.device), [[]])
        if groups[-1] and sum(t.nbytes for t in groups[-1]) + g.nbytes > bucket_bytes:
            groups.append([])
        groups[-1].append(g)
    flats = [(grads, torch.cat([t.reshape(-1) for t in grads])) for groups in buckets.values() for grads in groups]
    works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True) for t in alone]
    works += [dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True) for _, flat in flats]
    for w in works:
        w.wait()
    for t in alone:
        t.div_(info.world_size)
    for grads, flat in flats:
        _average_back(grads, flat, info.world_size)


def _average_back(grads: list[torch.Tensor], flat: torch.Tensor, world_size: int) -> None:
    """Divide an all-reduced flat bucket by the world size and copy each gradient's slice back into it."""
    flat.div_(world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


class OverlappedAveraging:
    """Averages the gradients of `params` over the ranks while the backward pass that produces them runs, the way
    DistributedDataParallel does, without wrapping the networks (the losses call their `features` / `velocity`
    methods, which a DDP wrapper's forward would not see).

    The parameters that require a gradient are grouped once into buckets of about `bucket_bytes` (one dtype and
    device each; a tensor of a quarter of that or more alone), in reverse order: a backward pass produces the last
    layers' gradients first. A hook on each parameter counts its bucket down as its gradient is accumulated; a
    full bucket's all-reduce starts at once, while the backward goes on, and buckets start in the same order on
    every rank (a full bucket waits for the ones before it). `finish()` starts what is left (parameters the graph
    did not reach), waits, and writes the averages back. The sums are those of `average_gradients`, bit for bit.

        with overlapped_averaging(model.parameters(), info):
            loss.backward()
    """

    def __init__(self, params, info: DistInfo, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.info = info
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in reversed([p for p in params if p.requires_grad]):
            nbytes = p.numel() * p.element_size()
            last = self.buckets[-1] if self.buckets else None
            joins = (last is not None and nbytes * 4 < bucket_bytes and last[0].numel() * last[0].element_size() * 4
                     < bucket_bytes and (last[0].dtype, last[0].device) == (p.dtype, p.device)
                     and size + nbytes <= bucket_bytes)
            if joins:
                last.append(p)
                size += nbytes
            else:
                self.buckets.append([p])
                size = nbytes
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.waiting = [len(b) for b in self.buckets]
        self.started = 0  # buckets 0 .. started-1 have their all-reduce in flight
        self.in_flight: list[tuple[list[torch.Tensor], torch.Tensor, object]] = []
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for b in self.buckets for p in b]

    def _ready(self, p: torch.nn.Parameter) -> None:
        i = self.bucket_of[id(p)]
        self.waiting[i] -= 1
        while self.started < len(self.buckets) and self.waiting[self.started] <= 0:
            self._start(self.started)

    def _start(self, i: int) -> None:
        self.started = i + 1
        grads = [p.grad for p in self.buckets[i] if p.grad is not None]
        if not grads:  # (every rank ran the same graph: the same buckets are empty everywhere)
            return
        flat = grads[0] if len(grads) == 1 else torch.cat([g.reshape(-1) for g in grads])
        self.in_flight.append((grads, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))

    def finish(self) -> None:
        self.remove()
        while self.started < len(self.buckets):
            self._start(self.started)
        for grads, flat, work in self.in_flight:
            work.wait()
            if len(grads) > 1:
                _average_back(grads, flat, self.info.world_size)
            else:  # (reduced in place)
                flat.div_(self.info.world_size)
        self.in_flight = []

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


@contextmanager
def overlapped_averaging(params, info: DistInfo, bucket_bytes: int = BUCKET_BYTES) -> Iterator[None]:
    """Run a backward pass inside: its gradients of `params` are averaged over the ranks on exit (a no-op in one
    process). See `OverlappedAveraging`."""
    if not info.enabled:
        yield
        return
    averaging = OverlappedAveraging(params, info, bucket_bytes)
    try:
        yield
    except BaseException:
        averaging.remove()  # (the other ranks fail at their next collective; nothing to average)
        raise
    averaging.finish()


def average_gradients_per_tensor(params, info: DistInfo) -> None:
    """One all-reduce per tensor: the reference `average_gradients` is measured and tested against."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(info.world_size)


def average_scalar(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    # NCCL reduces CUDA tensors only
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item() / info.world_size)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- fully sharded data parallel (FSDP2) -------------------------------------------------------------
# `parallel = "fsdp"` shards parameters, gradients and optimiser state of the trainable networks over
# the ranks (for backbones whose three trainable copies plus Adam state do not fit one device).
# Its checkpoints are sharded too (torch.distributed.checkpoint, `engine.checkpoint`): each rank writes its
# own slices, and any number of ranks, or one process (`dd2 sample`, `dd2 export`), reads them back.

def shard_model(model: torch.nn.Module) -> None:
    """Shard an `ARDiffusion` in place: each block of every `ModuleList`, then backbone and head.

    The head is called through `condition()` as well as `forward()`; FSDP gathers parameters in
    forward hooks only, so that method is registered explicitly.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for part in (model.backbone, model.head):
        for sub in list(part.modules()):
            if isinstance(sub, torch.nn.ModuleList):
                for block in sub:
                    if any(True for _ in block.parameters()):
                        fully_shard(block)
        fully_shard(part)
    register_fsdp_forward_method(model.head, "condition")


def reshard(*modules: torch.nn.Module) -> None:
    """Put every FSDP unit back in its sharded state.

    A root unit keeps its gathered parameters after a forward pass (FSDP expects the backward to follow),
    and a unit whose parameters are frozen is never resharded by a backward; parameter-wise work (EMA,
    copies, state dicts) must see the sharded parameters the optimisers hold.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def _param_names(module: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def load_optimizer_state(module: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """A whole checkpoint's optimiser state (`Optimizer.state_dict()` layout, integer ids) into `opt`; when the
    run is sharded, every rank passes the complete state it read from disk and keeps its own slices."""
    if not sharded:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(module, opt)
    osd = {"state": {names[int(i)]: entry for i, entry in state["state"].items()},
           "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, opt, osd, options=StateDictOptions(full_state_dict=True))


def clip_sharded_gradients(params, max_norm: float) -> float:
    """Global-norm clipping over sharded (DTensor) gradients; returns the norm before clipping.

    The squared norms of the local shards are summed over ranks explicitly, so every rank scales by
    the same factor (what `clip_grad_norm_` computes on whole tensors: max_norm / (norm + 1e-6), at most 1).
    """
    local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
    sq = torch.stack([g.detach().float().pow(2).sum() for g in local]).sum()
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in local:
                g.mul_(coef)
    return norm
