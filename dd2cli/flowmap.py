"""The teacher's flow map: a deterministic noise → token-sequence map, and regression onto it (ours).

For one AR step, the teacher's next-token distribution `p_i` over codebook vectors has a closed-form
velocity (`flow.velocity`), so the probability-flow ODE `dx/dt = v(x, t; p_i)` integrated from
`x(1) = ε_i` down to `t = 0` carries `N(0, I)` onto `Σ_j p_ij δ(c_j)`: every noise vector lands on
one code, and the codes are hit with the teacher's probabilities. Doing this step by step, with each
step's `p_i` read by the teacher from the codes chosen before, gives a deterministic map
`ε_1..ε_n ↦ tokens` whose pushforward is the teacher's joint (up to the Euler error) — the coupling
DD1 (Distilled Decoding 1) distils into a one-step model.

dd2 uses it to initialise the one-step generator before conditional score distillation: a few hundred
regression updates `‖G_θ(ε) − c(ε)‖²` put the generator near the teacher's joint, correlations
included, which CSD alone reaches only slowly (docs/experiments/proposition1.md). The map costs one teacher
pass per AR step (teacher-forced on the prefix; no KV cache), so it suits teachers with few AR steps;
on LlamaGen-L (256 steps) it is expensive and off by default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import flow
from .losses import teacher_probs
from .networks import Generator
from .teacher import Teacher, nearest_codebook
from .teachers import SamplingSettings


@torch.no_grad()
def teacher_flow_map(teacher: Teacher, eps_BNd: Tensor, labels_B: Tensor, settings: SamplingSettings, *,
                     euler_steps: int = 20, support: int = 0, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Token ids `(B, n)` and their codebook vectors `(B, n, d)` that the teacher's flow map assigns to `ε`.

    Per AR step: the teacher's sampling distribution at that step's positions given the codes chosen for
    earlier steps, then `euler_steps` Euler steps of the closed-form ODE from `t = 1` to `0`, then the
    nearest codebook entry. Deterministic in `(ε, labels)`.
    """
    codebook_Vd = teacher.codebook()
    B, N, d = eps_BNd.shape
    steps_N = teacher.steps_tensor().to(eps_BNd.device)
    ids_BN = torch.zeros(B, N, dtype=torch.long, device=eps_BNd.device)
    z_BNd = torch.zeros(B, N, d, device=eps_BNd.device)
    ts = torch.linspace(1.0, 0.0, euler_steps + 1, device=eps_BNd.device)
    for s in range(int(steps_N.max()) + 1):
        pos = (steps_N == s).nonzero().flatten()
        # the prefix as token ids (the teacher's own input); later positions are still 0 and, by causality, unread
        probs = teacher_probs(teacher, ids_BN, labels_B, settings, support)
        probs = (flow.SparseProbs(probs.ids[:, pos], probs.probs[:, pos]) if isinstance(probs, flow.SparseProbs)
                 else probs[:, pos])
        x_BKd = eps_BNd[:, pos].float()
        for k in range(euler_steps):
            t_BK = torch.full(x_BKd.shape[:2], float(ts[k]), device=x_BKd.device)
            x_BKd = x_BKd - float(ts[k] - ts[k + 1]) * flow.velocity(x_BKd, t_BK, probs, codebook_Vd,
                                                                      chunk_size=chunk_size)
        ids_BK = nearest_codebook(x_BKd, codebook_Vd)
        ids_BN[:, pos] = ids_BK
        z_BNd[:, pos] = codebook_Vd[ids_BK].to(z_BNd.dtype)
    return ids_BN, z_BNd


def flow_map_loss(generator_net: Generator, teacher: Teacher, eps_BNd: Tensor, labels_B: Tensor, *,
                  settings: SamplingSettings, euler_steps: int = 20, support: int = 0,
                  chunk_size: int = 4096) -> tuple[Tensor, float]:
    """`mean ‖G_θ(ε) − c(ε)‖²` (summed over the latent dims) and the fraction of positions whose nearest
    code already is the flow map's token."""
    ids_BN, z_BNd = teacher_flow_map(teacher, eps_BNd, labels_B, settings, euler_steps=euler_steps,
                                     support=support, chunk_size=chunk_size)
    q_BNd = generator_net(eps_BNd, labels_B)
    loss = (q_BNd.float() - z_BNd).square().sum(-1).mean()
    with torch.no_grad():
        agree = float((teacher.as_tokens(q_BNd.detach().float()) == ids_BN).float().mean())
    return loss, agree
