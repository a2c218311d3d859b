"""The teacher contract suite: call `check_teacher(teacher)` from any plugin's tests.

Each check raises `AssertionError` with a message saying which part of the contract
(`dd2cli.teacher.Teacher`) is broken. `check_teacher` runs all of them; the individual `check_*`
functions can be called on their own (e.g. shape checks for a real-size model).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .teacher import Backbone, Teacher
from .teachers import SamplingSettings, TeacherSpec


def _labels(teacher: Teacher, batch_size: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, teacher.spec.num_classes, (batch_size,), generator=g).to(teacher.device)


def _random_tokens(teacher: Teacher, batch_size: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    spec = teacher.spec
    return torch.randint(0, spec.vocab_size, (batch_size, spec.num_tokens), generator=g).to(teacher.device)


def _generator(teacher: Teacher, seed: int) -> torch.Generator:
    return torch.Generator(device=teacher.device).manual_seed(seed)


def check_spec(teacher: Teacher) -> None:
    spec = teacher.spec
    assert isinstance(spec, TeacherSpec), "teacher.spec must be a dd2cli.teachers.TeacherSpec"
    assert spec.num_tokens > 0 and spec.vocab_size > 1 and spec.latent_dim > 0, "spec sizes must be positive"
    assert spec.num_classes > 0, "spec.num_classes must be positive"
    assert not (0 <= spec.null_class < spec.num_classes), "spec.null_class must not be a real class id"
    cb = teacher.codebook()
    assert tuple(cb.shape) == (spec.vocab_size, spec.latent_dim), (
        f"codebook() shape {tuple(cb.shape)} != (V, d) = {(spec.vocab_size, spec.latent_dim)}")
    assert cb.dtype == torch.float32, f"codebook() dtype {cb.dtype} != float32"
    assert torch.isfinite(cb).all(), "codebook() has non-finite entries"
    steps = teacher.steps_tensor()
    assert steps.shape == (spec.num_tokens,) and steps.dtype == torch.long, "steps_tensor() must be LongTensor (n,)"


def check_logits(teacher: Teacher, batch_size: int = 2, seed: int = 0) -> None:
    """Shapes/dtypes of logits and sampling_probs, ids vs. codebook latents agree."""
    spec = teacher.spec
    labels = _labels(teacher, batch_size, seed)
    tokens = _random_tokens(teacher, batch_size, seed)
    with torch.no_grad():
        logits = teacher.logits(tokens, labels)
        assert tuple(logits.shape) == (batch_size, spec.num_tokens, spec.vocab_size), (
            f"logits() shape {tuple(logits.shape)} != (B, n, V)")
        assert logits.dtype == torch.float32, f"logits() dtype {logits.dtype} != float32"
        assert torch.isfinite(logits).all(), "logits() has non-finite entries"
        from_latents = teacher.logits(teacher.as_latents(tokens), labels)
        assert torch.allclose(logits, from_latents, atol=1e-4, rtol=1e-4), (
            "logits() of codebook latents differs from logits() of the same token ids")
        for settings in (spec.stage1, spec.target, spec.evaluation):
            probs = teacher.sampling_probs(tokens, labels, settings)
            assert tuple(probs.shape) == tuple(logits.shape), "sampling_probs() shape != logits shape"
            assert torch.isfinite(probs).all() and (probs >= 0).all(), "sampling_probs() must be finite, >= 0"
            assert torch.allclose(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-4), (
                "sampling_probs() rows must sum to 1")
            if settings.top_k and settings.top_k < spec.vocab_size:
                support = (probs > 0).sum(-1)
                assert int(support.max()) <= settings.top_k, (
                    f"sampling_probs() keeps {int(support.max())} entries with top_k={settings.top_k}")


def check_causality(teacher: Teacher, batch_size: int = 2, seed: int = 0, atol: float = 1e-5) -> None:
    """Changing the tokens of step s must not change logits at steps <= s, and must change later ones."""
    spec = teacher.spec
    labels = _labels(teacher, batch_size, seed)
    tokens = _random_tokens(teacher, batch_size, seed)
    steps = teacher.steps_tensor().cpu()
    with torch.no_grad():
        base = teacher.logits(tokens, labels)
        for s in range(spec.num_steps):
            pos = (steps == s).nonzero().flatten()
            changed = tokens.clone()
            changed[:, pos] = (changed[:, pos] + 1 + torch.arange(len(pos), device=tokens.device)) % spec.vocab_size
            out = teacher.logits(changed, labels)
            early = (steps <= s).nonzero().flatten().to(tokens.device)
            assert torch.allclose(base[:, early], out[:, early], atol=atol), (
                f"logits at steps <= {s} changed when tokens of step {s} changed (not causal)")
        # the last prefix must influence something, else the teacher ignores its input
        if spec.num_steps > 1:
            changed = torch.randint_like(tokens, spec.vocab_size)
            out = teacher.logits(changed, labels)
            later = (steps > 0).nonzero().flatten().to(tokens.device)
            assert not torch.allclose(base[:, later], out[:, later], atol=1e-6), (
                "logits do not depend on earlier tokens at all")


def check_new_backbone(teacher: Teacher, batch_size: int = 2, seed: int = 0, atol: float = 1e-5) -> Backbone:
    """Backbone shapes, trainability, continuous input and causality of its features."""
    spec = teacher.spec
    backbone = teacher.new_backbone()
    assert isinstance(backbone, Backbone), "new_backbone() must return a dd2cli.teacher.Backbone"
    params = [p for p in backbone.parameters()]
    assert params and all(p.requires_grad for p in params), "the backbone's parameters must be trainable"
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_params for p in params), "new_backbone() must copy, not share, teacher weights"
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch_size, spec.num_tokens, spec.latent_dim, generator=g).to(teacher.device)
    labels = _labels(teacher, batch_size, seed)
    steps = teacher.steps_tensor().cpu()
    backbone.eval()
    with torch.no_grad():
        f = backbone(z, labels)
        assert tuple(f.shape) == (batch_size, spec.num_tokens, backbone.feature_dim), (
            f"backbone output {tuple(f.shape)} != (B, n, feature_dim={backbone.feature_dim})")
        assert f.dtype == torch.float32 and torch.isfinite(f).all(), "backbone features must be finite float32"
        for s in range(spec.num_steps):
            pos = (steps == s).nonzero().flatten().to(z.device)
            z2 = z.clone()
            z2[:, pos] += torch.randn(z2[:, pos].shape, generator=g).to(z.device)
            f2 = backbone(z2, labels)
            early = (steps <= s).nonzero().flatten().to(z.device)
            assert torch.allclose(f[:, early], f2[:, early], atol=atol), (
                f"backbone features at steps <= {s} changed when z of step {s} changed (not causal)")
            if s < spec.num_steps - 1:
                later = (steps > s).nonzero().flatten().to(z.device)
                assert not torch.allclose(f[:, later], f2[:, later], atol=1e-7), (
                    f"backbone features after step {s} ignore z of step {s}")
    backbone.train()
    out = backbone(z, labels)
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "no gradient reaches the backbone"
    return backbone


def check_sampler(teacher: Teacher, batch_size: int = 2, seed: int = 0, atol: float = 1e-4) -> None:
    """Sampler shapes, determinism, prefix continuation and teacher-forced == AR logits."""
    spec = teacher.spec
    labels = _labels(teacher, batch_size, seed)
    settings = spec.evaluation
    with torch.no_grad():
        a = teacher.sample(labels, settings, generator=_generator(teacher, seed))
        b = teacher.sample(labels, settings, generator=_generator(teacher, seed))
        assert tuple(a.shape) == (batch_size, spec.num_tokens) and a.dtype == torch.long, (
            f"sample() must return LongTensor (B, n), got {a.dtype} {tuple(a.shape)}")
        assert int(a.min()) >= 0 and int(a.max()) < spec.vocab_size, "sampled ids out of range"
        assert torch.equal(a, b), "sample() is not deterministic under the same seeded generator"
        # teacher-forced logits equal the KV-cached sampler's, conditional and unconditional
        plain = SamplingSettings(cfg=settings.cfg, top_k=0, top_p=1.0, temperature=1.0)
        for lab in (labels, torch.full_like(labels, spec.null_class)):
            tokens, ar_logits = teacher.sample(lab, plain, generator=_generator(teacher, seed + 7), return_logits=True)
            tf_logits = teacher.logits(tokens, lab)
            err = (ar_logits - tf_logits).abs().max().item()
            assert err <= atol, f"teacher-forced logits differ from the AR sampler's by {err:.3g} (> {atol})"
        # continuing from a prefix keeps the prefix and is deterministic
        for start in range(1, spec.num_steps):
            cont = teacher.sample(labels, settings, prefix_BN=a, start_step=start,
                                  generator=_generator(teacher, seed + 3))
            early = (teacher.steps_tensor() < start)
            assert torch.equal(cont[:, early], a[:, early]), f"sample(start_step={start}) changed the prefix"
            cont_latent = teacher.sample(labels, settings, prefix_BN=teacher.as_latents(a), start_step=start,
                                         generator=_generator(teacher, seed + 3))
            assert torch.equal(cont, cont_latent), "sample() from a latent prefix differs from the same id prefix"


def check_decode(teacher: Teacher, batch_size: int = 2, seed: int = 0) -> None:
    spec = teacher.spec
    tokens = _random_tokens(teacher, batch_size, seed)
    with torch.no_grad():
        img = teacher.decode(tokens)
        assert img.ndim == 4 and img.shape[0] == batch_size and img.shape[1] == 3, (
            f"decode() must return (B, 3, H, W), got {tuple(img.shape)}")
        assert img.shape[-1] == spec.image_size and img.shape[-2] == spec.image_size, (
            f"decode() image size {tuple(img.shape[-2:])} != spec.image_size {spec.image_size}")
        assert img.dtype == torch.float32 and torch.isfinite(img).all(), "decode() must return finite float32"
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0, "decode() must return values in [0, 1]"
        img_latent = teacher.decode(teacher.as_latents(tokens))
        assert tuple(img_latent.shape) == tuple(img.shape), "decode() of latents must have the same shape"


def check_teacher(teacher: Teacher, *, batch_size: int = 2, seed: int = 0, atol: float = 1e-4,
                  check_backbone: bool = True) -> None:
    """Run every contract check on `teacher` (eval mode, fp32)."""
    teacher.eval()
    check_spec(teacher)
    check_logits(teacher, batch_size, seed)
    check_causality(teacher, batch_size, seed)
    check_sampler(teacher, batch_size, seed, atol)
    check_decode(teacher, batch_size, seed)
    if check_backbone:
        check_new_backbone(teacher, batch_size, seed)
