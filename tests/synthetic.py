"""A synthetic teacher whose joint distribution over token ids is known exactly.

Used only inside the test suite (registered by `conftest.py` as plugin "synthetic"). Positions are
grouped into AR steps (several tokens per step, like VAR scales, or one per step); every position
has a conditional table `p(x_i | class, tokens of earlier steps)`, built with strong correlations
(the paper's {(0,0),(1,1)} example: a later token copies an earlier one with high probability).
Tokens of the same step are independent given earlier steps, so the joint is the product of the
tables and can be enumerated (V^n entries).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from dd2_exact.model import ExactBackbone, ExactDecoder, ExactShape, ExactTeacher, build_bundle_backbone, build_bundle_decoder
from dd2cli import BundleParts, hookimpl
from dd2cli.teacher import Backbone
from dd2cli.teachers import Family, SamplingSettings, Variant

# the test teacher's networks and bundle factories are the exact family's; a bundle of this test family names the
# factories under this module (`synthetic:build_bundle_backbone`), hence the re-export
SyntheticBackbone, SyntheticDecoder = ExactBackbone, ExactDecoder
BUNDLE_FACTORIES = (build_bundle_backbone, build_bundle_decoder)


def _tokens_per_step(steps: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sum(1 for s in steps if s == step) for step in sorted(set(steps)))


class SyntheticTeacher(ExactTeacher):
    """The exact teacher the project's own tests were written against: a later token copies (a class shift of)
    the *last* position of the earlier steps, and sampling for evaluation uses cfg 1.5 / top-k V − 1 (so that
    guidance and filtering are exercised)."""

    def __init__(self, steps: tuple[int, ...] = (0, 1, 2), vocab_size: int = 4, latent_dim: int = 2,
                 num_classes: int = 2, seed: int = 0, strength: float = 4.0, image_size: int = 4,
                 backbone_width: int = 64, backbone_depth: int = 2, name: str = "synthetic") -> None:
        if list(steps) != sorted(steps):
            raise ValueError(f"steps must be non-decreasing, got {steps}")
        shape = ExactShape(_tokens_per_step(tuple(steps)), vocab_size, latent_dim, "separated", strength, num_classes,
                           seed, image_size)
        super().__init__(shape, name=name, backbone_width=backbone_width, backbone_depth=backbone_depth)
        self.spec = dataclasses.replace(self.spec, evaluation=SamplingSettings(cfg=1.5, top_k=vocab_size - 1))

    def _make_tables(self, g: torch.Generator) -> list[Tensor]:
        V, C = self.shape.vocab_size, self.shape.num_classes
        tables = []
        for par in self.parents:
            k = len(par)
            logits = torch.randn(C + 1, V ** k, V, generator=g)
            if k:  # strong correlation: copy (a class-dependent shift of) the most recent parent
                last = torch.tensor(list(itertools.product(range(V), repeat=k)))[:, -1]
                for c in range(C + 1):
                    logits[c, torch.arange(V ** k), (last + c) % V] += self.shape.strength
            else:
                logits[:, 0, : max(1, V // 2)] += 1.0  # make the first position clearly non-uniform
            tables.append(logits)
        return tables

    def identity(self) -> dict:
        return {"teacher": self.variant_name}

    def bundle_parts(self, backbone: Backbone) -> BundleParts:
        parts = super().bundle_parts(backbone)
        return dataclasses.replace(
            parts, backbone=dataclasses.replace(parts.backbone, factory="synthetic:build_bundle_backbone"),
            decoder=dataclasses.replace(parts.decoder, factory="synthetic:build_bundle_decoder"))


def _load_synthetic(variant: Variant, weights: Mapping[str, Path], device: str) -> SyntheticTeacher:
    return SyntheticTeacher(**variant.options).to(device)


SYNTHETIC_VARIANTS = (
    Variant(name="synthetic-corr", description="3 positions, one per step, 4 codes in 2-d, strong correlations",
            loader=_load_synthetic, image_size=4, options={"steps": (0, 1, 2)}),
    Variant(name="synthetic-scales", description="6 positions in 3 steps (1, 2, 3 tokens) like VAR scales",
            loader=_load_synthetic, image_size=4, options={"steps": (0, 1, 1, 2, 2, 2), "vocab_size": 3}),
)


class SyntheticPlugin:
    """The test-only plugin object (registered by conftest)."""

    @hookimpl
    def dd2_register_teachers(self, register):
        register(Family(name="synthetic", description="exact-joint test teachers", variants=SYNTHETIC_VARIANTS,
                        bundle_factories=("synthetic:build_bundle_backbone", "synthetic:build_bundle_decoder")))
