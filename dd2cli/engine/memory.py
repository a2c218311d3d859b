"""The memory plan of a distillation (`dd2 distill --dry-run`): what each stage holds per rank, known before any
weight file is downloaded or any GPU rented.

- Weights, gradients and Adam states are counted on the networks themselves, built on the meta device (shapes
  without storage): the teacher from its variant's skeleton, ψ / generator / EMA / guidance by `build_model`.
- Activations are the tensors autograd saves for the backward pass of one update, traced on the meta device
  while the stage's own loss function runs (`gts_loss`, the generator's forward, `fcs_loss`, `csd_loss`), times
  `ACTIVATION_FACTOR` for the working memory around them (gradients in flight, temporaries), a factor measured
  against CPU peaks at real shapes (benchmarks/memory_plan.py; benchmarks/RESULTS.md has the comparison).
- bf16 autocast stores what the networks' layers save in 2 bytes; the closed-form score stays fp32. That split
  is traced too; a GPU measurement of it is still to come (autocast keeps norms and softmax in fp32, so the bf16
  column is a lower bound).
- Activation checkpointing (`activation_checkpointing = true`) keeps the backbone's input and recomputes the
  backbone as one segment in the backward pass: the peak is the larger of what stays saved and the backbone's
  own activations.

All sizes are in GB (10⁹ bytes), as GPU memory is sold.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..config import to_dict
from ..errors import DD2Error
from ..losses import TimestepSpec, csd_loss, fcs_loss, gts_loss
from ..networks import ARDiffusion, Generator, build_model
from ..settings import DistillSettings
from ..teachers import Variant
from .meta_trace import InitOnMeta, Trace

GB = 10**9

#: measured CPU peak of one update, less the process's start-up footprint and the weights, gradients and
#: optimiser states, divided by the traced saved-tensor bytes: the working memory around the saved activations
#: (benchmarks/memory_plan.py measures it at real shapes, batch 1, 2 and 4; benchmarks/RESULTS.md)
ACTIVATION_FACTOR = 1.0

PRECISIONS = ("fp32", "bf16")
PARALLEL = ("ddp", "fsdp")


def parse_size(text: str) -> int:
    """'80GB', '80 GB', '80G', '80' (GB) or '74.5GiB' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*", text.lower())
    if not m:
        raise DD2Error(f"--gpu-memory '{text}' is not a size; write it like 80GB (10^9 bytes) or 80GiB.")
    unit = 2**30 if m.group(2) == "gib" else GB
    return int(float(m.group(1)) * unit)


@dataclass(frozen=True)
class Network:
    """One network of the run: its parameter count and what it occupies as stored (parameters and buffers)."""

    name: str
    params: int
    weight_bytes: int
    largest_unit: int = 0  # bytes of its largest FSDP unit (one block), gathered whole while it runs

    @property
    def adam_bytes(self) -> int:  # exp_avg and exp_avg_sq, fp32
        return 2 * 4 * self.params

    @property
    def grad_bytes(self) -> int:
        return 4 * self.params


@dataclass(frozen=True)
class Activations:
    """Bytes autograd saves per sample for one update of a stage."""

    network: int  # saved inside the networks' layers (2 bytes per value under bf16 autocast)
    other: int  # saved outside them: the closed-form score, the losses (fp32 always)
    backbone: int  # the part saved inside the backbones (recomputed under activation checkpointing)
    kept_with_checkpointing: int  # saved with activation checkpointing on (the rest is recomputed)

    def per_sample(self, precision: str, checkpointing: bool) -> float:
        if checkpointing:  # the backbone's activations come back one segment at a time in the backward pass
            kept = self.kept_with_checkpointing
            return self._scaled(precision, max(kept, self.backbone), share=self.network / max(1, self.total))
        return self._scaled(precision, self.total, share=self.network / max(1, self.total))

    @property
    def total(self) -> int:
        return self.network + self.other

    @staticmethod
    def _scaled(precision: str, nbytes: float, share: float) -> float:
        if precision == "bf16":
            nbytes = nbytes * (1 - share) + nbytes * share / 2
        return ACTIVATION_FACTOR * nbytes


@dataclass(frozen=True)
class Holding:
    network: str
    role: str  # "frozen" (weights only), "trained" (+ gradients, Adam), "copy" (weights, sharded with the run),
    #            "whole copy" (weights, never sharded)


@dataclass(frozen=True)
class StagePlan:
    key: str
    title: str
    batch: int  # global
    holds: tuple[Holding, ...]
    updates: tuple[tuple[str, Activations], ...]  # the stage's kinds of update; one runs at a time


@dataclass
class RankMemory:
    """One rank at the peak of a stage: what it holds throughout, plus the larger of the activations of an update
    (in the forward and backward passes) and the optimiser step's temporaries (after them)."""

    weights: float
    grads: float
    optimizer: float
    per_sample: float  # activations per sequence
    batch: float  # sequences per rank
    gathered: float  # FSDP: units gathered whole while they run
    workspace: float  # the optimiser step's temporaries

    @property
    def held(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def activations(self) -> float:
        return self.gathered + self.batch * self.per_sample

    @property
    def total(self) -> float:
        return self.held + max(self.activations, self.workspace)

    def max_batch(self, budget: float) -> int:
        """The most sequences per rank that fit `budget` bytes (0: none)."""
        if self.held + self.workspace > budget or self.held + self.gathered > budget:
            return 0
        return int((budget - self.held - self.gathered) // self.per_sample) if self.per_sample > 0 else 1 << 30


@dataclass
class MemoryPlan:
    teacher: str
    nproc: int
    gpu_bytes: int | None
    settings: DistillSettings
    networks: dict[str, Network]
    stages: list[StagePlan] = field(default_factory=list)

    def per_rank(self, stage: StagePlan, parallel: str, precision: str, checkpointing: bool) -> RankMemory:
        """What one rank holds at the peak of `stage` (its global batch split over the ranks)."""
        shards = self.nproc if parallel == "fsdp" and self.nproc > 1 else 1
        weights = grads = optimizer = 0.0
        step_temp, gathered = 0.0, 0.0
        for h in stage.holds:
            net = self.networks[h.network]
            if h.role in ("frozen", "whole copy"):
                weights += net.weight_bytes
                continue
            weights += net.weight_bytes / shards
            if h.role == "trained":
                grads += net.grad_bytes / shards
                optimizer += net.adam_bytes / shards
                # Adam's multi-tensor step makes one temporary the size of the parameters (sqrt of exp_avg_sq)
                step_temp = max(step_temp, 4 * net.params / shards)
            if shards > 1:  # a unit and the next one (prefetched) are gathered whole while they run
                gathered = max(gathered, 2 * net.largest_unit)
        per_sample = max(a.per_sample(precision, checkpointing) for _, a in stage.updates)
        return RankMemory(weights=weights, grads=grads, optimizer=optimizer, per_sample=per_sample,
                          batch=stage.batch / self.nproc, gathered=gathered, workspace=step_temp)

    def configured(self, stage: StagePlan) -> RankMemory:
        s = self.settings
        return self.per_rank(stage, s.parallel, s.precision, s.activation_checkpointing)

    def advice(self, stage: StagePlan) -> str | None:
        """None when the configured settings fit `gpu_bytes`; else the fewest changes that fit, or why none does."""
        if self.gpu_bytes is None or self.configured(stage).total <= self.gpu_bytes:
            return None
        s = self.settings
        base = {"parallel": s.parallel, "precision": s.precision, "activation_checkpointing": s.activation_checkpointing}
        options = [{"precision": "bf16"}, {"activation_checkpointing": True}, {"parallel": "fsdp"},
                   {"precision": "bf16", "activation_checkpointing": True}, {"parallel": "fsdp", "precision": "bf16"},
                   {"parallel": "fsdp", "activation_checkpointing": True},
                   {"parallel": "fsdp", "precision": "bf16", "activation_checkpointing": True}]
        if self.nproc == 1:  # (FSDP shards over processes: one process has nothing to shard over)
            options = [o for o in options if "parallel" not in o]
        for change in options:
            change = {k: v for k, v in change.items() if base[k] != v}
            merged = {**base, **change}
            total = self.per_rank(stage, merged["parallel"], merged["precision"], merged["activation_checkpointing"]).total
            if change and total <= self.gpu_bytes:
                return f"fits with {_sets(change)} ({total / GB:.1f} GB per rank)"
        # nothing fits at this batch: the largest batch per rank that does, with every saving on
        best = {**base, "precision": "bf16", "activation_checkpointing": True,
                **({"parallel": "fsdp"} if self.nproc > 1 else {})}
        mem = self.per_rank(stage, best["parallel"], best["precision"], True)
        fit = mem.max_batch(self.gpu_bytes)
        change = {k: v for k, v in best.items() if base[k] != v}
        if fit < 1:
            return (f"does not fit even at 1 sequence per rank: weights, gradients and optimiser states take "
                    f"{mem.held / GB:.1f} GB per rank ({_sets(change)} included); use more processes with "
                    f"parallel=fsdp, or GPUs with more memory")
        return (f"fits with {_sets(change)} and at most {fit} sequences per rank: --set {stage.key}.batch_size="
                f"{fit * self.nproc}, or more processes")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"teacher": self.teacher, "nproc": self.nproc, "gpu_bytes": self.gpu_bytes,
                               "networks": {k: {"params": n.params, "weight_bytes": n.weight_bytes,
                                                "grad_bytes": n.grad_bytes, "adam_bytes": n.adam_bytes}
                                            for k, n in self.networks.items()}, "stages": {}}
        for st in self.stages:
            rows = {}
            for parallel in PARALLEL:
                for precision in PRECISIONS:
                    for ckpt in (False, True):
                        m = self.per_rank(st, parallel, precision, ckpt)
                        rows[f"{parallel}/{precision}/{'ckpt' if ckpt else 'no-ckpt'}"] = m.total
            out["stages"][st.key] = {
                "batch": st.batch, "per_rank_total": rows, "configured": self.configured(st).total,
                "activation_per_sample": {name: {p: a.per_sample(p, False) for p in PRECISIONS}
                                          for name, a in st.updates},
                "advice": self.advice(st)}
        return out


def _sets(change: Mapping[str, object]) -> str:
    return " ".join(f"--set {k}={('true' if v else 'false') if isinstance(v, bool) else v}" for k, v in change.items())


# ---- tracing on the meta device (dd2cli.engine.meta_trace) ----------------------------------------------------


class _ShapeTeacher:
    """The teacher inside a trace: its passes run without gradients and save nothing, so a stand-in that returns
    logits of the right shape is enough (and spares the trace the teacher's forward)."""

    def __init__(self, teacher) -> None:
        self._t = teacher
        self.spec = teacher.spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def sampling_logits(self, x_BN, labels_B, settings):
        return torch.zeros(x_BN.shape[0], self.spec.num_tokens, self.spec.vocab_size, device=x_BN.device)


class _FeaturesWithoutGrad(nn.Module):
    """A backbone inside a trace: without gradients it saves nothing, so features of the right shape stand in for
    its pass (the generator update reads the guidance network's features that way); with them, the real one."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.inner = backbone

    def forward(self, z_BNd: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.inner(z_BNd, labels_B)
        return z_BNd.new_zeros(z_BNd.shape[0], z_BNd.shape[1], self.inner.feature_dim)


def _activations(fn: Callable[[int], Any], models: list[ARDiffusion], params: set[int],
                 replay: bool = True) -> Activations:
    """Per-sample saved bytes of `fn(batch)` (traced at batch 2 and halved). With activation checkpointing the
    backbone keeps only its input (a few bytes per token), so what stays saved is the rest."""
    nets = [m for net in models for m in (net.backbone, net.head)]  # (the modules the networks call)
    trace = Trace(nets, [net.backbone for net in models], params, replay)
    originals = [net.backbone for net in models]
    for net in models:
        net.backbone = _FeaturesWithoutGrad(net.backbone)
    try:
        net_bytes, other, backbone = trace.run(lambda: fn(2))
    finally:
        for net, backbone_module in zip(models, originals):
            net.backbone = backbone_module
    return Activations(network=net_bytes // 2, other=other // 2, backbone=backbone // 2,
                       kept_with_checkpointing=(net_bytes + other - backbone) // 2)


def _largest_unit(model: nn.Module) -> int:
    blocks = [b for sub in model.modules() if isinstance(sub, nn.ModuleList) for b in sub]
    return max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), default=0)


def _bytes(module: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in module.parameters()}
    buffers = {id(b): b for b in module.buffers()}
    stored = sum(t.numel() * t.element_size() for t in [*params.values(), *buffers.values()])
    return sum(p.numel() for p in params.values()), stored


def _build(variant: Variant, settings: DistillSettings, weights: Mapping[str, str] | None):
    """The teacher and a ψ-shaped network on the meta device (from the skeleton, or loaded and moved there)."""
    h = settings.head
    if variant.skeleton is not None:
        with torch.device("meta"), InitOnMeta():
            teacher = variant.skeleton(variant)
            model = build_model(teacher.new_backbone(), teacher.spec.latent_dim, h.width, h.depth, h.mlp_ratio)
        return teacher, model
    found = variant.locate_weights(weights)
    missing = [w.filename for w in variant.weights if found[w.key] is None or not found[w.key].is_file()]
    if missing:
        raise DD2Error(f"The memory plan of '{variant.name}' needs its weight files ({', '.join(missing)}), as its "
                       f"family builds no skeleton without them (Variant.skeleton); pass --weights KEY=PATH.")
    teacher = variant.load(weights or None, device="cpu")
    model = build_model(teacher.new_backbone(), teacher.spec.latent_dim, h.width, h.depth, h.mlp_ratio)
    return teacher.to("meta"), model.to("meta")


def memory_plan(variant: Variant, settings: DistillSettings, nproc: int | None = None, gpu_memory: str | None = None,
                weights: Mapping[str, str] | None = None, replay_blocks: bool = True) -> MemoryPlan:
    """The plan of a run of `variant` with `settings` over `nproc` ranks (default: $WORLD_SIZE or 1).
    `replay_blocks=False` traces every repeated block instead of replaying the first (slower, same bytes)."""
    nproc = nproc or int(os.environ.get("WORLD_SIZE", "1"))
    if nproc < 1:
        raise DD2Error(f"--nproc must be at least 1, not {nproc}.")
    gpu_bytes = parse_size(gpu_memory) if gpu_memory else None
    with torch.random.fork_rng(devices=[]):
        teacher, psi = _build(variant, settings, weights)
    spec = teacher.spec
    t_params, t_bytes = _bytes(teacher)
    p_params, p_bytes = _bytes(psi)
    unit = _largest_unit(psi)
    names = {"teacher": "teacher", "psi": "AR-diffusion ψ", "generator": "generator", "ema": "EMA generator",
             "guidance": "guidance"}
    networks = {"teacher": Network(names["teacher"], t_params, t_bytes)}
    networks.update({k: Network(names[k], p_params, p_bytes, unit) for k in ("psi", "generator", "ema", "guidance")})
    plan = MemoryPlan(variant.name, nproc, gpu_bytes, settings, networks)

    s1, fi, s2 = settings.stage1, settings.flow_init, settings.stage2
    N, d = spec.num_tokens, spec.latent_dim
    shape_teacher = _ShapeTeacher(teacher)
    target = settings.target.apply(spec.target)
    score = {"chunk_size": settings.score.chunk_size, "support": settings.score.support}

    def labels(b: int) -> torch.Tensor:
        return torch.zeros(b, dtype=torch.long, device="meta")

    gen = Generator(psi)
    guidance = copy.deepcopy(psi)
    params = {id(p) for m in (psi, guidance) for p in m.parameters()}

    def gts(b: int):
        tokens = torch.zeros(b, N, dtype=torch.long, device="meta")
        gts_loss(psi, shape_teacher, tokens, labels(b), target_settings=target, draws=s1.noise_draws,
                 timesteps=TimestepSpec(**to_dict(s1.timesteps)), **score)

    def flow(b: int):
        (gen(torch.zeros(b, N, d, device="meta"), labels(b)).float() - 1).square().sum(-1).mean()

    def guidance_update(b: int):
        fcs_loss(psi, torch.zeros(b, N, d, device="meta"), labels(b), draws=s2.guidance_draws,
                 timesteps=TimestepSpec(**to_dict(s2.timesteps)))

    def generator_update(b: int):
        csd_loss(gen, guidance.requires_grad_(False), shape_teacher, torch.zeros(b, N, d, device="meta"), labels(b),
                 target_settings=target, alpha=s2.alpha, timesteps=TimestepSpec(**to_dict(s2.timesteps)),
                 weighting=s2.weighting, draws=s2.generator_draws, **score)

    def trace(fn, models):
        return _activations(fn, models, params, replay_blocks)

    if s1.steps > 0:
        plan.stages.append(StagePlan("stage1", "stage 1 (GTS)", s1.batch_size,
                                     (Holding("teacher", "frozen"), Holding("psi", "trained")),
                                     (("GTS update", trace(gts, [psi])),)))
    if fi.steps > 0:
        plan.stages.append(StagePlan("flow_init", "stage 1 (flow-map init)", fi.batch_size,
                                     (Holding("teacher", "frozen"), Holding("psi", "copy"), Holding("psi", "whole copy"),
                                      Holding("generator", "trained")),
                                     (("flow-map update", trace(flow, [psi])),)))
    if s2.steps > 0:
        plan.stages.append(StagePlan(
            "stage2", "stage 2 (CSD)", s2.batch_size,
            (Holding("teacher", "frozen"), Holding("generator", "trained"), Holding("ema", "copy"),
             Holding("guidance", "trained")),
            (("guidance update", trace(guidance_update, [psi])),
             ("generator update", trace(generator_update, [psi, guidance])))))
    return plan
