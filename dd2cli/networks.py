"""The three trainable networks of DD2 (docs/method.md §3): AR-diffusion model, guidance, generator.

All share one architecture: the teacher's backbone (causal features `f_BNC` from per-position
latents) and an `MLPHead` (velocity from `(x, t, f)`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from .heads import MLPHead
from .teacher import Backbone, nearest_codebook


class ARDiffusion(nn.Module):
    """`ψ = (B, H)`: features from a latent sequence, velocities of noisy latents at every position.

    Used as the stage-1 model `ψ₀` and as the guidance network `ψ`.
    """

    def __init__(self, backbone: Backbone, head: MLPHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        #: recompute the backbone's activations in the backward pass instead of storing them
        self.checkpoint_backbone = False

    def features(self, z_BNd: Tensor, labels_B: Tensor) -> Tensor:
        if self.checkpoint_backbone and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.backbone, z_BNd, labels_B, use_reentrant=False)
        return self.backbone(z_BNd, labels_B)

    def forward(self, z_BNd: Tensor, labels_B: Tensor, x_BNmd: Tensor, t_BNm: Tensor) -> Tensor:
        """Velocities of the noisy draws `x (B, n, m, d)` given the sequence `z`: `features`, then `velocity`.

        The trained networks' losses call this, so that a data-parallel wrapper sees the whole pass.
        """
        return self.velocity(x_BNmd, t_BNm, self.features(z_BNd, labels_B))

    def velocity(self, x_BNmd: Tensor, t_BNm: Tensor, f_BNC: Tensor) -> Tensor:
        """Velocities of `m` noisy draws per position in one batched head call: `x (B, n, m, d)`."""
        B, N, m, d = x_BNmd.shape
        cond_BNW = self.head.condition(f_BNC)  # once per position, shared by its m draws
        cond_MW = cond_BNW[:, :, None, :].expand(B, N, m, cond_BNW.shape[-1]).reshape(B * N * m, -1)
        v_Md = self.head(x_BNmd.reshape(-1, d), t_BNm.reshape(-1), cond_MW=cond_MW)
        return v_Md.reshape(B, N, m, d)

    @torch.no_grad()
    def sample(self, labels_B: Tensor, steps_N: Tensor, codebook_Vd: Tensor, euler_steps: int = 10,
               generator: torch.Generator | None = None, snap: bool = True) -> Tensor:
        """Sample with the AR-diffusion model itself: per AR step, Euler from t=1 to 0 (paper Tab. 7).

        Returns latents `(B, n, d)` (snapped to the nearest codebook entry after each step when
        `snap`, which is what an AR model conditioned on token ids expects).
        """
        B, N, d = labels_B.shape[0], steps_N.shape[0], codebook_Vd.shape[1]
        z = torch.zeros(B, N, d, device=labels_B.device)
        ts = torch.linspace(1.0, 0.0, euler_steps + 1, device=labels_B.device)
        for s in range(int(steps_N.max()) + 1):
            pos = (steps_N == s).nonzero().flatten()
            f = self.features(z, labels_B)[:, pos]
            x = torch.randn(B, len(pos), 1, d, generator=generator, device=labels_B.device)
            for k in range(euler_steps):
                t = torch.full((B, len(pos), 1), float(ts[k]), device=x.device)
                v = self.velocity(x, t, f)
                x = x - (ts[k] - ts[k + 1]) * v
            x = x[:, :, 0]
            z[:, pos] = codebook_Vd[nearest_codebook(x, codebook_Vd)] if snap else x
        return z


def build_model(backbone: Backbone, latent_dim: int, width: int, depth: int, mlp_ratio: float = 2.0, *,
                seed: int | None = None, device: str | torch.device | None = None) -> ARDiffusion:
    """The one place a DD2 network is put together: `backbone` plus a new `MLPHead` on top of it.

    Stage 1, stage 2 (generator, guidance, EMA), a run's generator loaded for sampling, a bundle's skeleton
    and the timing subjects all come from here, so they can only differ in their weights. With `seed` the
    head is drawn from its own generator (the same head on every rank and every resume) and the global
    random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        head = MLPHead(latent_dim, backbone.feature_dim, width, depth, mlp_ratio)
    return ARDiffusion(backbone, head.to(device) if device is not None else head)


class Generator(nn.Module):
    """`G_θ`: one forward pass maps noise `ε (B, n, d)` to continuous tokens `q (B, n, d)`.

    The backbone reads the noise sequence itself (so `f_i` sees the noise of earlier steps); the head
    reads `(ε_i, t = 1, f_i)`; `q_i = ε_i − v_θ(ε_i, 1, f_i)`.
    """

    def __init__(self, model: ARDiffusion) -> None:
        super().__init__()
        self.model = model

    def forward(self, eps_BNd: Tensor, labels_B: Tensor) -> Tensor:
        f_BNC = self.model.features(eps_BNd, labels_B)
        t_BN1 = torch.ones(eps_BNd.shape[:2] + (1,), device=eps_BNd.device)
        v_BNd = self.model.velocity(eps_BNd[:, :, None], t_BN1, f_BNC)[:, :, 0]
        return eps_BNd - v_BNd


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """`ema ← decay·ema + (1−decay)·model` for parameters; buffers are copied."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def progressive_ema_decay(it: int, max_decay: float = 0.9999) -> float:
    """`min(max_decay, (it+1)/(it+10))` (docs/method.md §5)."""
    return min(max_decay, (it + 1) / (it + 10))
