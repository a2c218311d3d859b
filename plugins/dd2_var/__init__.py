"""dd2 teacher family `var`: VAR (next-scale prediction, FoundationVision/VAR) as a DD2 teacher.

Variants: `var-d16`, `var-d20`, `var-d24`, `var-d30` (256 px), `var-d36` (512 px, shared AdaLN),
all reading the official `.pth` files strictly, and `var-digits`, a miniature trained by
`examples/train_var_digits.py` and bundled in `weights/` (no download).

This module imports no torch: registration must stay instant (`dd2 teachers`, `dd2 --help`);
the loader imports the model code when a teacher is actually built. The paper's sampling values
travel in `TeacherSpec.stage1 / .target / .evaluation` (set from `Variant.options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from dd2cli import CPU_DEMO_DEFAULTS, Family, SamplingSettings, Variant, WeightFile, deep_merge, hookimpl

#: the hub repository of the official files, downloaded on first use; no commit of it is pinned here, so the
#: files come from its "main" branch (see docs/teachers/var.md)
HF_REPO = "FoundationVision/var"
HF_REVISION = "main"
_HF = f"https://huggingface.co/{HF_REPO}/resolve/{HF_REVISION}"
WEIGHTS_DIR = Path(__file__).parent / "weights"
DIGITS_CONFIG = WEIGHTS_DIR / "var_digits.json"

# Paper (DD2 §4/App. C; VAR README): stage-1 data from cfg 2.0 / top-k 900; distillation target
# cfg 2.0 / top-k 900 / top-p 0.95; teacher evaluation as VAR's FID runs: cfg 1.5 / 900 / 0.96.
STAGE1 = SamplingSettings(cfg=2.0, top_k=900, top_p=1.0)
TARGET = SamplingSettings(cfg=2.0, top_k=900, top_p=0.95)
EVALUATION = SamplingSettings(cfg=1.5, top_k=900, top_p=0.96)

# var-digits has V = 128: top-k 900 of 4096 keeps 22% of the vocabulary, so keep 28 of 128.
DIGITS_TOP_K = 28
DIGITS_STAGE1 = SamplingSettings(cfg=2.0, top_k=DIGITS_TOP_K, top_p=1.0)
DIGITS_TARGET = SamplingSettings(cfg=2.0, top_k=DIGITS_TOP_K, top_p=0.95)
DIGITS_EVALUATION = SamplingSettings(cfg=1.5, top_k=DIGITS_TOP_K, top_p=0.96)



def _distill_defaults() -> dict:
    """Paper (App. C): for VAR, stage 1 first trains the head with the backbone frozen, then
    everything. How long is ours: a fifth of the engine's default 1,500 stage-1 steps."""
    return {"stage1": {"head_only_steps": 300}}


_PARAMS = {16: "310M", 20: "600M", 24: "1.0B", 30: "2.0B", 36: "2.3B"}
_FID = {16: "3.55", 20: "2.95", 24: "2.33", 30: "1.97", 36: "2.63 @512"}


def _load(variant: Variant, weight_paths: Mapping[str, Path], device: str):
    from .teacher import load_variant  # torch and the model code load only here

    return load_variant(variant, weight_paths, device)


_VAE_FILE = WeightFile(
    key="vae",
    filename="vae_ch160v4096z32.pth",
    description="VAR multi-scale VQVAE tokenizer (V=4096, Cvae=32)",
    url=f"{_HF}/vae_ch160v4096z32.pth",
    hf_repo=HF_REPO,
    revision=HF_REVISION,
)


def _skeleton(variant: Variant):
    from .teacher import skeleton_teacher

    return skeleton_teacher(variant)


def _official(depth: int) -> Variant:
    size = 512 if depth == 36 else 256
    extra = ", shared AdaLN, unverified config" if depth == 36 else ""
    return Variant(
        name=f"var-d{depth}",
        description=f"VAR-d{depth} ({_PARAMS[depth]}, {size} px ImageNet, FID {_FID[depth]}{extra})",
        loader=_load,
        weights=(
            WeightFile(key="var", filename=f"var_d{depth}.pth",
                       description=f"VAR-d{depth} transformer", url=f"{_HF}/var_d{depth}.pth",
                       hf_repo=HF_REPO, revision=HF_REVISION),
            _VAE_FILE,
        ),
        image_size=size,
        base_model="FoundationVision/var",
        license="mit",
        distill_defaults=_distill_defaults(),
        options={"depth": depth, "stage1": STAGE1, "target": TARGET, "evaluation": EVALUATION},
        skeleton=_skeleton,
    )


def _digits() -> Variant:
    return Variant(
        name="var-digits",
        description="Miniature VAR on scikit-learn digits (16 px, 4 scales, bundled, CPU demo)",
        loader=_load,
        weights=(
            WeightFile(key="var", filename="var_digits_transformer.safetensors", description="var-digits transformer",
                       bundled=WEIGHTS_DIR / "var_digits_transformer.safetensors"),
            WeightFile(key="vae", filename="var_digits_vae.safetensors",
                       description="var-digits tokenizer", bundled=WEIGHTS_DIR / "var_digits_vae.safetensors"),
        ),
        image_size=16,
        features="digits",
        license="mit",  # trained by this project (examples/train_var_digits.py)
        # stage 1 ends with a flow-map phase, which gives CSD a much better start than a copy of ψ₀; 450 CSD updates
        # keep the CPU demo under 15 minutes (docs/experiments/digits.md)
        distill_defaults=deep_merge(CPU_DEMO_DEFAULTS, {"stage1": {"head_only_steps": 100},
                                                        "flow_init": {"steps": 400}, "stage2": {"steps": 450}}),
        options={"config": str(DIGITS_CONFIG), "stage1": DIGITS_STAGE1, "target": DIGITS_TARGET,
                 "evaluation": DIGITS_EVALUATION},
    )


def family() -> Family:
    return Family(
        name="var",
        description="VAR: visual auto-regressive modelling by next-scale prediction (FoundationVision/VAR)",
        variants=(_official(16), _official(20), _official(24), _official(30), _official(36), _digits()),
        bundle_factories=("dd2_var.export:build_backbone", "dd2_var.export:build_decoder"),
    )


@hookimpl
def dd2_register_teachers(register) -> None:
    register(family())
