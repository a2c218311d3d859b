"""dd2 teacher family plugin: LlamaGen (FoundationVision/LlamaGen, class-conditional c2i models).

Variants: `llamagen-b`, `llamagen-l` (256 px), `llamagen-b-384`, `llamagen-l-384`, `llamagen-xl`,
`llamagen-xxl`, `llamagen-3b` (384 px), all with the VQ-16 tokenizer, and the bundled miniature
`llamagen-digits` (trained by `examples/train_llamagen_digits.py`, no download needed).

This module imports no torch: `dd2 --help` and `dd2 teachers` stay instant. The networks live in
`gpt.py` / `vq.py`, the teacher contract in `teacher.py`, continuous-input adaptation in `adapt.py`.
"""

from __future__ import annotations

from pathlib import Path

from dd2cli import CPU_DEMO_DEFAULTS, Family, Variant, WeightFile, hookimpl

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: the hub repository of the official files, downloaded on first use; no commit of it is pinned here, so the
#: files come from its "main" branch (see docs/teachers/llamagen.md)
HF_REPO = "FoundationVision/LlamaGen"
HF_REVISION = "main"
HF_URL = f"https://huggingface.co/{HF_REPO}/resolve/{HF_REVISION}/"

VQ_FILE = WeightFile(
    key="vq",
    filename="vq_ds16_c2i.pt",
    description="LlamaGen VQ-16 tokenizer, 72M params",
    url=HF_URL + "vq_ds16_c2i.pt",
    hf_repo=HF_REPO,
    revision=HF_REVISION,
)

#: (variant name, GPT size, image size, official checkpoint, params, upstream README FID)
_OFFICIAL = (
    ("llamagen-b", "B", 256, "c2i_B_256.pt", "111M", "5.46"),
    ("llamagen-l", "L", 256, "c2i_L_256.pt", "343M", "3.80"),
    ("llamagen-b-384", "B", 384, "c2i_B_384.pt", "111M", "6.09"),
    ("llamagen-l-384", "L", 384, "c2i_L_384.pt", "343M", "3.07"),
    ("llamagen-xl", "XL", 384, "c2i_XL_384.pt", "775M", "2.62"),
    ("llamagen-xxl", "XXL", 384, "c2i_XXL_384.pt", "1.4B", "2.34"),
    ("llamagen-3b", "3B", 384, "c2i_3B_384.pt", "3.1B", "2.18"),
)

def _load_official(variant, weight_paths, device):
    from .teacher import load_official_variant  # heavy imports only when a teacher is used

    return load_official_variant(variant, weight_paths, device)


def _skeleton(variant):
    from .teacher import skeleton_teacher

    return skeleton_teacher(variant)


def _load_bundled(variant, weight_paths, device):
    from .teacher import load_bundled_variant

    return load_bundled_variant(variant, weight_paths, device)


def official_variants() -> tuple[Variant, ...]:
    out = []
    for name, size, image_size, filename, params, fid in _OFFICIAL:
        grid = image_size // 16
        out.append(Variant(
            name=name,
            description=f"LlamaGen GPT-{size} c2i, {image_size} px, {grid}x{grid}={grid * grid} tokens, "
                        f"{params} params (upstream FID {fid})",
            loader=_load_official,
            weights=(
                WeightFile(key="gpt", filename=filename, description=f"LlamaGen GPT-{size} {image_size} px",
                           url=HF_URL + filename, hf_repo=HF_REPO, revision=HF_REVISION),
                VQ_FILE,
            ),
            image_size=image_size,
            base_model="FoundationVision/LlamaGen",
            license="mit",
            options={"gpt_size": size, "image_size": image_size},
            skeleton=_skeleton,
        ))
    return tuple(out)


def digits_variant() -> Variant:
    return Variant(
        name="llamagen-digits",
        description="Miniature LlamaGen (VQ + 3-layer GPT) on 16x16 scikit-learn digits, 4x4=16 tokens, "
                    "bundled (no download)",
        loader=_load_bundled,
        weights=(
            WeightFile(key="gpt", filename="llamagen_digits_gpt.safetensors", description="digits GPT",
                       bundled=WEIGHTS_DIR / "llamagen_digits_gpt.safetensors"),
            WeightFile(key="vq", filename="llamagen_digits_vq.safetensors", description="digits VQ tokenizer",
                       bundled=WEIGHTS_DIR / "llamagen_digits_vq.safetensors"),
        ),
        image_size=16,
        features="digits",
        license="mit",  # trained by this project (examples/train_llamagen_digits.py)
        distill_defaults=CPU_DEMO_DEFAULTS,
        options={"config": str(WEIGHTS_DIR / "llamagen_digits.json")},
    )


FAMILY = Family(
    name="llamagen",
    description="LlamaGen class-conditional GPTs (FoundationVision/LlamaGen) with the VQ-16 tokenizer",
    variants=official_variants() + (digits_variant(),),
    bundle_factories=("dd2_llamagen.export:build_backbone", "dd2_llamagen.export:build_decoder"),
)


@hookimpl
def dd2_register_teachers(register):
    register(FAMILY)
