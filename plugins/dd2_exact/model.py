"""Exact teachers: AR models over a few tokens whose joint distribution over token ids is known exactly.

A teacher is generated from an `ExactShape` (a seed and a shape): the AR steps and their token counts (one
token per step for a raster order, several for VAR-like scales), the vocabulary, the latent dimension, the
codebook's geometry, how strongly later tokens depend on earlier ones, and the class count. Every position
has a conditional table `p(x_i | class, tokens of earlier steps)`; tokens of one step are independent given
the earlier steps, so the joint is the product of the tables and can be enumerated (`V^n` entries). That is
what makes these teachers useful: a one-step generator's samples can be scored against the exact joint
(`dd2 eval joint-tv`), and the set-prediction baseline's error is known in closed form
(`dd2cli.engine.joint.set_prediction_tv`).

Correlation: position `i` of step `s > 0` copies, up to a class-dependent shift, the token of one position of
step `s − 1` (the one with the same index within its step, modulo the step's size) with a logit bonus of
`strength`; everything else is random. That is the paper's {(0,0),(1,1)} example made general: per-position
marginals say little about the joint.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from dd2cli import Backbone, BundleParts, ModuleRecipe, SamplingSettings, Teacher, TeacherSpec, bundle_factory

GEOMETRIES = ("separated", "clustered", "anisotropic")
#: the joint is enumerated (V^n rows) by `exact_joint`: beyond this it stops being a test-sized teacher
MAX_JOINT = 250_000


@dataclass(frozen=True)
class ExactShape:
    """Everything that defines an exact teacher; `ExactTeacher(shape)` is deterministic in it."""

    tokens_per_step: tuple[int, ...] = (1, 1, 1)
    vocab_size: int = 4
    latent_dim: int = 2
    geometry: str = "separated"  # separated | clustered (codes in close pairs) | anisotropic (thin axes)
    strength: float = 4.0  # logit bonus of the copied token: 0 = independent steps
    num_classes: int = 2
    seed: int = 0
    image_size: int = 8

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(s for s, count in enumerate(self.tokens_per_step) for _ in range(count))

    def validate(self) -> None:
        n, V = len(self.steps), self.vocab_size
        if not self.tokens_per_step or min(self.tokens_per_step) < 1:
            raise ValueError(f"tokens_per_step must list at least one positive count, got {self.tokens_per_step}")
        if V < 2 or self.latent_dim < 1 or self.num_classes < 1 or self.image_size < 1:
            raise ValueError("vocab_size >= 2, latent_dim >= 1, num_classes >= 1 and image_size >= 1 are needed")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry '{self.geometry}' is not one of {', '.join(GEOMETRIES)}")
        if V ** n > MAX_JOINT:
            raise ValueError(f"V^n = {V}^{n} = {V ** n} joint entries is more than {MAX_JOINT}: use fewer tokens "
                             f"or a smaller vocabulary")

    def as_options(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def make_codebook(shape: ExactShape, g: torch.Generator) -> Tensor:
    """`(V, d)` codes. separated: evenly on a circle (dims 0, 1) plus small noise in the others; clustered:
    pairs of codes 0.15 apart around separated centres; anisotropic: separated, then every dimension but the
    first shrunk by 5 (codes far apart along one axis only)."""
    V, d = shape.vocab_size, shape.latent_dim
    centres = V if shape.geometry != "clustered" else math.ceil(V / 2)
    ang = torch.arange(centres) * (2 * math.pi / centres)
    base = torch.zeros(centres, d)
    base[:, 0] = torch.cos(ang)
    if d > 1:
        base[:, 1] = torch.sin(ang)
    else:
        base[:, 0] = torch.linspace(-1.0, 1.0, centres)
    if d > 2:
        base[:, 2:] = 0.3 * torch.randn(centres, d - 2, generator=g)
    if shape.geometry == "clustered":
        offset = torch.randn(centres, d, generator=g)
        offset = 0.075 * offset / offset.norm(dim=-1, keepdim=True)
        cb = torch.stack([base - offset, base + offset], dim=1).reshape(-1, d)[:V]
    else:
        cb = base
    if shape.geometry == "anisotropic" and d > 1:
        cb = cb * torch.tensor([1.0] + [0.2] * (d - 1))
    return cb.contiguous()


def make_tables(shape: ExactShape, parents: list[list[int]], g: torch.Generator) -> list[Tensor]:
    """Per position `i`: logits `(C + 1, V^k, V)` over its `k` parents' combinations (row C: unconditional)."""
    V, C, steps = shape.vocab_size, shape.num_classes, shape.steps
    tables = []
    for i, par in enumerate(parents):
        k = len(par)
        logits = torch.randn(C + 1, V ** k, V, generator=g)
        if k:
            # the copied parent: the same index within the previous step (modulo its size)
            prev = [j for j in par if steps[j] == steps[i] - 1]
            within = i - steps.index(steps[i])
            source = par.index(prev[within % len(prev)])
            combos = torch.tensor(list(itertools.product(range(V), repeat=k)))  # (V^k, k), first parent slowest
            for c in range(C + 1):
                logits[c, torch.arange(V ** k), (combos[:, source] + c) % V] += shape.strength
        else:
            logits[:, 0, : max(1, V // 2)] += 1.0  # a first step that is clearly not uniform
        tables.append(logits)
    return tables


class ExactBackbone(Backbone):
    """A small block-causal cross-attention network: query `i` reads the label and `z_j` with step(j) < step(i).

    Trainable from scratch (an exact teacher has no transformer to copy): the features of a later step are a
    learned function of the earlier steps' latents, which is what the generator needs to recover them.
    """

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


class ExactTeacher(Teacher):
    """The teacher of an `ExactShape`; `decode` renders the latents as a small fixed random image."""

    def __init__(self, shape: ExactShape, name: str = "exact", backbone_width: int = 64,
                 backbone_depth: int = 2) -> None:
        super().__init__()
        shape.validate()
        self.shape = shape
        self.variant_name = name
        steps = shape.steps
        n, V, d, C = len(steps), shape.vocab_size, shape.latent_dim, shape.num_classes
        plain = SamplingSettings()  # an exact teacher is distilled and evaluated at its own distribution
        self.spec = TeacherSpec(num_tokens=n, vocab_size=V, latent_dim=d, num_classes=C, null_class=C,
                                steps=steps, image_size=shape.image_size, stage1=plain, target=plain,
                                evaluation=plain)
        g = torch.Generator().manual_seed(shape.seed)
        self.register_buffer("codebook_Vd", self._make_codebook(g))
        self.parents = [[j for j in range(n) if steps[j] < steps[i]] for i in range(n)]
        for i, table in enumerate(self._make_tables(g)):
            self.register_buffer(f"table_{i}", table)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(shape.seed)  # the backbone's initial weights belong to the teacher: same everywhere
            self._backbone_template = ExactBackbone(n, d, C, steps, backbone_width, backbone_depth)
        s = shape.image_size
        self.register_buffer("pixel_proj", torch.randn(n * d, 3 * s * s, generator=g) / math.sqrt(n * d))

    def _make_codebook(self, g: torch.Generator) -> Tensor:
        return make_codebook(self.shape, g)

    def _make_tables(self, g: torch.Generator) -> list[Tensor]:
        return make_tables(self.shape, self.parents, g)

    # ---- contract ----
    def codebook(self) -> Tensor:
        return self.codebook_Vd

    def _table(self, i: int) -> Tensor:
        return getattr(self, f"table_{i}")

    def logits(self, x_BN: Tensor, labels_B: Tensor) -> Tensor:
        tokens_BN = self.as_tokens(x_BN)
        B, n, V = tokens_BN.shape[0], self.spec.num_tokens, self.spec.vocab_size
        out_BNV = torch.empty(B, n, V, device=tokens_BN.device)
        for i in range(n):
            row_B = torch.zeros(B, dtype=torch.long, device=tokens_BN.device)
            for j in self.parents[i]:
                row_B = row_B * V + tokens_BN[:, j]
            out_BNV[:, i] = self._table(i)[labels_B, row_B]
        return out_BNV

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
            remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
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
            tokens_BN[:, pos] = torch.multinomial(probs.reshape(-1, V), 1, generator=generator).reshape(B, len(pos))
        return (tokens_BN, raw_BNV) if return_logits else tokens_BN

    def decode(self, x_BN: Tensor) -> Tensor:
        z = self.as_latents(x_BN).reshape(x_BN.shape[0], -1)
        s = self.spec.image_size
        return torch.sigmoid(z @ self.pixel_proj).reshape(-1, 3, s, s)

    def new_backbone(self) -> Backbone:
        return copy.deepcopy(self._backbone_template).requires_grad_(True).train()

    def identity(self) -> dict:
        return {"teacher": self.variant_name, "shape": self.shape.as_options()}

    def bundle_parts(self, backbone: Backbone) -> BundleParts:
        n, V, d, s = self.spec.num_tokens, self.spec.vocab_size, self.spec.latent_dim, self.spec.image_size
        arch = {"n": n, "d": d, "num_classes": self.spec.num_classes, "steps": list(self.spec.steps),
                "width": backbone.feature_dim, "depth": len(backbone.attn), "heads": backbone.attn[0].num_heads}
        decoder = {"vocab_size": V, "latent_dim": d, "num_tokens": n, "image_size": s}
        return BundleParts(
            backbone=ModuleRecipe("dd2_exact.model:build_bundle_backbone", arch),
            decoder=ModuleRecipe("dd2_exact.model:build_bundle_decoder", decoder,
                                 {"codebook_Vd": self.codebook_Vd, "pixel_proj": self.pixel_proj}),
            codebook_Vd=self.codebook())

    # ---- what only an exact teacher can offer ----
    def exact_joint(self, label: int, settings: SamplingSettings | None = None) -> Tensor:
        """`(V,)*n` float64: the probability of every token-id sequence of class `label` under `settings`."""
        settings = settings or self.spec.target
        n, V = self.spec.num_tokens, self.spec.vocab_size
        combos_MN = torch.tensor(list(itertools.product(range(V), repeat=n)), device=self.device)  # (V^n, n)
        labels_M = torch.full((combos_MN.shape[0],), label, device=self.device)
        with torch.no_grad():
            probs_MNV = self.sampling_probs(combos_MN, labels_M, settings).double()
        p_M = probs_MNV.gather(-1, combos_MN[..., None]).squeeze(-1).prod(-1)
        return (p_M / p_M.sum()).reshape((V,) * n).cpu()  # (fp32 softmax rows: renormalised in float64)


class ExactDecoder(nn.Module):
    """Token ids → the teacher's images, exactly as `ExactTeacher.decode` (bundles)."""

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
def build_bundle_backbone(config: dict) -> ExactBackbone:
    return ExactBackbone(config["n"], config["d"], config["num_classes"], tuple(config["steps"]),
                         config["width"], config["depth"], config["heads"])


@bundle_factory
def build_bundle_decoder(config: dict) -> ExactDecoder:
    return ExactDecoder(config["vocab_size"], config["latent_dim"], config["num_tokens"], config["image_size"])


def shape_family(count: int = 6, seed: int = 0) -> list[ExactShape]:
    """`count` varied shapes (raster and scale orders, vocabularies, geometries, strengths), fixed by `seed`.

    The first six are hand-picked to cover the axes; further ones are drawn from the same ranges.
    """
    fixed = [
        ExactShape((1, 1, 1), 4, 2, "separated", 4.0, 2, seed),
        ExactShape((2, 2), 6, 3, "separated", 4.0, 2, seed + 1),
        ExactShape((1, 1, 1, 1), 5, 3, "clustered", 3.0, 2, seed + 2),
        ExactShape((1, 2, 3), 3, 2, "anisotropic", 4.0, 2, seed + 3),
        ExactShape((1, 3), 6, 4, "separated", 2.0, 3, seed + 4),
        ExactShape((2, 2), 4, 2, "clustered", 5.0, 2, seed + 5),
    ]
    g = torch.Generator().manual_seed(seed)
    while len(fixed) < count:
        pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
        fixed.append(ExactShape(pick([(1, 1, 1), (2, 2), (1, 1, 2), (1, 2, 2)]), pick([3, 4, 5]), pick([2, 3]),
                                pick(list(GEOMETRIES)), pick([2.0, 3.0, 4.0, 5.0]), 2, seed + len(fixed)))
    return fixed[:count]
