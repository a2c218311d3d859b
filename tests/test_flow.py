import math

import pytest
import torch

from dd2cli import flow


def _setup(B=3, n=5, V=7, d=4, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(V, d, generator=g)
    logits = torch.randn(B, n, V, generator=g) * 2
    if zeros:  # exact zeros outside a top-4 support, like a top-k filtered teacher
        kth = logits.topk(4, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    p = torch.softmax(logits, -1)
    x = torch.randn(B, n, d, generator=g)
    t = torch.rand(B, n, generator=g) * 0.98 + 0.01
    return x, t, p, C


def _brute_force(x, t, p, C):
    """Enumerate j with explicit Gaussian densities in float64."""
    x, t, p, C = x.double(), t.double(), p.double(), C.double()
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            dens = torch.stack([
                p[b, i, j] * torch.exp(-((x[b, i] - (1 - t[b, i]) * C[j]) ** 2).sum() / (2 * t[b, i] ** 2))
                for j in range(C.shape[0])])
            w = dens / dens.sum()
            out[b, i] = (w[:, None] * C).sum(0)
    return out


@pytest.mark.parametrize("chunk", [None, 2, 4096])
def test_denoiser_equals_brute_force(chunk):
    x, t, p, C = _setup()
    t = t * 0.5 + 0.5  # keep densities representable in float64 for the enumeration
    D = flow.denoise(x, t, p, C, chunk_size=chunk)
    assert torch.allclose(D.double(), _brute_force(x, t, p, C), atol=1e-5)


def test_sparse_support_equals_dense():
    x, t, p, C = _setup(B=4, n=6, V=50, d=8)
    dense = flow.denoise(x, t, p, C, chunk_size=None)
    sparse = flow.denoise(x, t, flow.SparseProbs.from_dense(p, 4), C, chunk_size=5)
    assert (dense - sparse).abs().max() < 1e-5
    with pytest.raises(ValueError, match="larger support"):
        flow.SparseProbs.from_dense(p, 2)


def test_score_is_gradient_of_mixture_log_density():
    x, t, p, C = _setup(zeros=False)
    x = x.double().requires_grad_(True)
    logp = flow.mixture_log_density(x, t.double(), p.double(), C.double()).sum()
    (grad,) = torch.autograd.grad(logp, x)
    s = flow.score(x.detach().float(), t, p, C, t_min=1e-6)
    assert torch.allclose(s.double(), grad, atol=2e-3, rtol=1e-3)


def test_velocity_and_conversions_agree():
    x, t, p, C = _setup()
    D = flow.denoise(x, t, p, C)
    v = flow.velocity(x, t, p, C)
    s = flow.score(x, t, p, C)
    assert torch.allclose(flow.denoised_from_velocity(x, t, v), D, atol=1e-5)
    assert torch.allclose(flow.velocity_from_score(x, t, s), v, atol=1e-3, rtol=1e-4)


def test_limit_t_one_posterior_is_p():
    x, t, p, C = _setup()
    D = flow.denoise(x, torch.ones_like(t), p, C)
    assert torch.allclose(D, p @ C, atol=1e-6)


def test_limit_t_to_zero_snaps_to_nearest_codebook_vector():
    _, _, p, C = _setup(V=7, d=4, zeros=False)
    # a point near codebook vector 3 at small t: posterior concentrates on 3
    x = C[3].expand(3, 5, -1) + 1e-4
    D = flow.denoise(x, torch.full((3, 5), 1e-3), p, C)
    assert torch.allclose(D, C[3].expand_as(D), atol=1e-4)


def test_gradient_matches_finite_differences_and_reference_autograd():
    x, t, p, C = _setup(B=2, n=3, V=9, d=3, zeros=False)
    x = x.double()
    w = torch.randn_like(x)

    def f(xx):
        return (flow.denoise(xx.float(), t, p, C, chunk_size=2).double() * w).sum()

    xg = x.clone().float().requires_grad_(True)
    (flow.denoise(xg, t, p, C, chunk_size=2).double() * w).sum().backward()
    eps = 1e-3
    fd = torch.zeros_like(x)
    for idx in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=torch.double)
        e[idx] = eps
        e = e.view_as(x)
        fd.view(-1)[idx] = (f(x + e) - f(x - e)) / (2 * eps)
    assert torch.allclose(xg.grad.double(), fd, atol=2e-2, rtol=2e-2)
    # and equals plain autograd through the straightforward formula
    xr = x.clone().float().requires_grad_(True)
    (flow.denoise_reference(xr, t, p, C).double() * w).sum().backward()
    assert (xr.grad - xg.grad).abs().max() < 1e-4


def test_sparse_gradient_equals_dense_gradient():
    x, t, p, C = _setup(B=3, n=4, V=40, d=6)
    g = torch.randn_like(x)
    xa = x.clone().requires_grad_(True)
    (flow.denoise(xa, t, p, C, chunk_size=None) * g).sum().backward()
    xb = x.clone().requires_grad_(True)
    (flow.denoise(xb, t, flow.SparseProbs.from_dense(p, 4), C, chunk_size=3) * g).sum().backward()
    assert (xa.grad - xb.grad).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["uniform", "logit-normal"])
def test_timesteps_in_range(kind):
    t = flow.sample_timesteps((10000,), kind, t_min=0.01, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.01 and t.max() <= 1.0
    if kind == "uniform":
        assert abs(t.mean().item() - 0.505) < 0.01
    else:
        assert abs(t.median().item() - 0.5) < 0.02
    with pytest.raises(ValueError):
        flow.sample_timesteps((2,), "cosine")


@pytest.mark.parametrize("sparse", [False, True])
def test_memory_lean_gradient_equals_plain_autograd_in_float64(sparse):
    """Proof of identical results: the chunked custom backward (and its top-k support
    variant) against plain autograd through the dense formula, both in float64, on training-like
    inputs (x_t built from codebook vectors drawn from p, t down to 0.01 where 1/t² is large)."""
    g = torch.Generator().manual_seed(3)
    B, n, V, d, k = 2, 6, 64, 8, 16
    C = torch.randn(V, d, generator=g, dtype=torch.float64)
    logits = torch.randn(B, n, V, generator=g, dtype=torch.float64) * 3
    kth = logits.topk(k, dim=-1).values[..., -1:]
    p = torch.softmax(logits.masked_fill(logits < kth, -math.inf), -1)
    q = torch.multinomial(p.reshape(-1, V), 1, generator=g).reshape(B, n)
    t = torch.rand(B, n, generator=g, dtype=torch.float64) * 0.99 + 0.01
    x = (1 - t[..., None]) * C[q] + t[..., None] * torch.randn(B, n, d, generator=g, dtype=torch.float64)
    w = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    probs = flow.SparseProbs.from_dense(p, k) if sparse else p

    xa = x.clone().requires_grad_(True)
    Da = flow.denoise(xa, t, probs, C, chunk_size=5)
    (Da * w).sum().backward()
    xb = x.clone().requires_grad_(True)
    Db = flow.denoise_reference(xb, t, p, C)
    (Db * w).sum().backward()
    assert Da.dtype == torch.float64 and xa.grad.dtype == torch.float64
    assert (Da - Db).abs().max() <= 1e-5
    assert (xa.grad - xb.grad).abs().max() <= 1e-5
    assert xb.grad.abs().max() > 1  # the comparison is not vacuous: 1/t² makes these gradients large
