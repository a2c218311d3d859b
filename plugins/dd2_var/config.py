"""Torch-free configuration of the VAR transformer and its multi-scale VQVAE tokenizer.

Every size is a field, so the released models (`var_config(depth)`, `VQVAEConfig()`) and the CPU
miniatures (tests, the bundled `var-digits`) are built by the same classes. Defaults are the
official values of FoundationVision/VAR (docs/teachers/var.md §1–2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

#: the 256-px scale schedule of VAR-d16..d30 (680 tokens)
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
#: the 512-px schedule of VAR-d36 (2240 tokens)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def _tuple_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists back to tuples; unknown keys are an error (a config from another version)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field '{unknown[0]}'")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


@dataclass(frozen=True)
class VQVAEConfig:
    """The multi-scale VQVAE (`vae_ch160v4096z32` by default)."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: width of a codebook vector
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # the decoder uses one more per level
    in_channels: int = 3
    dropout: float = 0.0
    using_sa: bool = True  # attention blocks at the lowest-resolution level
    using_mid_sa: bool = True
    norm_groups: int = 32  # GroupNorm groups; the official value needs channels divisible by 32
    beta: float = 0.25  # commitment weight (training only)
    quant_resi: float = 0.5  # φ(h) = (1−r)·h + r·conv(h)
    share_quant_resi: int = 4  # number of φ convs shared over the scales (PhiPartiallyShared)
    patch_nums: tuple[int, ...] = PATCH_NUMS_256

    def __post_init__(self) -> None:
        if self.share_quant_resi < 1:
            raise ValueError("share_quant_resi must be >= 1 (only the partially shared φ is implemented)")
        if list(self.patch_nums) != sorted(set(self.patch_nums)) or not self.patch_nums:
            raise ValueError("patch_nums must be strictly increasing")

    @property
    def downsample(self) -> int:
        """Image pixels per latent cell: one 2× downsampling between consecutive levels."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        return self.downsample * self.patch_nums[-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VQVAEConfig":
        return cls(**_tuple_fields(cls, data))


@dataclass(frozen=True)
class VARConfig:
    """The VAR transformer. `width`/`num_heads` default to the official `64·depth` / `depth`."""

    depth: int = 16
    width: int = 0  # 0 → 64·depth
    num_heads: int = 0  # 0 → depth (head_dim 64)
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: the transformer reads continuous codebook-space vectors
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    shared_aln: bool = False  # d36: one shared AdaLN linear plus per-block `ada_gss`
    attn_l2_norm: bool = True

    def __post_init__(self) -> None:
        if self.width == 0:
            object.__setattr__(self, "width", 64 * self.depth)
        if self.num_heads == 0:
            object.__setattr__(self, "num_heads", self.depth)
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if list(self.patch_nums) != sorted(set(self.patch_nums)) or not self.patch_nums:
            raise ValueError("patch_nums must be strictly increasing")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_tokens(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def scale_of_tokens(self) -> tuple[int, ...]:
        """The scale index (= AR step) of every token, scales concatenated, row-major inside."""
        return tuple(si for si, pn in enumerate(self.patch_nums) for _ in range(pn * pn))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VARConfig":
        return cls(**_tuple_fields(cls, data))


def var_config(depth: int, *, patch_nums: tuple[int, ...] | None = None, shared_aln: bool | None = None) -> VARConfig:
    """The released VAR-d{depth} transformer config (`build_vae_var`: width 64·depth, heads = depth).

    d36 is the 512-px model with shared AdaLN; every other depth uses the 256-px schedule.
    """
    if patch_nums is None:
        patch_nums = PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256
    if shared_aln is None:
        shared_aln = depth == 36
    return VARConfig(depth=depth, patch_nums=tuple(patch_nums), shared_aln=shared_aln)


def vae_config(patch_nums: tuple[int, ...] = PATCH_NUMS_256) -> VQVAEConfig:
    """`vae_ch160v4096z32` with the scale schedule of the transformer that uses it."""
    return VQVAEConfig(patch_nums=tuple(patch_nums))
