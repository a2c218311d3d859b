"""The raster teacher: network, `dd2cli.teacher.Teacher` contract, loader and bundle factories.

Tokens are the 17 grey levels (0..16) of scikit-learn's 8×8 digits, one per pixel in raster order,
one token per AR step (64 steps). The transformer reads a sequence of 64 input slots: slot 0 is the
class embedding, slot i ≥ 1 is `tok_in(c[x_{i-1}])` (a Linear of the previous token's codebook
vector), all plus learned positions; causal attention makes output i a function of the class and
tokens < i, and the head turns it into the logits of token i.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2cli import (
    Backbone,
    BundleParts,
    CheckpointMismatchError,
    ModuleRecipe,
    SamplingSettings,
    Teacher,
    TeacherSpec,
    Variant,
    bundle_factory,
    load_safetensors,
    load_state_dict_strict,
    sha256_file,
)

SIDE = 8
NUM_TOKENS = SIDE * SIDE
NUM_LEVELS = 17  # pixel values 0..16 of load_digits
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the class-dropout label used for classifier-free guidance
LATENT_DIM = 2

DEFAULT_CONFIG = {"width": 64, "depth": 2, "heads": 4}

STAGE1 = SamplingSettings(cfg=1.5)
TARGET = SamplingSettings(cfg=1.5, top_k=8)
EVALUATION = SamplingSettings(cfg=1.5)


def level_codebook() -> Tensor:
    """`(17, 2)`: level j at angle π·j/16 on the unit half circle.

    Distinct, evenly spaced points whose neighbours are neighbouring grey levels, so a latent
    between two codes snaps to one of the two nearest intensities.
    """
    angle_V = torch.arange(NUM_LEVELS, dtype=torch.float64) * (math.pi / (NUM_LEVELS - 1))
    return torch.stack([torch.cos(angle_V), torch.sin(angle_V)], dim=-1).float()


def images_to_levels(images_B3HW: Tensor) -> Tensor:
    """Images in [0, 1] (grey or RGB, any size) → level ids `(B, 64)` in raster order."""
    x = images_B3HW.float()
    x = x.mean(1, keepdim=True) if x.shape[1] != 1 else x
    if x.shape[-2:] != (SIDE, SIDE):
        x = F.interpolate(x, size=(SIDE, SIDE), mode="area")
    return (x.clamp(0, 1) * (NUM_LEVELS - 1)).round().long().reshape(x.shape[0], NUM_TOKENS)


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h_BLC: Tensor) -> Tensor:
        B, L, C = h_BLC.shape
        q, k, v = self.qkv(self.norm1(h_BLC)).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a_BHLc = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h_BLC = h_BLC + self.proj(a_BHLc.transpose(1, 2).reshape(B, L, C))
        return h_BLC + self.mlp(self.norm2(h_BLC))


class RasterBackbone(Backbone):
    """The transformer without its head: `(z_BNd, labels_B) → f_BNC`, f_i sees the label and z_{<i}.

    The teacher itself runs this module on codebook vectors, so `new_backbone()` (a deep copy) builds
    its input from continuous latents exactly as the teacher builds its teacher-forcing input.
    """

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.feature_dim = width
        self.class_emb = nn.Embedding(NUM_CLASSES + 1, width)
        self.tok_in = nn.Linear(LATENT_DIM, width)
        self.pos_1NC = nn.Parameter(torch.randn(1, NUM_TOKENS, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, z_BNd: Tensor, labels_B: Tensor) -> Tensor:
        # shift by one: slot 0 holds the class, slot i the latent of token i-1 (z_{n-1} is never read)
        cls_B1C = self.class_emb(labels_B.long())[:, None]
        h_BNC = torch.cat([cls_B1C, self.tok_in(z_BNd[:, :-1].float())], dim=1) + self.pos_1NC
        for block in self.blocks:
            h_BNC = block(h_BNC)
        return self.norm(h_BNC)


class RasterModel(nn.Module):
    """Backbone + linear head over the 17 levels (what `train.py` trains and the weights file holds)."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.body = RasterBackbone(width, depth, heads)
        self.head = nn.Linear(width, NUM_LEVELS)
        self.register_buffer("codebook_Vd", level_codebook(), persistent=False)

    def forward(self, ids_BN: Tensor, labels_B: Tensor) -> Tensor:
        return self.head(self.body(self.codebook_Vd[ids_BN], labels_B))


class RasterDecoder(nn.Module):
    """Level ids `(B, 64)` → grey images `(B, 3, 8, 8)` in [0, 1] (the teacher's decode; bundles)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("grey_V", torch.arange(NUM_LEVELS, dtype=torch.float32) / (NUM_LEVELS - 1))

    def forward(self, ids_BN: Tensor) -> Tensor:
        x_B1HW = self.grey_V[ids_BN.long()].reshape(-1, 1, SIDE, SIDE)
        return x_B1HW.expand(-1, 3, -1, -1).contiguous()


class RasterTeacher(Teacher):
    """A frozen `RasterModel` seen through the dd2 contract; guidance is `u + cfg·(c − u)`."""

    def __init__(self, model: RasterModel, *, variant_name: str = "raster-digits",
                 weight_ids: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.decoder = RasterDecoder()
        self.variant_name = variant_name
        self.weight_ids = dict(weight_ids or {})
        self.spec = TeacherSpec(
            num_tokens=NUM_TOKENS, vocab_size=NUM_LEVELS, latent_dim=LATENT_DIM, num_classes=NUM_CLASSES,
            null_class=NULL_CLASS, steps=tuple(range(NUM_TOKENS)), image_size=SIDE,
            stage1=STAGE1, target=TARGET, evaluation=EVALUATION,
        )

    # ---- latent space -----------------------------------------------------------------------------
    def codebook(self) -> Tensor:
        return self.model.codebook_Vd

    # ---- teacher-forced logits --------------------------------------------------------------------
    def logits(self, x_BN: Tensor, labels_B: Tensor) -> Tensor:
        return self.model(self.as_tokens(x_BN), labels_B.to(self.device)).float()

    def guide(self, logits_c_BNV: Tensor, logits_u_BNV: Tensor, settings: SamplingSettings) -> Tensor:
        return logits_u_BNV + settings.cfg * (logits_c_BNV - logits_u_BNV)

    def filter_logits(self, logits_BNV: Tensor, settings: SamplingSettings) -> Tensor:
        """Temperature, then HF-style top-k (ties with the k-th kept), then top-p (nucleus)."""
        logits = logits_BNV / max(settings.temperature, 1e-5)
        V = logits.shape[-1]
        if settings.top_k > 0:
            kth = torch.topk(logits, min(settings.top_k, V), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if settings.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            remove = sorted_logits.softmax(-1).cumsum(-1) > settings.top_p
            # shift right: the token that crosses top_p is kept, and so is the most likely one
            remove[..., 1:] = remove[..., :-1].clone()
            remove[..., 0] = False
            logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
        return logits

    def uses_guidance(self, settings: SamplingSettings) -> bool:
        return settings.cfg != 1.0

    # ---- AR sampler -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, labels_B, settings, prefix_BN=None, start_step=0, generator=None, return_logits=False):
        """One token per step. No KV cache: the model is tiny, so every step reruns the causal pass
        over all 64 slots (slots after the current one hold placeholders the mask never reads)."""
        n, V = self.spec.num_tokens, self.spec.vocab_size
        labels_B = labels_B.long().to(self.device)
        B = labels_B.shape[0]
        tokens_BN = torch.zeros(B, n, dtype=torch.long, device=self.device)
        if prefix_BN is not None and start_step > 0:
            tokens_BN[:, :start_step] = self.as_tokens(prefix_BN.to(self.device))[:, :start_step]
        raw_BNV = torch.full((B, n, V), float("nan"), device=self.device)
        guided = self.uses_guidance(settings)
        labels_in = torch.cat([labels_B, torch.full_like(labels_B, NULL_CLASS)]) if guided else labels_B
        for i in range(start_step, n):
            tokens_in = torch.cat([tokens_BN, tokens_BN]) if guided else tokens_BN
            logits_XV = self.model(tokens_in, labels_in)[:, i].float()
            cond_BV = logits_XV[:B]
            raw_BNV[:, i] = cond_BV
            step_BV = self.guide(cond_BV, logits_XV[B:], settings) if guided else cond_BV
            probs_BV = self.filter_logits(step_BV, settings).softmax(-1)
            tokens_BN[:, i] = torch.multinomial(probs_BV, 1, generator=generator)[:, 0]
        return (tokens_BN, raw_BNV) if return_logits else tokens_BN

    # ---- images -----------------------------------------------------------------------------------
    def decode(self, x_BN: Tensor) -> Tensor:
        return self.decoder(self.as_tokens(x_BN))

    def encode(self, images_B3HW: Tensor) -> Tensor:
        return images_to_levels(images_B3HW.to(self.device))

    # ---- trainable copy ---------------------------------------------------------------------------
    def new_backbone(self) -> Backbone:
        return copy.deepcopy(self.model.body).requires_grad_(True).train()

    def identity(self) -> dict:
        return {"teacher": self.variant_name, "family": "raster", "weights": dict(self.weight_ids)}

    def bundle_parts(self, backbone: Backbone) -> BundleParts:
        arch = {"width": backbone.feature_dim, "depth": len(backbone.blocks), "heads": backbone.blocks[0].heads}
        return BundleParts(
            backbone=ModuleRecipe("dd2_raster_digits.model:build_bundle_backbone", arch),
            decoder=ModuleRecipe("dd2_raster_digits.model:build_bundle_decoder", {},
                                 {k: v.detach().cpu() for k, v in self.decoder.state_dict().items()}),
            codebook_Vd=self.codebook())


@bundle_factory
def build_bundle_backbone(config: dict) -> RasterBackbone:
    return RasterBackbone(int(config["width"]), int(config["depth"]), int(config["heads"]))


@bundle_factory
def build_bundle_decoder(config: dict) -> RasterDecoder:
    return RasterDecoder()


def load_model(path: str | Path, *, variant: str = "raster-digits") -> RasterModel:
    """Build a `RasterModel` from a weights file written by `train.py` (config in its metadata)."""
    tensors, meta = load_safetensors(path)
    try:
        config = {**DEFAULT_CONFIG, **json.loads(meta.get("config", "{}"))}
    except json.JSONDecodeError:
        raise CheckpointMismatchError(
            f"{path} has an unreadable 'config' entry in its metadata; retrain it with train.py.") from None
    model = RasterModel(int(config["width"]), int(config["depth"]), int(config["heads"]))
    load_state_dict_strict(model, tensors, variant=variant, file=str(path))
    return model


def load_teacher(variant: Variant, weight_paths: Mapping[str, Path], device: str) -> RasterTeacher:
    """The `Variant.loader` of `raster-digits`."""
    path = Path(weight_paths["model"])
    model = load_model(path, variant=variant.name)
    return RasterTeacher(model, variant_name=variant.name,
                         weight_ids={"model": sha256_file(path)}).to(device)
