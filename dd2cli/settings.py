"""Settings of `dd2 distill` (docs/method.md §4–§5). Every choice the paper leaves open is here, documented.

Defaults are sized for the bundled digits teachers on a CPU; teacher plugins override them per
variant (`Variant.distill_defaults`, the paper's values for VAR and LlamaGen), then a TOML file
(`--config`) and `--set key=value` apply on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .config import setting
from .errors import ConfigError
from .teachers import SamplingSettings


@dataclass
class SamplingOverride:
    """Optional changes to one of the teacher's sampling settings (unset = the variant's default)."""

    cfg: Optional[float] = setting(None, "guidance weight in the family's convention")
    top_k: Optional[int] = setting(None, "keep the k most likely tokens (0 = all)")
    top_p: Optional[float] = setting(None, "nucleus threshold (1.0 = off)")
    temperature: Optional[float] = setting(None, "softmax temperature")
    cfg_interval: Optional[int] = setting(None, "LlamaGen: guidance only up to this position (-1 = always)")

    def apply(self, base: SamplingSettings) -> SamplingSettings:
        return base.with_overrides(cfg=self.cfg, top_k=self.top_k, top_p=self.top_p, temperature=self.temperature,
                                   cfg_interval=self.cfg_interval)


@dataclass
class TimestepSettings:
    kind: Literal["uniform", "logit-normal"] = setting("uniform", "distribution of t in [t_min, 1] (ours)")
    t_min: float = setting(1e-3, "smallest t (the closed-form score is singular at 0)")
    mean: float = setting(0.0, "logit-normal: mean of the normal")
    std: float = setting(1.0, "logit-normal: standard deviation of the normal")


@dataclass
class HeadSettings:
    width: int = setting(256, "hidden width of the MLP head")
    depth: int = setting(3, "number of residual AdaLN MLP blocks")
    mlp_ratio: float = setting(2.0, "hidden expansion inside each block")


@dataclass
class Stage1Settings:
    steps: int = setting(1500, "optimiser steps of GTS tuning (0 skips stage 1: head untrained)")
    batch_size: int = setting(64, "sequences per step (global, split over ranks)")
    lr: float = setting(3e-4, "learning rate of the head")
    backbone_lr: float = setting(1e-4, "learning rate of the backbone once it trains")
    head_only_steps: int = setting(0, "first steps with the backbone frozen (paper: VAR yes, LlamaGen no)")
    noise_draws: int = setting(4, "noisy draws (t, ε) per position per backbone pass (MAR's trick)")
    warmup_steps: int = setting(50, "linear learning-rate warm-up")
    lr_decay: Literal["none", "cosine"] = setting("none", "after warm-up: constant learning rates, or a cosine "
                                                          "decay of both to lr_final · lr at the last step (ours)")
    lr_final: float = setting(0.0, "with lr_decay = cosine: the last step's fraction of each learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient norm clip (0 = off)")
    data: str = setting("teacher", "'teacher' = sequences drawn from the teacher; or a .safetensors token dataset "
                                   "with 'tokens' (N, n) int and 'labels' (N,) int")
    cache_sequences: int = setting(0, "> 0: draw this many teacher sequences once into token shards under the "
                                      "run directory (reused on restart); 0: draw fresh ones every step")
    sampling: SamplingOverride = setting(SamplingOverride(), "teacher sampling for the data (default: the "
                                                            "variant's stage-1 settings)")
    timesteps: TimestepSettings = setting(TimestepSettings(), "timestep distribution of the GTS loss")


@dataclass
class FlowInitSettings:
    steps: int = setting(0, "> 0: at the end of stage 1, regress the generator onto the teacher's flow map for this "
                            "many updates, so that CSD starts near the teacher's joint (ours, DD1-style; costs one "
                            "teacher pass per AR step per update)")
    batch_size: int = setting(64, "sequences per update (global, split over ranks)")
    lr: float = setting(1e-3, "learning rate of the generator during the regression")
    warmup_steps: int = setting(20, "linear learning-rate warm-up from 1e-6")
    euler_steps: int = setting(20, "Euler steps of the closed-form ODE per AR step (from t = 1 to 0)")
    grad_clip: float = setting(1.0, "gradient norm clip (0 = off)")


@dataclass
class Stage2Settings:
    steps: int = setting(1500, "generator updates")
    batch_size: int = setting(64, "sequences per update (global, split over ranks)")
    guidance_updates: int = setting(2, "K: guidance updates per generator update (paper: 5, later 2)")
    lr: float = setting(1e-4, "generator learning rate (after warm-up)")
    guidance_lr: float = setting(1e-4, "guidance learning rate")
    warmup_steps: int = setting(100, "generator learning rate warms up linearly from 1e-6 over these updates")
    lr_decay: Literal["none", "cosine"] = setting("none", "after warm-up: constant generator learning rate, or a "
                                                          "cosine decay to lr_final · lr at the last update (ours)")
    lr_final: float = setting(0.0, "with lr_decay = cosine: the last update's fraction of the learning rate")
    decay_guidance: bool = setting(False, "apply lr_decay to the guidance learning rate too (no warm-up)")
    alpha: float = setting(1.0, "SiD's α (paper: 1.0)")
    weighting: bool = setting(True, "per-position weight 1/(mean|q − D_real| + 1e-5) (ours, DMD/SiD-style)")
    balance_steps: bool = setting(False, "weight positions so that every AR step counts equally in both stage-2 "
                                         "losses (ours; matters for VAR, whose late scales hold most tokens)")
    guidance_draws: int = setting(1, "noisy draws per position in each guidance update")
    generator_draws: int = setting(1, "noisy draws per position in each generator update (variance reduction)")
    ema_max: float = setting(0.9999, "cap of the progressive EMA rate min(cap, (it+1)/(it+10))")
    align_at: int = setting(0, "performance alignment at this generator update: generator ← EMA, then "
                               "guidance-only updates (0 = off)")
    align_steps: int = setting(0, "guidance-only updates during alignment")
    grad_clip: float = setting(1.0, "gradient norm clip for both networks (0 = off)")
    snap_prefix: bool = setting(False, "give the teacher nearest-codebook ids of q instead of q itself "
                                       "(always done by teachers that read ids)")
    init_generator: Literal["ar-diffusion", "backbone"] = setting(
        "ar-diffusion", "initialise the generator from the tuned AR-diffusion model, or from the teacher "
                        "backbone with a fresh head (ablation, paper Tab. 4)")
    init_guidance: Literal["ar-diffusion", "backbone"] = setting("ar-diffusion", "same choice for the guidance")
    timesteps: TimestepSettings = setting(TimestepSettings(), "timestep distribution of both stage-2 losses")


@dataclass
class AdaptSettings:
    steps: int = setting(0, "> 0: before stage 1, fine-tune a continuous-input copy of an id-reading teacher "
                            "(LlamaGen) by KL to the original on its own samples, and use it as the teacher (ours)")
    batch_size: int = setting(32, "sequences per adaptation step")
    lr: float = setting(1e-4, "adaptation learning rate")
    train_model: bool = setting(False, "also fine-tune the teacher transformer, not only the input adapter")
    noise_std: float = setting(0.05, "Gaussian noise added to codebook vectors during adaptation (robustness)")


@dataclass
class ScoreSettings:
    chunk_size: int = setting(4096, "rows (positions) per chunk of the closed-form score")
    support: int = setting(0, "> 0: pass the teacher's top-k support (k <= support) instead of dense "
                              "probabilities (saves memory at large V)")


@dataclass
class RunSettings:
    checkpoint_every: int = setting(500, "checkpoint every N steps (and at the end of each stage)")
    sample_every: int = setting(500, "write a generator sample grid every N stage-2 updates (0 = end only)")
    log_every: int = setting(10, "append metrics every N steps")
    keep_checkpoints: int = setting(2, "checkpoints kept per stage (the end of stage 1 is always kept)")
    grid_per_class: int = setting(8, "samples per class row in grids")
    grid_classes: int = setting(10, "class rows in grids: the first N classes (fewer if the teacher has fewer)")
    eval_samples: int = setting(0, "> 0: at the end, report digits metrics on this many samples (digits teachers)")


@dataclass
class DistillSettings:
    seed: int = setting(0, "base random seed (ranks add their rank)")
    device: str = setting("auto", "'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    threads: int = setting(0, "CPU threads for torch: -1 = one per core idle at start, 0 = torch's default, "
                              "N = N. The count changes how float sums are split, so the same seed gives slightly "
                              "different weights with another count; config.json records the count a run used and "
                              "--resume keeps it (a warning when --set threads=N or auto now differs)")
    activation_checkpointing: bool = setting(False, "recompute backbone activations in the backward pass "
                                                    "(less memory, about one more backbone forward per step)")
    precision: Literal["fp32", "bf16"] = setting("fp32", "bf16 autocast (CUDA only); the closed-form score stays fp32")
    parallel: Literal["ddp", "fsdp"] = setting("ddp", "under torchrun: 'ddp' replicates the networks on every rank; "
                                                      "'fsdp' shards their parameters, gradients and optimiser "
                                                      "state (FSDP2) for backbones that do not fit one device")
    target: SamplingOverride = setting(SamplingOverride(), "teacher sampling that defines the real score "
                                                          "(default: the variant's distillation target)")
    adapt: AdaptSettings = setting(AdaptSettings(), "optional continuous input adaptation of the teacher")
    head: HeadSettings = setting(HeadSettings(), "the MLP head shared by all three networks")
    stage1: Stage1Settings = setting(Stage1Settings(), "stage 1: AR-diffusion tuning with the GTS loss")
    flow_init: FlowInitSettings = setting(FlowInitSettings(), "optional end of stage 1: the generator regressed "
                                                              "onto the teacher's flow map")
    stage2: Stage2Settings = setting(Stage2Settings(), "stage 2: conditional score distillation")
    score: ScoreSettings = setting(ScoreSettings(), "closed-form score computation")
    run: RunSettings = setting(RunSettings(), "logging, checkpoints, sample grids")

    def validate(self) -> None:
        flow = self.flow_init.steps > 0  # (the flow_init settings matter only then)
        positive = [("stage1.batch_size", self.stage1.batch_size), ("stage2.batch_size", self.stage2.batch_size),
                    ("stage1.noise_draws", self.stage1.noise_draws), ("head.width", self.head.width),
                    ("stage2.guidance_draws", self.stage2.guidance_draws),
                    ("stage2.generator_draws", self.stage2.generator_draws),
                    ("run.checkpoint_every", self.run.checkpoint_every), ("run.log_every", self.run.log_every),
                    ("run.grid_per_class", self.run.grid_per_class), ("run.grid_classes", self.run.grid_classes)]
        if flow:
            positive += [("flow_init.batch_size", self.flow_init.batch_size),
                         ("flow_init.euler_steps", self.flow_init.euler_steps)]
        for name, value in positive:
            if value <= 0:
                raise ConfigError(f"Setting '{name}' must be positive, got {value}.")
        for name, value in (("stage1.steps", self.stage1.steps), ("stage2.steps", self.stage2.steps),
                            ("flow_init.steps", self.flow_init.steps),
                            ("stage2.guidance_updates", self.stage2.guidance_updates)):
            if value < 0:
                raise ConfigError(f"Setting '{name}' must be >= 0, got {value}.")
        if self.threads < -1:
            raise ConfigError(f"Setting 'threads' must be a count >= 1, 0 (torch's default) or -1 (auto), "
                              f"got {self.threads}.")
        if flow and self.stage2.init_generator != "ar-diffusion":
            raise ConfigError("flow_init.steps > 0 trains the generator's initialisation, which "
                              f"stage2.init_generator = '{self.stage2.init_generator}' would discard; set one "
                              "of them back (flow_init.steps = 0 or stage2.init_generator = 'ar-diffusion').")
        rates = [("stage1.lr", self.stage1.lr), ("stage2.lr", self.stage2.lr),
                 ("stage2.guidance_lr", self.stage2.guidance_lr)]
        for name, value in rates + ([("flow_init.lr", self.flow_init.lr)] if flow else []):
            if not value > 0:
                raise ConfigError(f"Setting '{name}' must be > 0, got {value}.")
        for ts_name, ts in (("stage1.timesteps", self.stage1.timesteps), ("stage2.timesteps", self.stage2.timesteps)):
            if not 0 < ts.t_min < 1:
                raise ConfigError(f"Setting '{ts_name}.t_min' must be in (0, 1), got {ts.t_min}.")
        for name, value in (("stage1.lr_final", self.stage1.lr_final), ("stage2.lr_final", self.stage2.lr_final)):
            if not 0 <= value <= 1:
                raise ConfigError(f"Setting '{name}' must be in [0, 1] (a fraction of the learning rate), "
                                  f"got {value}.")


#: Defaults for the bundled CPU demo teachers (`var-digits`, `llamagen-digits`), plain data a plugin applies
#: with `deep_merge`. A smaller head and fewer noise draws (the head dominates the cost at this size); stage 2
#: without per-position weighting, several draws per position, step balancing and t_min 0.4, which converged
#: best on the exact-joint test teachers and on both digits teachers (docs/experiments/digits.md).
CPU_DEMO_DEFAULTS: dict = {
    # small models slow down badly when a torch thread waits for a core another job holds: one per idle core
    "threads": -1,
    "head": {"width": 128, "depth": 2},
    "stage1": {"steps": 600, "batch_size": 64, "lr": 1e-3, "noise_draws": 2, "warmup_steps": 20},
    "stage2": {"steps": 600, "batch_size": 64, "lr": 3e-4, "guidance_lr": 1e-3, "guidance_updates": 4,
               "weighting": False, "balance_steps": True, "generator_draws": 2, "guidance_draws": 2,
               "grad_clip": 10.0, "warmup_steps": 50, "timesteps": {"t_min": 0.4}},
    "run": {"checkpoint_every": 200, "sample_every": 200, "eval_samples": 1000},
}
