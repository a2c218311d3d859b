"""The light MLP head of DD2 (docs/method.md §3; MAR-style residual MLP blocks with AdaLN).

`MLPHead(x, t, f) -> v`: `x (M, d)` a noisy latent, `t (M,)` its time, `f (M, C)` the backbone's
causal feature of that position; returns the velocity `(M, d)`. The conditioning `c = proj(f) +
emb(t)` modulates every block (shift, scale, gate) and the output layer. Gates and the output layer
start at zero, so a fresh head predicts `v = 0` and training starts from a stable point.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of `t·1000` followed by a small MLP."""

    def __init__(self, width: int, freq_dim: int = 128) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t_M: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t_M.device, dtype=torch.float32) / half)
        angles = (t_M.float() * 1000.0)[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class _AdaLNBlock(nn.Module):
    def __init__(self, width: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, h_MW: Tensor, c_MW: Tensor) -> Tensor:
        shift, scale, gate = self.ada(c_MW).chunk(3, dim=-1)
        return h_MW + gate * self.mlp(self.norm(h_MW) * (1 + scale) + shift)


class MLPHead(nn.Module):
    """Velocity head `(x, t, f) → v` with `depth` residual AdaLN MLP blocks of `width`."""

    def __init__(self, latent_dim: int, feature_dim: int, width: int = 256, depth: int = 3,
                 mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.latent_dim, self.feature_dim, self.width, self.depth = latent_dim, feature_dim, width, depth
        self.x_in = nn.Linear(latent_dim, width)
        self.f_in = nn.Linear(feature_dim, width)
        self.t_emb = TimestepEmbedding(width)
        self.blocks = nn.ModuleList(_AdaLNBlock(width, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, latent_dim)
        for layer in (self.ada_out[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, f_MC: Tensor) -> Tensor:
        """`proj(f)`: computed once per position and shared by all noise draws of that position."""
        return self.f_in(f_MC)

    def forward(self, x_Md: Tensor, t_M: Tensor, f_MC: Tensor | None = None, *, cond_MW: Tensor | None = None) -> Tensor:
        if cond_MW is None:
            cond_MW = self.condition(f_MC)
        c = cond_MW + self.t_emb(t_M)
        h = self.x_in(x_Md)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        return self.out(self.norm_out(h) * (1 + scale) + shift)


def head_config(head: MLPHead) -> dict:
    return {"latent_dim": head.latent_dim, "feature_dim": head.feature_dim, "width": head.width, "depth": head.depth,
            "mlp_ratio": head.blocks[0].mlp[0].out_features / head.width if head.depth else 2.0}


__all__ = ["MLPHead", "TimestepEmbedding", "head_config"]
