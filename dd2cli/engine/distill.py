"""The DD2 training engine: stage 1 (GTS initialisation, optional flow-map phase) and stage 2 (CSD), resumable.

`run(request)` is what `dd2 distill` calls; everything here works without the CLI. The loops are written out
top to bottom with numbered steps; the losses live in `dd2cli.losses`, the networks in `dd2cli.networks`
(`build_model`), checkpoints in `engine.checkpoint`, run folders in `engine.runs`. Ctrl-C stops a run with an
`Interrupted` error that names the last complete checkpoint; `--resume` continues from it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as torch_dist

from ..config import config_layers, resolve_layers, to_dict
from ..errors import ConfigError, DD2Error, Interrupted
from ..files import load_safetensors, read_json, save_safetensors, write_json
from ..flowmap import flow_map_loss
from ..images import save_grid
from ..losses import TimestepSpec, csd_loss, fcs_loss, gts_loss, step_balance_weights
from ..networks import ARDiffusion, Generator, build_model, ema_update, progressive_ema_decay
from ..plugins import get_variant
from ..settings import DistillSettings
from ..teacher import Teacher
from ..version import __version__
from .checkpoint import (
    Checkpoint,
    append_metrics,
    final_stage1_checkpoint,
    latest_checkpoint,
    remove_partial_checkpoints,
    resume_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    truncate_metrics,
)
from .distributed import (
    DistInfo,
    average_scalar,
    barrier,
    broadcast_module,
    cleanup,
    clip_sharded_gradients,
    data_parallel,
    init_from_env,
    reshard,
    shard_model,
)
from .progress import Progress
from .runs import check_empty_out, default_runs_dir, new_folder
from .runtime import resolve_device, resolve_threads, torch_threads


@dataclass
class DistillRequest:
    teacher: Optional[str] = None
    weights: Mapping[str, str] = field(default_factory=dict)
    config: Optional[Path] = None
    overrides: tuple[str, ...] = ()
    out: Optional[Path] = None
    resume: Optional[Path] = None
    stage: str = "all"  # "1", "2" or "all"
    device: Optional[str] = None
    seed: Optional[int] = None


@dataclass
class DistillResult:
    run_dir: Path
    teacher: str
    stage1_step: int = 0
    stage2_step: int = 0
    grid: Optional[Path] = None
    generator: Optional[Any] = None  # the EMA generator (a `Generator` module) after stage 2
    threads: int = 0  # the torch thread count the run used (the one its config.json records)


class _Run:
    """State shared by both stages of one distillation run."""

    def __init__(self, run_dir: Path, settings: DistillSettings, teacher: Teacher, variant: str, dist: DistInfo,
                 device: str, progress: Progress) -> None:
        self.run_dir, self.settings, self.teacher, self.variant = run_dir, settings, teacher, variant
        self.dist, self.device, self.progress = dist, device, progress
        self.spec = teacher.spec
        #: FSDP only means something with several ranks; one process trains unsharded
        self.sharded = settings.parallel == "fsdp" and dist.enabled
        self.target = settings.target.apply(self.spec.target)
        self.data_sampling = settings.stage1.sampling.apply(self.spec.stage1)
        # separate generators: data (what the teacher draws) and training noise, both checkpointed
        seed = settings.seed + 1000 * dist.rank
        self.gen_data = torch.Generator(device=device).manual_seed(seed)
        self.gen_train = torch.Generator(device=device).manual_seed(seed + 1)
        self.stage_name, self.step = "start-up", 0
        self.interrupted = threading.Event()

    # -- where the run is (for progress, and for the line printed on Ctrl-C) --
    def start(self, stage: str, total: int, done: int) -> None:
        self.stage_name, self.step = stage, done
        self.progress.start(stage, total, done, unit="it")

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        self.step = step
        self.progress.update(step, metrics)
        if self.interrupted.is_set():  # a Ctrl-C whose KeyboardInterrupt something swallowed (see _latch_ctrl_c)
            raise KeyboardInterrupt

    # -- helpers --
    def autocast(self):
        if self.settings.precision == "bf16" and self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def per_rank(self, global_batch: int) -> int:
        if global_batch % self.dist.world_size:
            raise ConfigError(f"Batch size {global_batch} does not split evenly over {self.dist.world_size} ranks; "
                              f"use a multiple of {self.dist.world_size}.")
        return global_batch // self.dist.world_size

    def rng_state(self) -> dict[str, torch.Tensor]:
        state = {"data": self.gen_data.get_state(), "train": self.gen_train.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def all_rng_states(self) -> dict[str, torch.Tensor]:
        """Every rank's generators (collective): rank 0's under their plain names, rank r's as `r{r}.name`,
        so that after a resume each rank continues its own data and noise streams."""
        mine = self.rng_state()
        if not self.dist.enabled:
            return mine

        gathered: list = [None] * self.dist.world_size
        torch_dist.all_gather_object(gathered, {k: v.cpu() for k, v in mine.items()})
        out = dict(gathered[0])
        for r, states in enumerate(gathered[1:], start=1):
            out.update({f"r{r}.{k}": v for k, v in states.items()})
        return out

    def restore_rng(self, saved: Mapping[str, torch.Tensor]) -> None:
        r = self.dist.rank
        if r == 0:
            state = {k: v for k, v in saved.items() if "." not in k}
        else:
            state = {k[len(f"r{r}."):]: v for k, v in saved.items() if k.startswith(f"r{r}.")}
        if not state:  # saved with fewer ranks: this rank's streams restart from its seed (a fresh stream)
            self.progress.message(f"rank {r}: the checkpoint holds no random state for this rank; "
                                  "its data and noise streams restart from the seed")
            return
        self.gen_data.set_state(state["data"])
        self.gen_train.set_state(state["train"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def new_model(self) -> ARDiffusion:
        h = self.settings.head
        model = build_model(self.teacher.new_backbone().to(self.device), self.spec.latent_dim, h.width, h.depth,
                            h.mlp_ratio, seed=self.settings.seed, device=self.device).eval()
        model.checkpoint_backbone = self.settings.activation_checkpointing
        return model

    def labels(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.spec.num_classes, (n,), generator=self.gen_data, device=self.device)

    def log(self, stage: int, step: int, metrics: Mapping[str, float]) -> None:
        if self.dist.is_main:
            append_metrics(self.run_dir, {"stage": stage, "step": step, "time": round(time.time(), 3), **metrics})

    def checkpoint(self, stage: int, step: int, modules, optimizers, state, final: bool = False) -> Path | None:
        """Every rank calls this (a sharded checkpoint is written by all ranks); rank 0 finishes it, and every rank
        sees the finished checkpoint (with its `final` mark) on return. Optimisers are keyed like their modules."""
        path = None
        rng = self.all_rng_states()
        if self.sharded:  # each rank writes its own shards: nothing is gathered
            self.resharded(*(m for m in modules.values() if isinstance(m, torch.nn.Module)))
            return save_sharded_checkpoint(self.run_dir, stage, step, modules, optimizers, state, rng,
                                           is_main=self.dist.is_main, sync=lambda: barrier(self.dist),
                                           keep=self.settings.run.keep_checkpoints, final=final)
        if self.dist.is_main:
            path = save_checkpoint(self.run_dir, stage, step, modules, optimizers, state, rng,
                                   keep=self.settings.run.keep_checkpoints, final=final)
        barrier(self.dist)
        return path

    def check_finite(self, stage: int, step: int, lr_key: str = "", **losses: float) -> None:
        for name, value in losses.items():
            if not math.isfinite(value):
                last = latest_checkpoint(self.run_dir)
                where = f"the last good checkpoint is {last.path}" if last else "no checkpoint was written yet"
                key = lr_key or f"stage{stage}.lr"
                raise DD2Error(f"The {name} loss became {value} at stage {stage} step {step}; {where} "
                               f"(resume it with a lower learning rate, e.g. --set {key}=...).")

    def grid(self, generator_net: Generator, name: str) -> Path | None:
        """One row per class (the first `grid_classes`), `grid_per_class` samples each, fixed noise."""
        if not self.dist.is_main and not self.sharded:  # a sharded forward needs every rank
            return None
        per = self.settings.run.grid_per_class
        ncls = min(self.spec.num_classes, self.settings.run.grid_classes)
        labels = torch.arange(ncls, device=self.device).repeat_interleave(per)
        g = torch.Generator(device=self.device).manual_seed(12345)
        eps = torch.randn(len(labels), self.spec.num_tokens, self.spec.latent_dim, generator=g, device=self.device)
        with torch.no_grad(), self.autocast():
            q = generator_net(eps, labels).float()
            images = self.teacher.decode(self.teacher.as_tokens(q))
        if not self.dist.is_main:
            return None
        path = self.run_dir / "samples" / f"{name}.png"
        save_grid(path, images, ncol=per)
        return path

    def shard(self, model: ARDiffusion) -> None:
        if self.sharded:
            shard_model(model)

    def place(self, ckpt: Checkpoint | None, modules: Mapping[str, torch.nn.Module]) -> None:
        """Shard the networks (FSDP) and load their checkpointed weights, if any: whole weights go in before
        sharding, a sharded checkpoint's slices after it (each rank reads only its own)."""
        slices = ckpt is not None and ckpt.sharded and self.sharded
        if ckpt is not None and not slices:
            for name, module in modules.items():
                ckpt.load_module(name, module)
        for module in modules.values():
            self.shard(module.model if isinstance(module, Generator) else module)
        if slices:
            for name, module in modules.items():
                ckpt.load_sharded_module(name, module)

    def restore_optimizer(self, ckpt: Checkpoint, name: str, module: torch.nn.Module,
                          opt: torch.optim.Optimizer) -> None:
        ckpt.load_optimizer_into(name, module, opt, self.sharded)

    def resharded(self, *modules: torch.nn.Module) -> None:
        if self.sharded:
            reshard(*modules)

    def data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """What a loss calls to train `module`: its `DistributedDataParallel` wrapper, which averages the gradients
        over the ranks during the backward pass; `module` itself in one process or under FSDP (which
        reduce-scatters gradients in its own backward hooks). Build it again when which parameters train changes."""
        if self.sharded:
            return module
        return data_parallel(module, self.dist)


def _lr_at(step: int, base: float, warmup: int, start: float = 1e-6, decay: str = "none", total: int = 0,
           final: float = 0.0) -> float:
    """Linear warm-up from `start`, then constant or a cosine decay to `final · base` at step `total`."""
    if warmup > 0 and step < warmup:
        return start + (base - start) * (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return base
    frac = min(1.0, (step - warmup + 1) / (total - warmup))
    return base * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _set_lr(opt: torch.optim.Optimizer, lrs: Mapping[str, float] | float) -> None:
    for group in opt.param_groups:
        group["lr"] = lrs if isinstance(lrs, float) else lrs[group["name"]]


def _clip(params, max_norm: float) -> float:
    """Clip the gradient norm (0 = off); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if any(hasattr(p.grad, "to_local") for p in params):
        return clip_sharded_gradients(params, max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def _token_batches(run: _Run, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Token sequences for stage 1: fresh teacher samples, cached teacher shards, or a dataset file."""
    s1 = run.settings.stage1
    if s1.data != "teacher":
        tokens, labels = _load_token_dataset(Path(s1.data), run)
        while True:
            idx = torch.randint(0, len(labels), (batch,), generator=run.gen_data, device=run.device)
            yield tokens[idx], labels[idx]
    if s1.cache_sequences > 0:
        tokens, labels = _teacher_shards(run, s1.cache_sequences)
        while True:
            idx = torch.randint(0, len(labels), (batch,), generator=run.gen_data, device=run.device)
            yield tokens[idx], labels[idx]
    while True:
        labels = run.labels(batch)
        with torch.no_grad():
            tokens = run.teacher.sample(labels, run.data_sampling, generator=run.gen_data)
        yield tokens, labels


def _load_token_dataset(path: Path, run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    tensors, _ = load_safetensors(path)
    if "tokens" not in tensors or "labels" not in tensors:
        raise DD2Error(f"Token dataset {path} must hold 'tokens' (N, n) and 'labels' (N,); it has "
                       f"{', '.join(sorted(tensors)) or 'nothing'}.")
    tokens, labels = tensors["tokens"].long(), tensors["labels"].long()
    n, V = run.spec.num_tokens, run.spec.vocab_size
    if tokens.ndim != 2 or tokens.shape[1] != n or len(labels) != len(tokens):
        raise DD2Error(f"Token dataset {path} has tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)}; "
                       f"teacher '{run.variant}' needs (N, {n}) and (N,).")
    if int(tokens.min()) < 0 or int(tokens.max()) >= V or int(labels.min()) < 0 or \
            int(labels.max()) >= run.spec.num_classes:
        raise DD2Error(f"Token dataset {path} has ids outside the teacher's vocabulary ({V}) or classes "
                       f"({run.spec.num_classes}).")
    return tokens.to(run.device), labels.to(run.device)


def _teacher_shards(run: _Run, total: int, shard_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `total` teacher sequences once into `data/shard-*.safetensors` (complete shards are reused)."""
    folder = run.run_dir / "data"
    tokens, labels = [], []
    g = torch.Generator(device=run.device).manual_seed(run.settings.seed + 777)
    for i, start in enumerate(range(0, total, shard_size)):
        path = folder / f"shard-{i:05d}.safetensors"
        count = min(shard_size, total - start)
        if path.is_file():
            t, _ = load_safetensors(path)
            g.set_state(t["generator_state_after"])
        else:
            lab = torch.randint(0, run.spec.num_classes, (count,), generator=g, device=run.device)
            with torch.no_grad():
                tok = torch.cat([run.teacher.sample(lab[s:s + 256], run.data_sampling, generator=g)
                                 for s in range(0, count, 256)])
            t = {"tokens": tok.cpu(), "labels": lab.cpu(), "generator_state_after": g.get_state()}
            if run.dist.is_main:
                save_safetensors(path, t, {"sampling": str(run.data_sampling.as_dict())})
            run.progress.message(f"token shard {i + 1}: {count} teacher sequences")
        tokens.append(t["tokens"])
        labels.append(t["labels"])
    return torch.cat(tokens).to(run.device), torch.cat(labels).to(run.device)


def _stage1(run: _Run, ckpt: Checkpoint | None) -> ARDiffusion:
    s1 = run.settings.stage1
    model = run.new_model()
    broadcast_module(model, run.dist)
    run.place(ckpt, {"model": model})  # before the optimiser sees the parameters
    head_params = list(model.head.parameters())
    backbone_params = list(model.backbone.parameters())
    opt = torch.optim.AdamW([{"params": head_params, "lr": s1.lr, "name": "head"},
                             {"params": backbone_params, "lr": s1.backbone_lr, "name": "backbone"}],
                            betas=(0.9, 0.95), weight_decay=s1.weight_decay)
    if ckpt is not None and ckpt.has_module("generator"):  # GTS is over: the flow-map phase was under way
        return model
    flow_phase = run.settings.flow_init.steps > 0  # then the end of stage 1 is the end of that phase
    start = 0
    if ckpt is not None:
        run.restore_optimizer(ckpt, "model", model, opt)
        run.restore_rng(ckpt.rng())
        start = ckpt.step
        ckpt.release()
    if start >= s1.steps:
        # stage 1 switched off (steps = 0): record the untuned model as its result; a run written before the
        # mark went in with the checkpoint may also lack it
        if ckpt is None or (not flow_phase and final_stage1_checkpoint(run.run_dir) is None):
            run.checkpoint(1, start, {"model": model}, {"model": opt}, {}, final=not flow_phase)
        return model
    batches = _token_batches(run, run.per_rank(s1.batch_size))
    timesteps = TimestepSpec(**to_dict(s1.timesteps))
    run.start("stage 1 (GTS)", s1.steps, start)
    t0, done = time.perf_counter(), 0
    trained, trains = None, None  # the data-parallel wrapper, and whether the backbone trained when it was built
    for step in range(start, s1.steps):
        # 0. schedule: head only first (backbone frozen), then everything
        backbone_trains = step >= s1.head_only_steps
        if backbone_trains != trains:
            if not run.sharded:  # (FSDP keeps requires_grad fixed: its gathered copies would not follow a toggle)
                model.backbone.requires_grad_(backbone_trains)
            trained = None  # (the old wrapper goes first: its hooks leave with it)
            trained, trains = run.data_parallel(model), backbone_trains
        decay = {"decay": s1.lr_decay, "final": s1.lr_final}
        _set_lr(opt, {"head": _lr_at(step, s1.lr, s1.warmup_steps, total=s1.steps, **decay),
                      "backbone": _lr_at(step - s1.head_only_steps, s1.backbone_lr, s1.warmup_steps,
                                         total=s1.steps - s1.head_only_steps, **decay)
                      if backbone_trains else 0.0})
        # 1. a batch of teacher token sequences
        tokens, labels = next(batches)
        # 2. GTS loss: closed-form teacher velocity as the regression target
        with run.autocast():
            loss = gts_loss(trained, run.teacher, tokens, labels, target_settings=run.target, draws=s1.noise_draws,
                            timesteps=timesteps, generator=run.gen_train, chunk_size=run.settings.score.chunk_size,
                            support=run.settings.score.support)
        # 3. update
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if run.sharded and not backbone_trains:
            for p in backbone_params:  # frozen as above: Adam skips parameters without a gradient
                p.grad = None
        grad_norm = _clip(model.parameters(), s1.grad_clip)
        opt.step()
        loss_value = average_scalar(loss.item(), run.dist)
        run.check_finite(1, step + 1, gts=loss_value)
        done += 1
        metrics = {"loss_gts": loss_value, "grad_norm": grad_norm, "lr": opt.param_groups[0]["lr"],
                   "it_s": done / (time.perf_counter() - t0)}
        run.update(step + 1, metrics)
        if (step + 1) % run.settings.run.log_every == 0 or step + 1 == s1.steps:
            run.log(1, step + 1, metrics)
        if (step + 1) % run.settings.run.checkpoint_every == 0 and step + 1 < s1.steps:
            run.checkpoint(1, step + 1, {"model": model}, {"model": opt}, {})
    run.progress.stop()
    run.checkpoint(1, s1.steps, {"model": model}, {"model": opt}, {}, final=not flow_phase)
    return model


def _flow_init(run: _Run, ckpt: Checkpoint | None) -> None:
    """Optional end of stage 1 (`flow_init.steps > 0`): the generator regressed onto the teacher's flow map.

    Its updates count on from stage 1's last step; its checkpoints hold ψ₀ (no longer trained) and the
    generator, and the last one is the final checkpoint of stage 1 that stage 2 starts from.
    """
    fi, offset = run.settings.flow_init, run.settings.stage1.steps
    if fi.steps <= 0:
        return
    resuming = ckpt is not None and ckpt.stage == 1 and ckpt.has_module("generator")
    src = ckpt if resuming else latest_checkpoint(run.run_dir)  # else: the checkpoint that ended GTS
    psi0_state = src.module_state("model")  # a plain copy on every rank, written with every checkpoint
    gen = Generator(run.new_model()).eval()
    if not resuming:
        gen.model.load_state_dict(psi0_state)
    run.place(ckpt if resuming else None, {"generator": gen})
    opt = torch.optim.Adam([{"params": list(gen.parameters()), "name": "g"}], lr=1e-6, betas=(0.9, 0.95))
    start = 0
    if resuming:
        run.restore_optimizer(ckpt, "generator", gen, opt)
        run.restore_rng(ckpt.rng())
        start = ckpt.step - offset
        ckpt.release()
    if start >= fi.steps:
        return
    batch = run.per_rank(fi.batch_size)
    n, d = run.spec.num_tokens, run.spec.latent_dim
    score_kw = {"chunk_size": run.settings.score.chunk_size, "support": run.settings.score.support}
    modules = {"model": psi0_state, "generator": gen}
    trained = run.data_parallel(gen)
    run.start("stage 1 (flow-map init)", fi.steps, start)
    t0, done = time.perf_counter(), 0
    for step in range(start, fi.steps):
        _set_lr(opt, _lr_at(step, fi.lr, fi.warmup_steps))
        labels = run.labels(batch)
        eps = torch.randn(batch, n, d, generator=run.gen_train, device=run.device)
        with run.autocast():
            loss, agree = flow_map_loss(trained, run.teacher, eps, labels, settings=run.target,
                                        euler_steps=fi.euler_steps, **score_kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _clip(gen.parameters(), fi.grad_clip)
        opt.step()
        loss_value = average_scalar(loss.item(), run.dist)
        run.check_finite(1, offset + step + 1, lr_key="flow_init.lr", flow=loss_value)
        done += 1
        metrics = {"loss_flow": loss_value, "flow_agree": average_scalar(agree, run.dist), "grad_norm": grad_norm,
                   "lr": opt.param_groups[0]["lr"], "it_s": done / (time.perf_counter() - t0)}
        run.update(step + 1, metrics)
        if (step + 1) % run.settings.run.log_every == 0 or step + 1 == fi.steps:
            run.log(1, offset + step + 1, metrics)
        if (step + 1) % run.settings.run.checkpoint_every == 0 and step + 1 < fi.steps:
            run.checkpoint(1, offset + step + 1, modules, {"generator": opt}, {})
    run.progress.stop()
    run.checkpoint(1, offset + fi.steps, modules, {"generator": opt}, {}, final=True)


def _init_from(run: _Run, psi0: ARDiffusion, how: str) -> ARDiffusion:
    """A stage-2 network (generator or guidance) to train whole, backbone included.

    Stage 2 always trains every parameter: a stage 1 that ends inside its head-only phase leaves ψ₀'s backbone
    frozen, and that flag must not carry over (a run resumed at stage 2 rebuilds ψ₀ unfrozen; both must match).
    """
    if how == "ar-diffusion":
        return copy.deepcopy(psi0).requires_grad_(True)
    return run.new_model()  # the teacher's backbone and a new head: no GTS tuning (ablation)


def _stage2(run: _Run, start: dict[str, Any], ckpt: Checkpoint | None) -> tuple[Generator, int, Path | None]:
    """CSD from `start` = {"psi0": ψ₀, "generator": the generator's starting weights when stage 1 ended with the
    flow-map phase, else None}, which is emptied: both are released once the networks are built from them (stage 2
    holds five networks already)."""
    s2 = run.settings.stage2
    psi0, generator_init = start.pop("psi0"), start.pop("generator")
    guidance = _init_from(run, psi0, s2.init_guidance)
    gen = Generator(_init_from(run, psi0, s2.init_generator)).eval()
    del psi0
    if generator_init is not None:
        gen.load_state_dict(generator_init)
    del generator_init
    ema = copy.deepcopy(gen).requires_grad_(False)
    resuming = ckpt is not None and ckpt.stage == 2
    run.place(ckpt if resuming else None, {"generator": gen, "ema": ema, "guidance": guidance})
    opt_g = torch.optim.Adam([{"params": list(gen.parameters()), "name": "g"}], lr=1e-6, betas=(0.9, 0.95))
    opt_psi = torch.optim.Adam([{"params": list(guidance.parameters()), "name": "psi"}], lr=s2.guidance_lr,
                               betas=(0.9, 0.95))
    start, aligned = 0, False
    if resuming:
        run.restore_optimizer(ckpt, "generator", gen, opt_g)
        run.restore_optimizer(ckpt, "guidance", guidance, opt_psi)
        run.restore_rng(ckpt.rng())
        start, aligned = ckpt.step, bool(ckpt.state.get("aligned", False))
        ckpt.release()
    batch = run.per_rank(s2.batch_size)
    timesteps = TimestepSpec(**to_dict(s2.timesteps))
    n, d = run.spec.num_tokens, run.spec.latent_dim
    score_kw = {"chunk_size": run.settings.score.chunk_size, "support": run.settings.score.support}
    teacher = _SnappingTeacher(run.teacher) if s2.snap_prefix else run.teacher
    position_w = step_balance_weights(run.spec.steps, run.device) if s2.balance_steps else None
    trained_guidance, trained_gen = run.data_parallel(guidance), run.data_parallel(gen)

    def noise() -> torch.Tensor:
        return torch.randn(batch, n, d, generator=run.gen_train, device=run.device)

    def guidance_update() -> float:
        run.resharded(guidance, gen)  # (FSDP) start each phase from sharded parameters, see `reshard`
        labels = run.labels(batch)
        with torch.no_grad(), run.autocast():
            q = gen(noise(), labels).float()
        with run.autocast():
            loss = fcs_loss(trained_guidance, q, labels, draws=s2.guidance_draws, timesteps=timesteps,
                            generator=run.gen_train, position_weights_N=position_w)
        opt_psi.zero_grad(set_to_none=True)
        loss.backward()
        _clip(guidance.parameters(), s2.grad_clip)
        opt_psi.step()
        return average_scalar(loss.item(), run.dist)

    def state() -> dict:
        return {"aligned": aligned}

    modules = {"generator": gen, "ema": ema, "guidance": guidance}
    optimizers = {"generator": opt_g, "guidance": opt_psi}
    grid_path = None
    run.start("stage 2 (CSD)", s2.steps, start)
    t0, done = time.perf_counter(), 0
    for it in range(start, s2.steps):
        # 0. performance alignment: generator ← EMA, then guidance-only updates
        if s2.align_at and it == s2.align_at and not aligned:
            run.resharded(gen, ema)
            _copy_weights(gen, ema)
            run.progress.message(f"performance alignment: generator ← EMA, {s2.align_steps} guidance updates")
            for _ in range(s2.align_steps):
                guidance_update()
            aligned = True
        # 1. K guidance updates on fresh generator samples
        if s2.decay_guidance:
            _set_lr(opt_psi, _lr_at(it, s2.guidance_lr, 0, decay=s2.lr_decay, total=s2.steps, final=s2.lr_final))
        loss_psi = float("nan")
        for _ in range(s2.guidance_updates):
            loss_psi = guidance_update()
        # 2. one generator update (guidance frozen)
        _set_lr(opt_g, _lr_at(it, s2.lr, s2.warmup_steps, decay=s2.lr_decay, total=s2.steps, final=s2.lr_final))
        run.resharded(guidance, gen)
        if not run.sharded:
            guidance.requires_grad_(False)
        labels = run.labels(batch)
        with run.autocast():
            out = csd_loss(trained_gen, guidance, teacher, noise(), labels, target_settings=run.target,
                           alpha=s2.alpha, timesteps=timesteps, weighting=s2.weighting, draws=s2.generator_draws,
                           generator=run.gen_train, position_weights_N=position_w, **score_kw)
        opt_g.zero_grad(set_to_none=True)
        out.loss.backward()
        if run.sharded:  # the frozen guidance received gradients; drop them (Adam never sees them)
            opt_psi.zero_grad(set_to_none=True)
        else:
            guidance.requires_grad_(True)
        grad_norm = _clip(gen.parameters(), s2.grad_clip)
        opt_g.step()
        # 3. progressive EMA
        run.resharded(ema, gen)
        ema_update(ema, gen, progressive_ema_decay(it, s2.ema_max))
        loss_g = average_scalar(out.loss.item(), run.dist)
        run.check_finite(2, it + 1, csd=loss_g, guidance=loss_psi)
        done += 1
        metrics = {"loss_csd": loss_g, "loss_fcs": loss_psi, "score_gap": average_scalar(float(out.score_gap), run.dist),
                   "grad_norm": grad_norm, "lr": opt_g.param_groups[0]["lr"],
                   "it_s": done / (time.perf_counter() - t0)}
        run.update(it + 1, metrics)
        if (it + 1) % run.settings.run.log_every == 0 or it + 1 == s2.steps:
            run.log(2, it + 1, metrics)
        if run.settings.run.sample_every and (it + 1) % run.settings.run.sample_every == 0:
            grid_path = run.grid(ema, f"stage2-{it + 1:07d}") or grid_path
        if (it + 1) % run.settings.run.checkpoint_every == 0 and it + 1 < s2.steps:
            run.checkpoint(2, it + 1, modules, optimizers, state())
    run.progress.stop()
    if start < s2.steps or ckpt is None or ckpt.stage != 2:
        run.checkpoint(2, s2.steps, modules, optimizers, state())
    grid_path = run.grid(ema, "final") or grid_path
    if run.sharded:  # hand back plain tensors: the EMA as the final checkpoint holds it
        del modules, optimizers, opt_g, opt_psi, gen, guidance, ema  # (their shards go before the whole EMA comes)
        ema = Generator(run.new_model()).eval().requires_grad_(False)
        latest_checkpoint(run.run_dir).load_module("ema", ema)
    return ema, s2.steps, grid_path


@torch.no_grad()
def _copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """In place, so it works for sharded (DTensor) parameters as well as plain ones."""
    for a, b in zip(list(dst.parameters()) + list(dst.buffers()), list(src.parameters()) + list(src.buffers())):
        a.copy_(b)


class _SnappingTeacher:
    """Presents nearest-codebook ids of `q` to the teacher (`stage2.snap_prefix`)."""

    def __init__(self, teacher: Teacher) -> None:
        self._t = teacher

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def sampling_logits(self, x_BN, labels_B, settings):
        return self._t.sampling_logits(self._t.as_tokens(x_BN), labels_B, settings)


@dataclass
class Prepared:
    """What a request resolves to before anything is loaded or written (`prepare`)."""

    run_dir: Path
    info: dict  # what config.json will hold: teacher, weights, settings, and a resumed run's recorded facts
    settings: DistillSettings
    sources: dict[str, str]  # dotted setting key -> where its value comes from (`dd2 distill --list-settings`)


#: the source of a value taken from a resumed run's config.json
RUN_SOURCE = "run's config.json"


def prepare(req: DistillRequest) -> Prepared:
    """Resolve the run directory, the teacher and the settings, and where each setting comes from.

    No teacher is loaded and nothing is written here (`config.json` is written once the teacher loads), so
    `dd2 distill --list-settings` shows what a run would use by asking this function.
    """

    if req.stage not in ("1", "2", "all"):
        raise DD2Error(f"--stage must be 1, 2 or all, not '{req.stage}'.")
    options = [("--seed", {"seed": req.seed})] if req.seed is not None else []
    devices = [("--device", {"device": req.device})] if req.device is not None else []
    if req.resume is not None:
        run_dir = Path(req.resume)
        if req.out is not None and Path(req.out).resolve() != run_dir.resolve():
            raise DD2Error("Give either --out (a new run) or --resume (an existing run), not both.")
        if not (run_dir / "config.json").is_file():
            raise DD2Error(f"{run_dir} is not a dd2 distillation run (no config.json); check the path.")
        saved = read_json(run_dir / "config.json")
        if req.teacher is not None and req.teacher != saved["teacher"]:
            raise DD2Error(f"Run {run_dir} distils teacher '{saved['teacher']}', not '{req.teacher}'; resume it "
                           f"without --teacher or start a new run with --out.")
        if req.config is not None:
            raise DD2Error("--config cannot change a run being resumed; use --set for individual keys.")
        # the saved settings < --set < --seed < --device
        settings, sources = resolve_layers(DistillSettings, [(RUN_SOURCE, saved["settings"]),
                                                             *config_layers(None, req.overrides), *options, *devices])
        # the checkpoints hold networks of the saved architecture: refuse a change before anything is written
        for key in ("width", "depth", "mlp_ratio"):
            old, new = saved["settings"].get("head", {}).get(key), getattr(settings.head, key)
            if old is not None and old != new:
                raise DD2Error(f"Setting 'head.{key}' cannot change when resuming: the checkpoints of {run_dir} hold "
                               f"networks with head.{key} = {old}; drop that --set, or start a new run with --out.")
        info = {**saved, "settings": to_dict(settings)}
        if req.weights:
            info["weights"] = {**saved.get("weights", {}), **{k: str(v) for k, v in req.weights.items()}}
        return Prepared(run_dir, info, settings, sources)
    name = req.teacher or "var-digits"
    variant = get_variant(name)
    # dd2's defaults < the variant's < --seed < the TOML file < --set < --device
    settings, sources = resolve_layers(DistillSettings, [(f"{variant.name} defaults", dict(variant.distill_defaults)),
                                                         *options, *config_layers(req.config, req.overrides),
                                                         *devices])
    if req.stage == "2":
        raise DD2Error("--stage 2 needs the stage-1 result of an existing run; use it with --resume RUN_DIR.")
    run_dir = Path(req.out) if req.out is not None else new_folder(default_runs_dir(), variant.name)
    check_empty_out(run_dir, f"use --resume {run_dir} to continue that run, or choose another --out")
    info = {"dd2_version": __version__, "teacher": variant.name, "family": variant.family,
            "weights": {k: str(v) for k, v in req.weights.items()}, "settings": to_dict(settings)}
    return Prepared(run_dir, info, settings, sources)


def run(req: DistillRequest, progress: Progress | None = None,
        on_ready: Callable[[Path, dict], None] | None = None) -> DistillResult:
    """Run (or resume) a distillation; returns where the results are."""
    progress = progress or Progress()
    p = prepare(req)
    torch.manual_seed(p.settings.seed)  # for anything inside torch that draws from the global generator
    threads = _thread_count(p.settings, p.info.get("threads") if req.resume is not None else None, progress)
    with torch_threads(threads):
        # the count this run really computes with (0 = torch's default resolves here), recorded in config.json
        # so that --resume continues with the same float rounding (see the `threads` setting)
        p.info["threads"] = torch.get_num_threads()
        return _run(req, p.run_dir, p.info, p.settings, p.info["threads"], progress, on_ready)


def _thread_count(settings: DistillSettings, recorded: Any, progress: Progress) -> int:
    """The torch thread count of this start (0: leave torch's), from the `threads` setting and a resumed run's record.

    The count decides how CPU kernels split their float sums, so two counts give generators that differ in
    rounding, and the differences grow over training: a resumed run keeps the count its config.json records
    unless a count is asked for (`--set threads=N`), and says so when that, or what auto would pick now, differs.
    """
    asked = settings.threads
    if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded < 1:
        recorded = None  # a new run, or one written before dd2 recorded its count
    if recorded is not None and asked > 0:
        if asked != recorded:
            progress.message(f"warning: threads = {asked} differs from the {recorded} torch thread(s) this run was "
                             f"recorded with, so the rest of the run rounds differently from an uninterrupted one; "
                             f"drop --set threads={asked} to keep {recorded}")
        return asked
    if recorded is not None:  # auto (-1) or torch's default (0): the run's own count, not a new measurement's
        now = resolve_threads(asked) or torch.get_num_threads()
        if now != recorded:
            what = "one per idle core would be" if asked < 0 else "torch's default is"
            progress.message(f"warning: keeping the {recorded} torch thread(s) recorded in config.json ({what} "
                             f"{now} now) so that the resumed run rounds as it started; --set threads={now} "
                             f"uses {now} instead")
        elif asked < 0:
            progress.message(f"{recorded} torch thread(s), as recorded in config.json (threads = -1 keeps a "
                             f"resumed run's count)")
        return recorded
    count = resolve_threads(asked)
    if asked < 0:
        progress.message(f"{count} torch thread(s): one per idle core (threads = -1)")
    return count


def _run(req: DistillRequest, run_dir: Path, info: dict, settings: DistillSettings, threads: int,
         progress: Progress, on_ready: Callable[[Path, dict], None] | None) -> DistillResult:
    device = resolve_device(settings.device)
    dist = init_from_env(device)
    if dist.enabled and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    r = None
    interrupted, restore_sigint = _latch_ctrl_c()
    try:
        variant = get_variant(info["teacher"])
        teacher = variant.load(info.get("weights") or None, device=device).eval().requires_grad_(False)
        if settings.adapt.steps > 0:
            teacher = _adapt(teacher, settings, run_dir, dist, device, progress)
        info["teacher_identity"] = teacher.identity()
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "config.json", info)
        barrier(dist)
        if on_ready is not None:
            on_ready(run_dir, info)
        r = _Run(run_dir, settings, teacher, variant.name, dist, device, progress)
        r.interrupted = interrupted
        if settings.parallel == "fsdp" and not dist.enabled:
            progress.message("parallel = fsdp shards over the processes of torchrun; this single process trains "
                             "unsharded")
        if dist.is_main and remove_partial_checkpoints(run_dir):
            progress.message("removed the unfinished checkpoint folder(s) of an interrupted write")
        barrier(dist)
        # rank 0 may repair latest.json (a damaged latest checkpoint); the other ranks read it after the barrier
        ckpt = resume_checkpoint(run_dir, progress.message) if dist.is_main else None
        barrier(dist)
        if not dist.is_main:
            ckpt = latest_checkpoint(run_dir)
        if ckpt is not None and dist.is_main:
            truncate_metrics(run_dir, ckpt.stage, ckpt.step)
            progress.message(f"resuming from {ckpt.path.name}")
        result = DistillResult(run_dir=run_dir, teacher=variant.name, threads=threads)
        # stage 1 (skipped when a later checkpoint exists)
        if ckpt is None or ckpt.stage == 1:
            psi0 = _stage1(r, ckpt)
            _flow_init(r, ckpt)
        final1 = final_stage1_checkpoint(run_dir)
        resuming2 = ckpt is not None and ckpt.stage == 2  # (then the checkpoint holds the generator)
        generator_init = (final1.module_state("generator") if final1 is not None and final1.has_module("generator")
                          and not resuming2 else None)
        if r.sharded or (ckpt is not None and ckpt.stage == 2):  # stage 2 starts from plain (unsharded) weights
            if final1 is None:  # (a fresh model here would train half-tuned shards without a word)
                raise DD2Error(f"Run {run_dir} has no finished stage 1 to start stage 2 from; "
                               "resume it with --stage 1 first.")
            psi0 = r.new_model()
            final1.load_module("model", psi0)
        result.stage1_step = settings.stage1.steps
        if req.stage == "1":
            return result
        if req.stage == "2" and final1 is None:
            raise DD2Error(f"Run {run_dir} has no finished stage 1; run it first (--stage 1 or all).")
        ckpt2 = ckpt if resuming2 else None
        start = {"psi0": psi0, "generator": generator_init}
        del psi0, generator_init, final1  # (`_stage2` lets them go once its networks are built)
        result.generator, result.stage2_step, result.grid = _stage2(r, start, ckpt2)
        return result
    except KeyboardInterrupt:
        progress.stop()
        raise _interrupted(run_dir, r) from None
    finally:
        restore_sigint()
        cleanup(dist)


def _latch_ctrl_c() -> tuple[threading.Event, Callable[[], None]]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered: Python drops an exception raised while a
    finalizer runs ("Exception ignored in ..."), and the training loop then stops at its next step instead of
    going on. Returns the flag and what restores the previous handler (a no-op off the main thread)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return flag, lambda: None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:  # someone else handles Ctrl-C here: leave it to them
        return flag, lambda: None

    def on_ctrl_c(signum, frame):
        flag.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_ctrl_c)
    return flag, lambda: signal.signal(signal.SIGINT, previous)


def _interrupted(run_dir: Path, r: _Run | None) -> Interrupted:
    """The one line Ctrl-C prints: where the run stopped, what is kept, how to continue."""
    where = f" at {r.stage_name} step {r.step}" if r is not None else ""
    last = latest_checkpoint(run_dir)
    kept = (f"the last complete checkpoint is stage {last.stage} step {last.step}" if last is not None
            else "no checkpoint was written yet")
    return Interrupted(f"Interrupted{where}; {kept}, resume with `dd2 distill --resume {run_dir}`.")


def _adapt(teacher: Teacher, settings: DistillSettings, run_dir: Path, dist: DistInfo, device: str,
           progress: Progress) -> Teacher:
    """Continuous input adaptation (deterministic under the run's seed, so a resume redoes it identically)."""
    a = settings.adapt
    progress.message(f"continuous input adaptation: {a.steps} steps")
    adapted, report = teacher.adapt_continuous_input(
        steps=a.steps, batch_size=a.batch_size, lr=a.lr, train_model=a.train_model, noise_std=a.noise_std,
        generator=torch.Generator(device=device).manual_seed(settings.seed + 555))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "adaptation.json", report)
    before, after = report.get("before", {}), report.get("after", {})
    progress.message(f"adaptation: KL {before.get('kl', float('nan')):.3g} → {after.get('kl', float('nan')):.3g}, "
                     f"argmax agreement {before.get('argmax_agreement', float('nan')):.3f} → "
                     f"{after.get('argmax_agreement', float('nan')):.3f}")
    return adapted.eval().requires_grad_(False)
