"""dd2 teacher family plugin "raster": a raster-order AR transformer over 8×8 digit grey levels.

One variant, `raster-digits`, whose weights ship inside this package (trained by `train.py`).
This module imports no torch, so `dd2 --help` and `dd2 teachers` stay instant: the network and the
teacher contract live in `dd2_raster_digits.model`, imported only when the teacher is loaded.
"""

from __future__ import annotations

from pathlib import Path

from dd2cli import CPU_DEMO_DEFAULTS, Family, Variant, WeightFile, deep_merge, hookimpl

__version__ = "0.1.0"

WEIGHTS_FILE = Path(__file__).parent / "weights" / "raster_digits.safetensors"


#: Sized for a 2-core CPU: about 10 minutes end to end (quality table included), recognisable digits with the
#: teacher's class-consistency (measured numbers in docs/experiments/raster-digits.md). A raster step costs a
#: 64-position forward pass, so the teacher's sequences are drawn once (`cache_sequences`) instead of every
#: stage-1 step, and stage 2 trades draws per step for a larger learning rate on a smaller batch.
DISTILL_DEFAULTS = deep_merge(CPU_DEMO_DEFAULTS, {
    "stage1": {"steps": 300, "cache_sequences": 1024},
    "stage2": {"steps": 300, "batch_size": 32, "lr": 1e-3, "generator_draws": 1, "guidance_draws": 1},
    "run": {"checkpoint_every": 100, "sample_every": 100},
})


def _load(variant, weight_paths, device):
    from .model import load_teacher  # heavy imports (torch) only when the teacher is used

    return load_teacher(variant, weight_paths, device)


VARIANT = Variant(
    name="raster-digits",
    description="Raster-order AR transformer (2 layers, width 64) on 8x8 scikit-learn digits, "
                "64 tokens x 17 grey levels, bundled (no download)",
    loader=_load,
    weights=(WeightFile(key="model", filename="raster_digits.safetensors",
                        description="raster transformer weights", bundled=WEIGHTS_FILE),),
    image_size=8,
    features="digits",  # `dd2 eval --features auto` scores its samples with the digits classifier
    distill_defaults=DISTILL_DEFAULTS,
)

FAMILY = Family(
    name="raster",
    description="Example third-party family: raster-order pixel AR model (dd2-raster-digits)",
    variants=(VARIANT,),
    # what `RasterTeacher.bundle_parts` names: the only functions a bundle of this family may call
    bundle_factories=("dd2_raster_digits.model:build_bundle_backbone", "dd2_raster_digits.model:build_bundle_decoder"),
)


@hookimpl
def dd2_register_teachers(register):
    register(FAMILY)
