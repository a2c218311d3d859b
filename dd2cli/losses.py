"""The three DD2 losses (docs/method.md §4–§5), each readable top to bottom.

- `gts_loss`: stage 1, AR-diffusion tuning against the closed-form teacher velocity.
- `fcs_loss`: stage 2, guidance update (the generator's conditional score by flow matching).
- `csd_loss`: stage 2, generator update (conditional score distillation, SiD form with α).

The network a loss trains is only called (its forward), so it may come wrapped for data parallel; the frozen
guidance network of `csd_loss` is used through its methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import flow
from .networks import ARDiffusion, Generator
from .teacher import Teacher
from .teachers import SamplingSettings


@dataclass(frozen=True)
class TimestepSpec:
    kind: str = "uniform"
    t_min: float = flow.DEFAULT_T_MIN
    mean: float = 0.0
    std: float = 1.0

    def sample(self, shape, generator, device) -> Tensor:
        return flow.sample_timesteps(shape, self.kind, t_min=self.t_min, mean=self.mean, std=self.std,
                                     generator=generator, device=device)


def teacher_probs(teacher: Teacher, x_BN: Tensor, labels_B: Tensor, settings: SamplingSettings,
                  support: int = 0) -> Tensor | flow.SparseProbs:
    """`p_i` of the teacher given `x` (ids or latents) under stop-gradient.

    With `support > 0` and a top-k ≤ support in `settings`, returns the top-k support only
    (`SparseProbs`), so the closed-form score never touches `(B, n, V)` beyond the logits.
    """
    with torch.no_grad():
        logits_BNV = teacher.sampling_logits(x_BN.detach(), labels_B, settings)
        if support and 0 < settings.top_k <= support:
            return flow.SparseProbs.from_logits(logits_BNV, settings.top_k)
        return torch.softmax(logits_BNV, dim=-1)


def _draws(B: int, N: int, m: int, d: int, timesteps: TimestepSpec, generator, device) -> tuple[Tensor, Tensor]:
    t_BNm = timesteps.sample((B, N, m), generator, device)
    eps_BNmd = torch.randn(B, N, m, d, generator=generator, device=device)
    return t_BNm, eps_BNmd


def gts_loss(model: ARDiffusion, teacher: Teacher, tokens_BN: Tensor, labels_B: Tensor, *,
             target_settings: SamplingSettings, draws: int, timesteps: TimestepSpec,
             generator: torch.Generator | None = None, chunk_size: int = 4096, support: int = 0) -> Tensor:
    """Ground-truth-score loss: `mean ‖v_ψ(x, t, f_i(q)) − v_teacher(x, t; p_i)‖²` over `draws` per position."""
    codebook_Vd = teacher.codebook()
    B, N = tokens_BN.shape
    d = codebook_Vd.shape[1]
    # 1. teacher distribution at every position of the clean sequence (one teacher forward, no grad)
    c_BNd = codebook_Vd[tokens_BN]
    probs = teacher_probs(teacher, tokens_BN, labels_B, target_settings, support)
    # 2. m noisy draws per position
    t_BNm, eps_BNmd = _draws(B, N, draws, d, timesteps, generator, tokens_BN.device)
    x_BNmd = flow.noise(c_BNd[:, :, None], t_BNm, eps_BNmd)
    # 3. closed-form target velocity, one draw at a time so p is never copied m times
    with torch.no_grad():
        target = torch.stack([
            flow.velocity(x_BNmd[:, :, k], t_BNm[:, :, k], probs, codebook_Vd, chunk_size=chunk_size,
                          t_min=timesteps.t_min)
            for k in range(draws)], dim=2)
    # 4. regression: one backbone pass on the clean sequence, the head's velocity for all draws in one call
    pred = model(c_BNd, labels_B, x_BNmd, t_BNm)
    return (pred - target).square().mean()


def step_balance_weights(steps: tuple[int, ...], device=None) -> Tensor:
    """Per-position weights `(N,)` that give every AR step the same total weight (mean 1).

    A plain mean over positions lets the many tokens of late steps dominate (VAR: 1 token at step 0,
    256 at step 9), so the early steps that decide the global layout learn slowest. Identity for
    teachers with one token per step.
    """
    steps_N = torch.tensor(steps, device=device)
    count_N = torch.bincount(steps_N)[steps_N].float()
    num_steps = int(steps_N.max()) + 1
    return len(steps) / (num_steps * count_N)


def fcs_loss(guidance: ARDiffusion, q_BNd: Tensor, labels_B: Tensor, *, draws: int, timesteps: TimestepSpec,
             generator: torch.Generator | None = None, position_weights_N: Tensor | None = None) -> Tensor:
    """Guidance (fake conditional score) loss on generated `q` (no grad into the generator)."""
    q_BNd = q_BNd.detach()
    B, N, d = q_BNd.shape
    t_BNm, eps_BNmd = _draws(B, N, draws, d, timesteps, generator, q_BNd.device)
    x_BNmd = flow.noise(q_BNd[:, :, None], t_BNm, eps_BNmd)
    target_BNmd = eps_BNmd - q_BNd[:, :, None]
    err_BNm = (guidance(q_BNd, labels_B, x_BNmd, t_BNm) - target_BNmd).square().mean(-1)
    if position_weights_N is not None:
        err_BNm = err_BNm * position_weights_N[:, None]
    return err_BNm.mean()


@dataclass
class CSDOutput:
    """The loss and two detached scalars for the logs (tensors: reading them is the caller's synchronisation)."""

    loss: Tensor
    weight_mean: Tensor
    score_gap: Tensor  # mean ‖D_real − D_fake‖², a progress signal


def csd_loss(generator_net: Generator, guidance: ARDiffusion, teacher: Teacher, eps_BNd: Tensor, labels_B: Tensor, *,
             target_settings: SamplingSettings, alpha: float, timesteps: TimestepSpec, weighting: bool = True,
             draws: int = 1, generator: torch.Generator | None = None, chunk_size: int = 4096,
             support: int = 0, position_weights_N: Tensor | None = None) -> CSDOutput:
    """Conditional score distillation loss for one generator update (guidance frozen by the caller).

    `draws` noisy copies `(t, ε')` per position share one generator pass, one teacher pass and one
    guidance backbone pass (their average is a lower-variance estimate of the same gradient).
    """
    codebook_Vd = teacher.codebook()
    # 1. sample q from the generator, with grad
    q_BNd = generator_net(eps_BNd, labels_B)
    B, N, d = q_BNd.shape
    # 2. noisy draws per position, differentiable in q
    t_BNm, noise_BNmd = _draws(B, N, draws, d, timesteps, generator, q_BNd.device)
    x_BNmd = flow.noise(q_BNd[:, :, None], t_BNm, noise_BNmd)
    # 3. teacher distribution given the (stop-gradient) generated prefix
    q_sg = q_BNd.detach()
    probs = teacher_probs(teacher, q_sg, labels_B, target_settings, support)
    # 4. closed-form real denoiser (differentiable in x) and the guidance network's fake denoiser
    D_real = torch.stack([
        flow.denoise(x_BNmd[:, :, k], t_BNm[:, :, k], probs, codebook_Vd, chunk_size=chunk_size,
                     t_min=timesteps.t_min)
        for k in range(draws)], dim=2)
    with torch.no_grad():
        f_fake = guidance.features(q_sg, labels_B)
    v_fake = guidance.velocity(x_BNmd, t_BNm, f_fake)
    D_fake = flow.denoised_from_velocity(x_BNmd, t_BNm.clamp_min(timesteps.t_min), v_fake)
    # 5. SiD-form loss with per-position normalisation
    q_BN1d = q_BNd[:, :, None]
    gap = D_real - D_fake
    per_draw = (gap * ((D_real - q_BN1d) - alpha * gap)).sum(-1)  # (B, N, m)
    if weighting:
        w = (1.0 / ((q_BN1d - D_real).abs().mean(-1) + 1e-5)).detach()
    else:
        w = torch.ones_like(per_draw)
    if position_weights_N is not None:
        w = w * position_weights_N[:, None]
    loss = (w * per_draw).mean()
    return CSDOutput(loss=loss, weight_mean=w.mean().detach(), score_gap=gap.detach().square().sum(-1).mean())
