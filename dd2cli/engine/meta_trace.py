"""Tracing a pass on the meta device for the memory plan: the bytes autograd saves for the backward pass, with
shapes only (no storage, no arithmetic), each repeated block of a network traced once and replayed."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class _ShapesOnly(TorchDispatchMode):
    """On the meta device only shapes are computed, but bicubic upsampling (VAR's input maps) has no meta kernel:
    its decomposition costs 0.1 s a call. Here it returns an empty result of the right shape at once."""

    _BICUBIC = (torch.ops.aten.upsample_bicubic2d.default, torch.ops.aten.upsample_bicubic2d.vec)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._BICUBIC and args[0].is_meta:
            x, size = args[0], args[1] if len(args) > 1 else kwargs.get("output_size")
            if size is None:
                factors = args[3] if len(args) > 3 else kwargs["scale_factors"]
                size = [int(math.floor(s * f)) for s, f in zip(x.shape[-2:], factors)]
            return x.new_empty((*x.shape[:-2], *size))
        return func(*args, **kwargs)


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash or memory-efficient, on CUDA and on CPU alike) keeps for the backward
    pass: its inputs, its output and one log-sum-exp per query. The meta device runs the reference path instead,
    which would keep the N × N attention weights of every head."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        if q.dim() == 4:  # laid out (batch, query, head, channel) as the kernels write it: the usual transpose back
            B, H, L, _ = q.shape  # and reshape to (batch, query, width) is then a view, not a copy
            out = q.new_empty((B, L, H, v.shape[-1])).transpose(1, 2)
        else:
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        kept = (q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        ctx.save_for_backward(*kept, *(() if mask is None else (mask,)))
        return out

    @staticmethod
    def backward(ctx, grad):  # (a trace never runs the backward pass)
        raise NotImplementedError


class _FusedAttentionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            kwargs = kwargs or {}
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            return _FusedAttention.apply(*args[:3], mask if isinstance(mask, torch.Tensor) else None)
        return func(*args, **(kwargs or {}))


class Trace:
    """Bytes saved for backward while a function runs: each storage once, parameters never (they are counted as
    weights), split by where they were saved (inside a network's layers or not, inside a backbone or not).

    The blocks of a network's `nn.ModuleList`s are mostly copies of one another. On the meta device every operation
    runs Python shape code (about a millisecond each), so a 20-block backbone costs seconds a pass. A block whose
    layout (class, printed structure, parameter and buffer shapes) and call (argument shapes, grad mode) match an
    earlier call is therefore not run again: it replays what that call saved (the storages made inside it, and the
    same argument positions) and returns fresh outputs of the same layout. `replay=False` runs every block."""

    def __init__(self, networks: list[nn.Module], backbones: list[nn.Module], params: set[int],
                 replay: bool = True) -> None:
        self.params, self.seen = params, {}
        self.depth = {"network": 0, "backbone": 0}
        self.saves: list[int] | None = None  # storages saved (seen before or not) while a block is recorded
        self.memo: dict[tuple, tuple | None] = {}
        self.handles = [h for m in networks for h in self._count_inside(m, "network")]
        self.handles += [h for m in backbones for h in self._count_inside(m, "backbone")]
        blocks = {id(b): b for m in networks for sub in m.modules() if isinstance(sub, nn.ModuleList)
                  and len(sub) > 1 for b in sub} if replay else {}
        self.blocks = list(blocks.values())
        self.patched: list[nn.Module] = []

    def _count_inside(self, module: nn.Module, where: str):
        def enter(*_):
            self.depth[where] += 1

        def leave(*_):
            self.depth[where] -= 1

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in self.params:
            if self.saves is not None:
                self.saves.append(id(base))
            if id(base) not in self.seen:
                self._add(id(base), base, base.numel() * base.element_size())
        return t

    def _add(self, key: Any, base: Any, nbytes: int) -> None:
        self.seen[key] = (base, nbytes, self.depth["network"] > 0, self.depth["backbone"] > 0)

    # -- repeated blocks --

    def _replay_repeats(self, block: nn.Module) -> None:
        layout = (type(block), repr(block), block.training,
                  tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in block.named_parameters()),
                  tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers()))
        forward = block.forward

        def call(*args, **kwargs):
            tensors: list[torch.Tensor] = []
            key = (layout, torch.is_grad_enabled(), _call_key((args, kwargs), tensors))
            if key not in self.memo:
                return self._record(key, forward, tensors, args, kwargs)
            if self.memo[key] is None or self.saves is not None:  # not replayable, or inside a block being recorded
                return forward(*args, **kwargs)
            return self._replay(self.memo[key], tensors)

        block.forward = call  # an instance attribute: nn.Module's __call__ (and its hooks) still runs around it
        self.patched.append(block)

    def _record(self, key: tuple, forward: Callable, tensors: list[torch.Tensor], args, kwargs):
        outer, self.saves = self.saves, []
        before = set(self.seen)
        try:
            out = forward(*args, **kwargs)
        finally:
            saves, self.saves = self.saves, outer
            if outer is not None:
                outer.extend(saves)
        arg_bases = [id(_base(t)) for t in tensors]
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        out_bases = [id(_base(o)) for o in outs if isinstance(o, torch.Tensor)]
        if len(out_bases) != len(outs) or set(out_bases) & set(arg_bases) or outer is not None:
            self.memo[key] = None  # returns something else than new tensors (or runs inside a recorded block)
            return out
        saved = set(saves)
        at_args = tuple(i for i, b in enumerate(arg_bases) if b in saved)
        at_outs, inside = [], 0
        for k in set(self.seen) - before:
            if k in arg_bases:
                continue  # counted again at a replay when that argument is new there
            if k in out_bases:
                at_outs.append((out_bases.index(k), self.seen[k][1]))
            else:
                inside += self.seen[k][1]
        layouts = tuple(_layout(o) for o in outs)
        self.memo[key] = (at_args, tuple(at_outs), inside, layouts,
                          type(out) if isinstance(out, (tuple, list)) else None)
        return out

    def _replay(self, memo: tuple, tensors: list[torch.Tensor]):
        at_args, at_outs, inside, layouts, container = memo
        for i in at_args:
            base = _base(tensors[i])
            if id(base) not in self.params and id(base) not in self.seen:
                self._add(id(base), base, base.numel() * base.element_size())
        outs = [_like(layout) for layout in layouts]
        for j, nbytes in at_outs:
            base = _base(outs[j])
            self._add(id(base), base, nbytes)
        if inside:
            self._add(("replayed", len(self.seen)), None, inside)
        return outs[0] if container is None else container(outs)

    def run(self, fn: Callable[[], Any]) -> tuple[int, int, int]:
        try:
            for block in self.blocks:
                if "forward" not in vars(block):  # (a forward of its own already: left alone)
                    self._replay_repeats(block)
            with _ShapesOnly(), _FusedAttentionMode(), torch.autograd.graph.saved_tensors_hooks(self.pack,
                                                                                            lambda t: t):
                fn()
        finally:
            for h in self.handles:
                h.remove()
            for block in self.patched:
                del block.forward
            self.patched = []
        net = sum(n for _, n, inside, _ in self.seen.values() if inside)
        other = sum(n for _, n, inside, _ in self.seen.values() if not inside)
        backbone = sum(n for _, n, _, bb in self.seen.values() if bb)
        return net, other, backbone


def _base(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def _call_key(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable description of a block's arguments; their tensors are collected in order into `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device.type, value.requires_grad,
                value._base is not None)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_call_key(v, tensors) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _call_key(v, tensors)) for k, v in value.items()))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    return ("object", id(value))  # (the same object again, e.g. a shared cache, or no replay)


def _layout(t: torch.Tensor) -> tuple:
    base = _base(t)
    view = None if t._base is None else (tuple(t.shape), t.stride(), t.storage_offset())
    return tuple(base.shape), base.stride(), base.dtype, base.device, t.requires_grad, view


def _like(layout: tuple) -> torch.Tensor:
    """A fresh tensor laid out as a block's output was (a view of a fresh base where it was a view)."""
    shape, stride, dtype, device, requires_grad, view = layout
    base = torch.empty_strided(shape, stride, dtype=dtype, device=device, requires_grad=requires_grad)
    return base if view is None else base.as_strided(*view)


class InitOnMeta(TorchDispatchMode):
    """Building a skeleton on the meta device: in-place initialisers (normal_, uniform_, fill_, ...) change no shape,
    so they return their tensor at once instead of running the meta device's slow reference code."""

    _SHAPE_CHANGING = {"resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_", "transpose_", "t_"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.endswith("_") and name not in self._SHAPE_CHANGING and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))
