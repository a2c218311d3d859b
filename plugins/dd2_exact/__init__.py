"""dd2 teacher family `exact`: generated teachers whose joint distribution over token ids is known exactly.

Variants `exact-raster` (4 tokens, one per AR step) and `exact-scales` (4 tokens in two VAR-like steps of 2)
need no weight files: a teacher is generated from its `ExactShape` (`Variant.options`), so the same name
gives the same teacher everywhere. They are the yardstick of the method's promise (Proposition 1): a
one-step generator's samples can be scored against the exact joint with `dd2 eval joint-tv`, next to the
set-prediction baseline and the teacher's own sampling noise. `dd2_exact.model.shape_family` generates more
of them for `benchmarks/fidelity.py`, and any plugin's tests can use them as a known-good reference.

This module imports no torch (registration stays instant); the loader imports the model code.
"""

from __future__ import annotations

from typing import Mapping

from dd2cli import Family, Variant, hookimpl

#: The recipe for small exact teachers (also spelled out in examples/configs/exact-teacher.toml): a long
#: initialisation stage (GTS + flow-map regression) from a freshly initialised backbone, then CSD with K = 4
#: guidance updates and 4 noise draws per update at a low generator learning rate. Numbers:
#: docs/experiments/proposition1.md and docs/experiments/fidelity.md.
EXACT_TEACHER_DEFAULTS: dict = {
    "threads": -1,
    "head": {"width": 128, "depth": 2, "mlp_ratio": 2.0},
    "stage1": {"steps": 800, "batch_size": 128, "lr": 1e-3, "backbone_lr": 1e-3, "head_only_steps": 0,
               "noise_draws": 2, "warmup_steps": 20, "grad_clip": 1.0},
    "flow_init": {"steps": 2400, "batch_size": 128, "lr": 1e-3, "euler_steps": 20},
    "stage2": {"steps": 400, "batch_size": 128, "guidance_updates": 4, "lr": 1e-4, "guidance_lr": 1e-3,
               "weighting": False, "balance_steps": True, "generator_draws": 4, "guidance_draws": 4,
               "grad_clip": 10.0, "warmup_steps": 50, "timesteps": {"kind": "uniform", "t_min": 0.05}},
    "run": {"checkpoint_every": 200, "sample_every": 0, "log_every": 100, "eval_samples": 0},
}


def _load(variant: Variant, weight_paths: Mapping[str, str], device: str):
    from .model import ExactShape, ExactTeacher  # torch only when a teacher is built

    options = dict(variant.options)
    options["tokens_per_step"] = tuple(options["tokens_per_step"])
    return ExactTeacher(ExactShape(**options), name=variant.name).to(device)


def _variant(name: str, description: str, **options) -> Variant:
    return Variant(name=name, description=description, loader=_load, image_size=options.get("image_size", 8),
                   options=options, distill_defaults=EXACT_TEACHER_DEFAULTS)


VARIANTS = (
    _variant("exact-raster", "exact joint: 4 tokens, 1 per AR step, 6 codes in 3-d, 2 classes",
             tokens_per_step=(1, 1, 1, 1), vocab_size=6, latent_dim=3,
             geometry="separated", strength=4.0, num_classes=2, seed=0, image_size=8),
    _variant("exact-scales", "exact joint: 4 tokens in 2 steps of 2 (scales), 6 codes in 3-d, 2 classes",
             tokens_per_step=(2, 2), vocab_size=6,
             latent_dim=3, geometry="separated", strength=4.0, num_classes=2, seed=1, image_size=8),
)

FAMILY = Family(
    name="exact",
    description="Generated teachers with an exactly known joint distribution (tests, benchmarks, Proposition 1)",
    variants=VARIANTS,
    bundle_factories=("dd2_exact.model:build_bundle_backbone", "dd2_exact.model:build_bundle_decoder"),
)


@hookimpl
def dd2_register_teachers(register):
    register(FAMILY)
