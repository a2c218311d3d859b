"""A synthetic teacher whose joint distribution over token ids is known exactly.

Used only inside the test suite (registered by `conftest.py` as plugin "synthetic"). Positions are
grouped into AR steps (several tokens per step, like VAR scales, or one per step); every position
has a conditional table `p(x_i | class, tokens of earlier steps)`, built with strong correlations
(the paper's {(0,0),(1,1)} example: a later token copies an earlier one with high probability).
Tokens of the same step are independent given earlier steps, so the joint is the product of the
tables and can be enumerated (V^n entries).
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from dd2cli import BundleParts, ModuleRecipe, bundle_factory, hookimpl
from dd2cli.teacher import Backbone, Teacher
from dd2cli.teachers import Family, SamplingSettings, TeacherSpec, Variant


class SyntheticBackbone(Backbone):
    """A small block-causal cross-attention network: query `i` sees the label and `z_j`, step(j) < step(i)."""

    def __init__(self, n: int, d: int, num_classes: int, steps: tuple[int, ...], width: int = 64,
                 depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.feature_dim = width
        self.in_proj = nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, width))
        self.mem_pos = nn.Parameter(torch.randn(1, n, width) * 0.02)
        self.query_pos = nn.Parameter(torch.randn(1, n, width) * 0.02)
        self.class_emb = nn.Embedding(num_classes + 1, width)
        self.attn = nn.ModuleList(nn.MultiheadAttention(width, heads, batch_first=True) for _ in range(depth))
        self.norm_q = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        steps_N = torch.tensor(steps)
        # memory = [label, z_1..z_n]; query i may read the label and z_j of strictly earlier steps
        allowed_NM = torch.cat([torch.ones(n, 1, dtype=torch.bool), steps_N[None, :] < steps_N[:, None]], dim=1)
        self.register_buffer("mask_NM", ~allowed_NM, persistent=False)  # True = masked out

    def forward(self, z_BNd: Tensor, labels_B: Tensor) -> Tensor:
        cls_B1C = self.class_emb(labels_B)[:, None]
        mem_BMC = torch.cat([cls_B1C, self.in_proj(z_BNd) + self.mem_pos], dim=1)
        q_BNC = self.query_pos.expand(z_BNd.shape[0], -1, -1) + cls_B1C
        for attn, norm, mlp in zip(self.attn, self.norm_q, self.mlp):
            h, _ = attn(norm(q_BNC), mem_BMC, mem_BMC, attn_mask=self.mask_NM, need_weights=False)
            q_BNC = q_BNC + h
            q_BNC = q_BNC + mlp(q_BNC)
        return self.norm_out(q_BNC)


class SyntheticTeacher(Teacher):
    """Exact conditional tables over `V` codes in `R^d`; decode renders the latents as a tiny image."""

    def __init__(self, steps: tuple[int, ...] = (0, 1, 2), vocab_size: int = 4, latent_dim: int = 2,
                 num_classes: int = 2, seed: int = 0, strength: float = 4.0, image_size: int = 4,
                 backbone_width: int = 64, backbone_depth: int = 2, name: str = "synthetic") -> None:
        super().__init__()
        n, V, d = len(steps), vocab_size, latent_dim
        self.variant_name = name
        self.spec = TeacherSpec(
            num_tokens=n, vocab_size=V, latent_dim=d, num_classes=num_classes, null_class=num_classes,
            steps=tuple(steps), image_size=image_size,
            stage1=SamplingSettings(), target=SamplingSettings(),
            evaluation=SamplingSettings(cfg=1.5, top_k=V - 1),
        )
        g = torch.Generator().manual_seed(seed)
        # codebook: well separated points (a circle of radius 1 plus noise in the other dims)
        ang = torch.arange(V) * (2 * math.pi / V)
        cb = torch.zeros(V, d)
        cb[:, 0] = torch.cos(ang)
        if d > 1:
            cb[:, 1] = torch.sin(ang)
        if d > 2:
            cb[:, 2:] = 0.3 * torch.randn(V, d - 2, generator=g)
        self.register_buffer("codebook_Vd", cb)
        # parents of position i: all positions of earlier steps
        self.parents = [[j for j in range(n) if steps[j] < steps[i]] for i in range(n)]
        tables = []
        for i in range(n):
            k = len(self.parents[i])
            logits = torch.randn(num_classes + 1, V ** k, V, generator=g)
            if k:
                # strong correlation: copy (a class-dependent shift of) the most recent parent
                combos = torch.tensor(list(itertools.product(range(V), repeat=k)))  # (V^k, k)
                last = combos[:, -1]
                for c in range(num_classes + 1):
                    target = (last + c) % V
                    logits[c, torch.arange(V ** k), target] += strength
            else:
                logits[:, 0, : max(1, V // 2)] += 1.0  # make the first position clearly non-uniform
            tables.append(logits)
        for i, t in enumerate(tables):
            self.register_buffer(f"table_{i}", t)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the backbone "weights" are part of the teacher: same in every process
            self._backbone_template = SyntheticBackbone(n, d, num_classes, tuple(steps), backbone_width,
                                                        backbone_depth)
        self.register_buffer("pixel_proj",
                             torch.randn(n * d, 3 * image_size * image_size, generator=g) / math.sqrt(n * d))

    # ---- contract ----
    def codebook(self) -> Tensor:
        return self.codebook_Vd

    def _table(self, i: int) -> Tensor:
        return getattr(self, f"table_{i}")

    def logits(self, x_BN: Tensor, labels_B: Tensor) -> Tensor:
        tokens_BN = self.as_tokens(x_BN)
        B, n, V = tokens_BN.shape[0], self.spec.num_tokens, self.spec.vocab_size
        out = torch.empty(B, n, V, device=tokens_BN.device)
        for i in range(n):
            idx_B = torch.zeros(B, dtype=torch.long, device=tokens_BN.device)
            for j in self.parents[i]:
                idx_B = idx_B * V + tokens_BN[:, j]
            out[:, i] = self._table(i)[labels_B, idx_B]
        return out

    def guide(self, logits_c_BNV: Tensor, logits_u_BNV: Tensor, settings: SamplingSettings) -> Tensor:
        return logits_u_BNV + settings.cfg * (logits_c_BNV - logits_u_BNV)

    def filter_logits(self, logits_BNV: Tensor, settings: SamplingSettings) -> Tensor:
        logits = logits_BNV / max(settings.temperature, 1e-5)
        if 0 < settings.top_k < logits.shape[-1]:
            kth = logits.topk(settings.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if settings.top_p < 1.0:
            sorted_l, order = logits.sort(dim=-1, descending=True)
            cum = sorted_l.softmax(-1).cumsum(-1)
            remove = cum > settings.top_p
            remove[..., 1:] = remove[..., :-1].clone()
            remove[..., 0] = False
            logits = logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)
        return logits

    def sample(self, labels_B, settings, prefix_BN=None, start_step=0, generator=None, return_logits=False):
        B, n, V = labels_B.shape[0], self.spec.num_tokens, self.spec.vocab_size
        tokens_BN = torch.zeros(B, n, dtype=torch.long, device=labels_B.device)
        raw_BNV = torch.full((B, n, V), math.nan, device=labels_B.device)
        steps = self.steps_tensor()
        if prefix_BN is not None:
            keep = steps < start_step
            tokens_BN[:, keep] = self.as_tokens(prefix_BN)[:, keep]
        for s in range(start_step, self.spec.num_steps):
            pos = (steps == s).nonzero().flatten()
            raw = self.logits(tokens_BN, labels_B)[:, pos]
            raw_BNV[:, pos] = raw
            if self.uses_guidance(settings):
                unc = self.logits(tokens_BN, torch.full_like(labels_B, self.spec.null_class))[:, pos]
                raw = self.guide(raw, unc, settings)
            probs = self.filter_logits(raw, settings).softmax(-1)
            draws = torch.multinomial(probs.reshape(-1, V), 1, generator=generator).reshape(B, len(pos))
            tokens_BN[:, pos] = draws
        return (tokens_BN, raw_BNV) if return_logits else tokens_BN

    def decode(self, x_BN: Tensor) -> Tensor:
        z = self.as_latents(x_BN).reshape(x_BN.shape[0], -1)
        s = self.spec.image_size
        return torch.sigmoid(z @ self.pixel_proj).reshape(-1, 3, s, s)

    def new_backbone(self) -> Backbone:
        return copy.deepcopy(self._backbone_template).requires_grad_(True).train()

    def bundle_parts(self, backbone: Backbone) -> BundleParts:
        n, V, d, s = self.spec.num_tokens, self.spec.vocab_size, self.spec.latent_dim, self.spec.image_size
        arch = {"n": n, "d": d, "num_classes": self.spec.num_classes, "steps": list(self.spec.steps),
                "width": backbone.feature_dim, "depth": len(backbone.attn), "heads": backbone.attn[0].num_heads}
        decoder = {"vocab_size": V, "latent_dim": d, "num_tokens": n, "image_size": s}
        return BundleParts(
            backbone=ModuleRecipe("synthetic:build_bundle_backbone", arch),
            decoder=ModuleRecipe("synthetic:build_bundle_decoder", decoder,
                                 {"codebook_Vd": self.codebook_Vd, "pixel_proj": self.pixel_proj}),
            codebook_Vd=self.codebook())

    # ---- exact quantities for tests ----
    def exact_joint(self, label: int, settings: SamplingSettings | None = None) -> Tensor:
        """`(V,)*n` tensor: the exact joint of the teacher's sampling distribution for one class."""
        settings = settings or SamplingSettings()
        n, V = self.spec.num_tokens, self.spec.vocab_size
        combos = torch.tensor(list(itertools.product(range(V), repeat=n)), device=self.device)  # (V^n, n)
        labels = torch.full((combos.shape[0],), label, device=self.device)
        probs = self.sampling_probs(combos, labels, settings)  # (V^n, n, V)
        p = probs.gather(-1, combos[..., None]).squeeze(-1).prod(-1)
        return p.reshape((V,) * n)


class SyntheticDecoder(nn.Module):
    """Token ids → the teacher's tiny images, exactly as `SyntheticTeacher.decode` (bundles)."""

    def __init__(self, vocab_size: int, latent_dim: int, num_tokens: int, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.register_buffer("codebook_Vd", torch.zeros(vocab_size, latent_dim))
        self.register_buffer("pixel_proj", torch.zeros(num_tokens * latent_dim, 3 * image_size * image_size))

    def forward(self, ids_BN: Tensor) -> Tensor:
        z = self.codebook_Vd[ids_BN.long()].reshape(ids_BN.shape[0], -1)
        s = self.image_size
        return torch.sigmoid(z @ self.pixel_proj).reshape(-1, 3, s, s)


@bundle_factory
def build_bundle_backbone(config: dict) -> SyntheticBackbone:
    return SyntheticBackbone(config["n"], config["d"], config["num_classes"], tuple(config["steps"]),
                             config["width"], config["depth"], config["heads"])


@bundle_factory
def build_bundle_decoder(config: dict) -> SyntheticDecoder:
    return SyntheticDecoder(config["vocab_size"], config["latent_dim"], config["num_tokens"], config["image_size"])


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
