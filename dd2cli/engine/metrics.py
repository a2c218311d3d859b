"""The metrics of `dd2 eval`, computed as OpenAI's ADM evaluator computes them (docs/evaluation.md).

- Fréchet distance (FID on Inception pool_3, sFID on the first 7 channels of `mixed_6/conv`, digits-FID on the
  digits classifier's penultimate features), float64: `μ` by mean, `Σ` by `np.cov(rowvar=False)`, the trace of
  `sqrtm(Σ1Σ2)` from a symmetric eigendecomposition.
- Inception score: softmax of the 1008-way logits without bias, 10 splits, mean of `exp(KL)`.
- KID (Bińkowski et al. 2018, as torchmetrics' `KernelInceptionDistance`): the unbiased MMD² with the kernel
  `k(x, y) = (x·y/d + 1)³` on the same features as the FID, mean and std over random subsets, float64, seeded.
- Precision / recall: k-NN manifolds (Kynkäänniemi et al. 2019), `k = 3`, in batches.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import DD2Error


def feature_stats(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(μ (D,), Σ (D, D))` in float64: the mean and `np.cov(rowvar=False)`."""
    x = np.asarray(features_ND, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise DD2Error(f"A Fréchet distance needs at least 2 images per set; got {x.shape[0] if x.ndim else 0}.")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """`tr(sqrtm(Σ1 Σ2))` without a general matrix square root.

    `Σ1 Σ2` is similar to the symmetric PSD matrix `Σ1^½ Σ2 Σ1^½`, so both have the same
    eigenvalues and `tr sqrtm(Σ1Σ2) = Σ_i sqrt(λ_i)`. Tiny negative eigenvalues are rounding noise:
    the imaginary parts they would give `sqrtm` are what ADM drops, so they are clamped to 0.
    """
    w1, v1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """`‖μ1−μ2‖² + tr(Σ1) + tr(Σ2) − 2·tr(sqrtm(Σ1Σ2))` in float64 (ADM; retry with `eps·I` if needed)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DD2Error(f"The two feature sets have different dimensions ({mu1.shape[0]} vs {mu2.shape[0]}); "
                       f"compute both with the same network (--features).")
    diff = mu1 - mu2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        tr_covmean = math.nan
    if not math.isfinite(tr_covmean):
        offset = np.eye(sigma1.shape[0]) * eps
        try:
            tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
        except np.linalg.LinAlgError:
            tr_covmean = math.nan
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    if not math.isfinite(value):
        raise DD2Error("The Fréchet distance is not finite: the features contain NaN or inf values; check the "
                       "images (and the network weights).")
    return value


def inception_score(logits_NK: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std over `splits` contiguous splits of `exp(E_x KL(p(y|x) ‖ p(y)))` (float64)."""
    x = np.asarray(logits_NK, np.float64)
    x = x - x.max(axis=1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for part in np.array_split(np.arange(len(p)), max(1, min(splits, len(p)))):
        p_part, log_part = p[part], log_p[part]
        log_py = np.log(p_part.mean(axis=0) + 1e-300)
        kl = (p_part * (log_part - log_py[None])).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(samples_ND, ref_MD, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
                              device: str = "cpu") -> tuple[float, float]:
    """KID: mean and std (population, as torchmetrics) of the unbiased MMD² over `subsets` random subsets.

    Each subset draws `m = min(subset_size, N, M)` images of each set without replacement, from a generator
    seeded with `seed`, so a result is reproducible. Per subset, with `K = (X Yᵀ/d + 1)³`:
    `Σ_{i≠j} K_xx / m(m−1) + Σ_{i≠j} K_yy / m(m−1) − 2 Σ_{i,j} K_xy / m²`, which is unbiased: its expectation
    is 0 when both sets come from one distribution, whatever `m` (unlike the Fréchet distance). float64 on
    `device`: the kernel sums cancel to a value orders of magnitude below the kernel values themselves.
    """
    x = torch.as_tensor(np.asarray(samples_ND), device=device).to(torch.float64)
    y = torch.as_tensor(np.asarray(ref_MD), device=device).to(torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise DD2Error(f"The two feature sets have different dimensions ({x.shape[-1]} vs {y.shape[-1]}); "
                       f"compute both with the same network (--features).")
    if subsets < 1 or subset_size < 2:
        raise DD2Error(f"KID needs at least 1 subset of at least 2 images; got {subsets} subsets of {subset_size}.")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise DD2Error(f"KID needs at least 2 images per set; got {x.shape[0]} samples and {y.shape[0]} reference "
                       f"images.")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    scores_S = np.empty(subsets)
    for s in range(subsets):
        x_md = x[torch.from_numpy(rng.permutation(x.shape[0])[:m]).to(device)]
        y_md = y[torch.from_numpy(rng.permutation(y.shape[0])[:m]).to(device)]
        k_xx = (x_md @ x_md.T / d + 1) ** 3
        k_yy = (y_md @ y_md.T / d + 1) ** 3
        k_xy = (x_md @ y_md.T / d + 1) ** 3
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        scores_S[s] = float(within - 2 * k_xy.sum() / (m * m))
    if not np.isfinite(scores_S).all():
        raise DD2Error("KID is not finite: the features contain NaN or inf values; check the images (and the "
                       "network weights).")
    return float(scores_S.mean()), float(scores_S.std())


def _sq_dists(a_BD: Tensor, b_MD: Tensor) -> Tensor:
    """Squared Euclidean distances `(B, M)`, as ADM's `‖a‖² − 2ab + ‖b‖²` clamped at 0."""
    d = (a_BD * a_BD).sum(1, keepdim=True) - 2 * a_BD @ b_MD.T + (b_MD * b_MD).sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(features_ND: Tensor, k: int = 3, batch: int = 1024) -> Tensor:
    """Squared distance of every point to its k-th nearest neighbour, itself excluded."""
    n = features_ND.shape[0]
    if n <= k:
        raise DD2Error(f"Precision/recall with k={k} needs more than {k} images per set; got {n}.")
    out = torch.empty(n, dtype=features_ND.dtype, device=features_ND.device)
    for s in range(0, n, batch):
        d = _sq_dists(features_ND[s:s + batch], features_ND)
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, rows + s] = -1.0  # self: always the smallest, so the (k+1)-th smallest is the k-th other
        out[s:s + batch] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _fraction_inside(points_BD: Tensor, centres_MD: Tensor, radii_M: Tensor, batch: int) -> float:
    inside = 0
    for s in range(0, points_BD.shape[0], batch):
        d = _sq_dists(points_BD[s:s + batch], centres_MD)
        inside += int((d <= radii_M[None]).any(dim=1).sum())
    return inside / points_BD.shape[0]


def precision_recall(ref_ND, samples_MD, k: int = 3, batch: int = 1024, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Improved precision / recall (Kynkäänniemi et al. 2019) with k-NN radii, computed in batches.

    precision: fraction of samples inside the union of reference balls (radius = distance of each
    reference point to its k-th nearest reference neighbour); recall: the same with the roles swapped.
    """
    ref = torch.as_tensor(np.asarray(ref_ND), device=device).to(dtype)
    smp = torch.as_tensor(np.asarray(samples_MD), device=device).to(dtype)
    radii_ref = manifold_radii(ref, k, batch)
    radii_smp = manifold_radii(smp, k, batch)
    return _fraction_inside(smp, ref, radii_ref, batch), _fraction_inside(ref, smp, radii_smp, batch)
