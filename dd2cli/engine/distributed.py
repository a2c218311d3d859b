"""Data parallelism under `torchrun` (gloo on CPU, NCCL on CUDA); a no-op in a single process.

Data parallel is torch's `DistributedDataParallel` (`data_parallel`): each trainable network is wrapped while
it trains, and the losses call the wrapper's forward. Rank 0 writes every file, except the shards of an FSDP
checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def data_parallel(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """`module` wrapped in torch's `DistributedDataParallel` (itself in a single process): calling the wrapper runs
    `module.forward`, and the backward pass that follows averages the gradients of the parameters that require
    one, bucket by bucket while it runs.

    Build the wrapper after fixing which parameters train, and build it again when that changes (VAR's head-only
    phase ends); calling `module` itself bypasses the wrapper (a frozen network, a forward without gradients).

    - `static_graph`: every update uses the same parameters; a family's backbone may hold some that never get a
      gradient (the bundled ones hold none), and the wrapper finds those in its first backward instead of
      searching the graph after every forward.
    - `gradient_as_bucket_view`: the gradients live in the all-reduce buckets, so data parallel costs no second
      copy of them (what `dd2 distill --dry-run` assumes).
    - buffers are not synchronised in each forward: they are constants here, equal on every rank from the start.
    """
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    buffers = {"forward_sync_buffers": False} if _ddp_has_forward_sync_buffers() else {"broadcast_buffers": False}
    return DistributedDataParallel(module, static_graph=True, gradient_as_bucket_view=True, **buffers)


def _ddp_has_forward_sync_buffers() -> bool:
    """Newer torch renames `broadcast_buffers` (and warns about the old name)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    return "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters


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
