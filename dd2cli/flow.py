"""Rectified flow and the closed-form teacher score (docs/method.md §2).

`x_t = (1−t)·x_0 + t·ε`, `t ∈ [0, 1]`, `t = 0` data, `t = 1` noise. When `x_0 ~ Σ_j p_j δ(c_j)`:

    w_j(x,t) = softmax_j( log p_j − ‖x − (1−t)c_j‖² / (2t²) )
    D(x,t)   = Σ_j w_j c_j          s(x,t) = ((1−t)·D − x) / t²          v(x,t) = (x − D) / t

Everything here is fp32 (float64 when `x` is float64: the tests check the memory-lean path
against plain autograd in float64, where rounding cannot hide a difference). `‖x‖²` is constant
over `j` and dropped from the softmax; the rest is one matmul. Rows (`B·n` positions) are processed
in chunks so that a `(B, n, V)` tensor never has to exist whole, and when `p` has a small support
(top-k) only that support is touched.

`denoise()` is differentiable in `x` through a custom autograd function whose backward pass
recomputes the posterior chunk by chunk instead of storing it: `∂D/∂x = a·Cov_w(c)` with
`a = (1−t)/t²`, so `∇_x⟨g, D⟩ = a·Σ_j w_j c_j (⟨c_j, g⟩ − ⟨D, g⟩)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

DEFAULT_T_MIN = 1e-3


@dataclass(frozen=True)
class SparseProbs:
    """A categorical given on its support: ids `(..., K)` and probabilities `(..., K)` (zeros allowed)."""

    ids: Tensor
    probs: Tensor

    @staticmethod
    def from_dense(probs_MV: Tensor, k: int, check: bool = True) -> "SparseProbs":
        """Keep the `k` largest entries; with `check`, refuse if that drops probability mass."""
        V = probs_MV.shape[-1]
        k = min(k, V)
        top, ids = probs_MV.topk(min(k + 1, V), dim=-1)
        if check and k < V:
            # exact test: the support fits in k entries iff the (k+1)-th largest entry is 0
            lost = top[..., k].max().item() if top.numel() else 0.0
            if lost > 0:
                raise ValueError(f"support restriction to top-{k} would drop entries with probability up to "
                                 f"{lost:.3g}; the distribution has a larger support")
        vals, ids = top[..., :k], ids[..., :k]
        return SparseProbs(ids, vals)

    @staticmethod
    def from_logits(logits_MV: Tensor, k: int) -> "SparseProbs":
        """Top-k of `logits` (already filtered) renormalised: `p` restricted to its top-k support."""
        k = min(k, logits_MV.shape[-1])
        vals, ids = logits_MV.float().topk(k, dim=-1)
        return SparseProbs(ids, torch.softmax(vals, dim=-1))

    def reshape_rows(self) -> "SparseProbs":
        K = self.ids.shape[-1]
        return SparseProbs(self.ids.reshape(-1, K), self.probs.reshape(-1, K))


Probs = Tensor | SparseProbs


# ---- conversions ---------------------------------------------------------------------------------

def velocity_from_denoised(x: Tensor, t: Tensor, D: Tensor) -> Tensor:
    return (x - D) / t[..., None]


def denoised_from_velocity(x: Tensor, t: Tensor, v: Tensor) -> Tensor:
    return x - t[..., None] * v


def score_from_denoised(x: Tensor, t: Tensor, D: Tensor) -> Tensor:
    t_ = t[..., None]
    return ((1 - t_) * D - x) / (t_ * t_)


def velocity_from_score(x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """`v = (−σ·s − x)/α` with α = 1−t, σ = t (undefined at t = 1)."""
    t_ = t[..., None]
    return (-t_ * s - x) / (1 - t_)


def noise(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """`x_t = (1−t)·x_0 + t·ε` with `t` broadcast over the last dim."""
    t_ = t[..., None]
    return (1 - t_) * x0 + t_ * eps


# ---- timestep samplers ---------------------------------------------------------------------------

def sample_timesteps(shape: tuple[int, ...], kind: Literal["uniform", "logit-normal"] = "uniform", *,
                     t_min: float = DEFAULT_T_MIN, mean: float = 0.0, std: float = 1.0,
                     generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
    """`t` in `[t_min, 1]`: uniform, or logit-normal (`sigmoid(N(mean, std))`, SD3-style)."""
    if kind == "uniform":
        u = torch.rand(shape, generator=generator, device=device)
        return t_min + (1 - t_min) * u
    if kind == "logit-normal":
        z = torch.randn(shape, generator=generator, device=device) * std + mean
        return torch.sigmoid(z).clamp(t_min, 1.0)
    raise ValueError(f"unknown timestep distribution {kind!r}; use 'uniform' or 'logit-normal'")


# ---- the closed-form posterior -------------------------------------------------------------------

def _log_probs_rows(probs: "Tensor | SparseProbs", sl: slice, V: int) -> Tensor:
    """`log p (R, V)` for a chunk of rows; −inf outside the support (scattered from a sparse input)."""
    if isinstance(probs, SparseProbs):
        ids, p = probs.ids[sl], probs.probs[sl]
        logp_RV = torch.full((ids.shape[0], V), -math.inf, device=p.device, dtype=p.dtype)
        return logp_RV.scatter_(-1, ids, torch.log(p))
    return torch.log(probs[sl])


def _posterior(x_Rd: Tensor, t_R: Tensor, logp_RV: Tensor, C_Vd: Tensor, csq_V: Tensor) -> Tensor:
    """Posterior weights `w (R, V)`: softmax of `log p + (α⟨x,c⟩ − α²‖c‖²/2)/t²` (‖x‖² cancels)."""
    alpha_R1 = (1 - t_R)[:, None]
    inv_t2_R1 = 1.0 / (t_R * t_R)[:, None]
    logits = logp_RV + (alpha_R1 * (x_Rd @ C_Vd.T) - 0.5 * alpha_R1 * alpha_R1 * csq_V[None]) * inv_t2_R1
    return torch.softmax(logits, dim=-1)


def _chunks(R: int, chunk: int | None):
    step = R if not chunk or chunk <= 0 else chunk
    for s in range(0, R, step):
        yield slice(s, min(R, s + step))


def _forward_rows(x_Rd, t_R, probs, C_Vd, chunk, grad_out_Rd=None):
    """D for every row; with `grad_out_Rd`, instead the vector-Jacobian product `∇_x⟨g, D⟩`."""
    csq_V = (C_Vd * C_Vd).sum(-1)
    V = C_Vd.shape[0]
    out = torch.empty_like(x_Rd)
    for sl in _chunks(x_Rd.shape[0], chunk):
        x, t = x_Rd[sl], t_R[sl]
        w = _posterior(x, t, _log_probs_rows(probs, sl, V), C_Vd, csq_V)
        D = w @ C_Vd
        if grad_out_Rd is None:
            out[sl] = D
            continue
        g = grad_out_Rd[sl]
        a = ((1 - t) / (t * t))[:, None]
        # Σ_j w_j c_j (h_j − Σ_k w_k h_k) with h = C·g (= Cov_w(c)·g). Taking ⟨D, g⟩ as Σ_k w_k h_k (not D·g)
        # makes the centring exact for a one-hot posterior, where 1/t² would amplify any rounding.
        h_RV = g @ C_Vd.T
        centred_RV = h_RV - (w * h_RV).sum(-1, keepdim=True)
        out[sl] = a * ((w * centred_RV) @ C_Vd)
    return out


class _ClosedFormDenoise(torch.autograd.Function):
    """D(x) with a backward pass that recomputes the posterior per chunk (nothing (R, V) is saved)."""

    @staticmethod
    def forward(ctx, x_Rd, t_R, probs_t, ids, C_Vd, chunk):
        probs = SparseProbs(ids, probs_t) if ids is not None else probs_t
        ctx.save_for_backward(x_Rd, t_R, probs_t, ids if ids is not None else torch.empty(0), C_Vd)
        ctx.sparse = ids is not None
        ctx.chunk = chunk
        with torch.no_grad():
            return _forward_rows(x_Rd, t_R, probs, C_Vd, chunk)

    @staticmethod
    def backward(ctx, grad_Rd):
        x_Rd, t_R, probs_t, ids, C_Vd = ctx.saved_tensors
        probs = SparseProbs(ids, probs_t) if ctx.sparse else probs_t
        with torch.no_grad():
            grad_x = _forward_rows(x_Rd, t_R, probs, C_Vd, ctx.chunk, grad_out_Rd=grad_Rd.contiguous())
        return grad_x, None, None, None, None, None


def denoise(x_BNd: Tensor, t_BN: Tensor, probs: Probs, codebook_Vd: Tensor, *, chunk_size: int | None = 4096,
            t_min: float = DEFAULT_T_MIN) -> Tensor:
    """Closed-form denoiser `D = E[x_0 | x_t = x]` for a categorical over codebook vectors.

    - `x_BNd (..., d)`, `t_BN (...)` (broadcastable to `x` without its last dim), `probs (..., V)` dense
      with exact zeros outside the support, or a `SparseProbs` with ids/probs `(..., K)` (the teacher's
      top-k support: the caller never materialises `(..., V)`).
    - `chunk_size`: rows per chunk, bounding the `(rows, V)` work tensors (None or 0: all rows at once).
    Computes in fp32 (float64 if `x` is float64). Differentiable in `x` (memory-lean custom backward);
    `t`, `probs` and the codebook get no gradient.
    """
    d = x_BNd.shape[-1]
    lead = x_BNd.shape[:-1]
    dtype = torch.float64 if x_BNd.dtype == torch.float64 else torch.float32
    x_Rd = x_BNd.to(dtype).reshape(-1, d)
    t_R = torch.broadcast_to(t_BN.to(dtype), lead).reshape(-1).clamp(t_min, 1.0)
    C = codebook_Vd.to(dtype).detach()
    if isinstance(probs, SparseProbs):
        sp = probs.reshape_rows()
        D = _ClosedFormDenoise.apply(x_Rd, t_R, sp.probs.to(dtype).detach(), sp.ids, C, chunk_size)
    else:
        D = _ClosedFormDenoise.apply(x_Rd, t_R, probs.to(dtype).reshape(-1, probs.shape[-1]).detach(), None, C,
                                     chunk_size)
    return D.reshape(*lead, d)


def denoise_reference(x: Tensor, t: Tensor, probs: Tensor, codebook_Vd: Tensor, t_min: float = DEFAULT_T_MIN
                      ) -> Tensor:
    """The straightforward dense formula, one matmul, plain autograd, in `x`'s dtype (the reference)."""
    t = torch.broadcast_to(t.to(x.dtype), x.shape[:-1]).clamp(t_min, 1.0)[..., None]
    C = codebook_Vd.to(x.dtype)
    csq_V = (C * C).sum(-1)
    logits = torch.log(probs.to(x.dtype)) + ((1 - t) * (x @ C.T) - 0.5 * (1 - t) ** 2 * csq_V) * (1.0 / (t * t))
    return torch.softmax(logits, dim=-1) @ C


def score(x: Tensor, t: Tensor, probs: Probs, codebook_Vd: Tensor, **kw) -> Tensor:
    """`∇_x log p_t(x)` of the noised mixture."""
    t = torch.broadcast_to(t.float(), x.shape[:-1]).clamp(kw.get("t_min", DEFAULT_T_MIN), 1.0)
    return score_from_denoised(x, t, denoise(x, t, probs, codebook_Vd, **kw))


def velocity(x: Tensor, t: Tensor, probs: Probs, codebook_Vd: Tensor, **kw) -> Tensor:
    """`E[ε − x_0 | x_t = x]` of the noised mixture."""
    t = torch.broadcast_to(t.float(), x.shape[:-1]).clamp(kw.get("t_min", DEFAULT_T_MIN), 1.0)
    return velocity_from_denoised(x, t, denoise(x, t, probs, codebook_Vd, **kw))


def mixture_log_density(x: Tensor, t: Tensor, probs: Tensor, codebook_Vd: Tensor) -> Tensor:
    """`log Σ_j p_j N(x; (1−t)c_j, t²I)` (for tests: its gradient is the score)."""
    d = x.shape[-1]
    t = t[..., None]
    sq = ((x[..., None, :] - (1 - t[..., None]) * codebook_Vd) ** 2).sum(-1)
    log_norm = -0.5 * d * math.log(2 * math.pi) - d * torch.log(t)
    return torch.logsumexp(torch.log(probs) - sq / (2 * t * t) + log_norm, dim=-1)
