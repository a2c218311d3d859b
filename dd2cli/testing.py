"""The teacher contract suite: call `check_teacher(teacher)` from any plugin's tests.

Each check raises `AssertionError` with a message saying which part of the contract
(`dd2cli.teacher.Teacher`) is broken. `check_teacher` runs all of them; the individual `check_*`
functions can be called on their own (e.g. shape checks for a real-size model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from .teacher import Backbone, Teacher
from .teachers import SamplingSettings, TeacherSpec, Variant


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
            again = teacher.sampling_probs(tokens, labels, settings)
            assert torch.allclose(probs, again, atol=1e-5), (
                f"sampling_probs() gives different values for the same tokens and labels under {settings}; "
                f"guide() and filter_logits() must be deterministic functions of the logits (no random noise), "
                f"as the family's sampler applies them")
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
    """Backbone shapes, trainability, continuous input and causality of its features.

    That the features do read the earlier steps is `check_backbone_reads_prefix`.
    """
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


def _chi2_sf(stat: float, df: int) -> float:
    """`P(X >= stat)` for `X` chi-square with `df` degrees of freedom (1.0 when `df == 0`)."""
    if df <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _pearson_binned(counts_V: Tensor, expected_V: Tensor, min_expected: float) -> tuple[float, int]:
    """Pearson's chi-square of `counts_V` against `expected_V` and its degrees of freedom.

    Codes are taken by decreasing expected count and merged into bins of expected count >= `min_expected`
    (a last bin below it joins the one before), so the chi-square approximation holds for any `V`. Codes with
    expected count 0 are left out: `check_sampler_distribution` requires them never to be drawn.
    """
    keep = expected_V > 0
    e_V, o_V = expected_V[keep], counts_V[keep]
    order = torch.argsort(e_V, descending=True)
    bins_e: list[float] = []
    bins_o: list[float] = []
    acc_e = acc_o = 0.0
    for e, o in zip(e_V[order].tolist(), o_V[order].tolist()):
        acc_e, acc_o = acc_e + e, acc_o + o
        if acc_e >= min_expected:
            bins_e.append(acc_e)
            bins_o.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e > 0:
        if bins_e:
            bins_e[-1] += acc_e
            bins_o[-1] += acc_o
        else:
            bins_e.append(acc_e)
            bins_o.append(acc_o)
    stat = sum((o - e) ** 2 / e for o, e in zip(bins_o, bins_e))
    return stat, len(bins_e) - 1


@dataclass
class _Tally:
    """Draws of one group of positions: counts and summed `sampling_probs()` per label, PITs, an impossible draw."""

    what: str
    counts_LV: Tensor
    expected_LV: Tensor
    pit: list[Tensor]  # randomised probability-integral transforms of the draws: i.i.d. U(0, 1) when correct
    impossible: tuple[int, int, int] | None = None  # (code, position, label index)


def _tally(teacher: Teacher, tokens_RN: Tensor, label_R: Tensor, labels_L: Tensor, sampling: SamplingSettings,
           groups: Mapping[str, Tensor], g: torch.Generator, shared: bool = False) -> list[_Tally]:
    """Tally drawn sequences against `sampling_probs()` of themselves (teacher-forced, in row chunks).

    The probabilities of a token depend only on the tokens of earlier steps, so every token is compared with
    the distribution it was drawn from, given the prefix it was drawn after. The randomised probability-integral
    transform of a draw `x`, codes ordered by decreasing probability, `u = P(p > p_x) + U · P(p = p_x)` with
    `U ~ U(0, 1)` (`g`), is uniform given everything drawn before it, so the `u` of a correct sampler are i.i.d.
    U(0, 1). `shared`: the groups' positions have one distribution per label (the first step, or a continued
    fixed prefix), so `sampling_probs()` runs on the first row of each label only.
    """
    spec = teacher.spec
    L, V = len(labels_L), spec.vocab_size
    tallies = [_Tally(what, torch.zeros(L, V, dtype=torch.float64), torch.zeros(L, V, dtype=torch.float64), [])
               for what in groups]
    chunk = max(1, 2 ** 22 // (spec.num_tokens * V))
    if shared:
        first_L = torch.stack([(label_R == li).nonzero()[0, 0] for li in range(L)])
        probs_LNV = teacher.sampling_probs(tokens_RN[first_L].to(teacher.device), labels_L, sampling).double().cpu()
    for b in range(0, len(tokens_RN), chunk):
        tok_CN, lab_C = tokens_RN[b : b + chunk], label_R[b : b + chunk]
        if shared:
            probs_CNV = probs_LNV[lab_C]
        else:
            probs_CNV = teacher.sampling_probs(tok_CN.to(teacher.device), labels_L[lab_C.to(labels_L.device)],
                                               sampling).double().cpu()
        for tally, pos in zip(tallies, groups.values()):
            drawn_CK, probs_CKV = tok_CN[:, pos], probs_CNV[:, pos]
            p_CK1 = probs_CKV.gather(-1, drawn_CK[..., None])
            above_CK = (probs_CKV * (probs_CKV > p_CK1)).sum(-1)
            tied_CK = (probs_CKV * (probs_CKV == p_CK1)).sum(-1)
            tally.pit.append((above_CK + torch.rand(above_CK.shape, generator=g, dtype=torch.float64) * tied_CK)
                             .flatten().clamp(0, 1))
            zero = (p_CK1[..., 0] == 0).nonzero()
            if len(zero) and tally.impossible is None:
                r, j = zero[0].tolist()
                tally.impossible = (int(drawn_CK[r, j]), int(pos[j]), int(lab_C[r]))
            for li in range(L):
                mine = lab_C == li
                tally.counts_LV[li] += torch.bincount(drawn_CK[mine].flatten(), minlength=V).double()
                tally.expected_LV[li] += probs_CKV[mine].sum((0, 1))
    return tallies


def check_sampler_distribution(teacher: Teacher, num_draws: int = 512, seed: int = 0, *,
                               settings: Mapping[str, SamplingSettings] | None = None,
                               max_row_steps: int | None = None, prefix_draws: int | None = None,
                               false_alarm: float = 1e-6, min_expected: float = 10.0,
                               max_batch: int = 1024) -> None:
    """`sample()` draws from the distribution `sampling_probs()` gives the engine.

    For each of `settings` (default: `spec.target`, what the engine distils, and `spec.evaluation`, which
    has guidance and filtering), with two labels (half of the rows each):

    - sequences are drawn with `sample()`: about `num_draws` tokens of the first AR step, but at most
      `max_row_steps` (default `num_draws`) rows × AR steps, so that a teacher with many steps (a raster
      order costs one pass per token) stays cheap. Tested: the first step; and all later steps pooled, each
      token against `sampling_probs()` given the prefix it was drawn after (a teacher-forced pass);
    - one prefix per label is continued at the last AR step, `sample(prefix_BN=..., start_step=last)`, for
      about `prefix_draws` (default `num_draws // 4`) tokens. Tested: the last step given that prefix.

    Each group of draws must pass three tests:

    1. no drawn code has probability 0 under `sampling_probs()` (exact, no false alarms: this catches a
       filter that keeps other codes than the sampler's, e.g. a reversed vocabulary);
    2. which codes: Pearson's chi-square of the counts per label against the summed `sampling_probs()` (codes
       merged into bins of expected count >= `min_expected`; statistics and degrees of freedom summed over the
       labels);
    3. how likely the drawn codes are: the randomised probability-integral transform of every draw (codes by
       decreasing probability) must be uniform, Pearson's chi-square over up to 20 equal bins (this catches a
       sampler sharper or flatter than `sampling_probs()`: other guidance strength, temperature or top-k).

    False-alarm rate: below `false_alarm` (default 1e-6) over all tests together for a correct teacher:
    each chi-square test runs at level `false_alarm / number of tests` (Bonferroni), by the asymptotic
    chi-square law with >= 10 expected draws per bin. The transforms of a correct sampler are exactly i.i.d.
    uniform; pooling tokens drawn from different distributions (positions, prefixes) in test 2 only makes it
    conservative. The draws are seeded (`seed`), so the outcome is deterministic for a given teacher.
    Cost per settings: `sample()` of `min(num_draws / first-step tokens, max_row_steps / num_steps)` rows and
    a continuation of `prefix_draws / last-step tokens` rows at the last step (in chunks of `max_batch`),
    plus teacher-forced `sampling_probs()` of the first ones; lower `num_draws` for real-size models on a CPU.
    Power: the default catches gross mistakes (guidance missing or of another strength, filtering reversed or
    missing, a sampler ignoring its probabilities or its prefix); subtler ones (a temperature 20 % off) need
    a few thousand draws.
    """
    spec = teacher.spec
    if settings is None:
        settings = {"target": spec.target}
        if spec.evaluation != spec.target:
            settings["evaluation"] = spec.evaluation
    if num_draws <= 0 or not settings:
        return
    max_row_steps = num_draws if max_row_steps is None else max_row_steps
    prefix_draws = num_draws // 4 if prefix_draws is None else prefix_draws
    S, step_of_N = spec.num_steps, teacher.steps_tensor().cpu()
    g = torch.Generator().manual_seed(seed + 11)
    L = min(2, spec.num_classes)
    labels_L = torch.randperm(spec.num_classes, generator=g)[:L].to(teacher.device)

    def draw(rows: int, sampling: SamplingSettings, gen: torch.Generator, prefix_LN: Tensor | None = None):
        """`rows` sequences per label (all steps, or continuing `prefix_LN` at the last step), on the CPU."""
        label_R = torch.arange(L).repeat_interleave(rows)
        prefix_RN = None if prefix_LN is None else prefix_LN.repeat_interleave(rows, dim=0)
        out = []
        for b in range(0, L * rows, max_batch):
            lab = labels_L[label_R[b : b + max_batch].to(labels_L.device)]
            if prefix_RN is None:
                out.append(teacher.sample(lab, sampling, generator=gen).cpu())
            else:
                out.append(teacher.sample(lab, sampling, prefix_BN=prefix_RN[b : b + max_batch], start_step=S - 1,
                                          generator=gen).cpu())
        return torch.cat(out), label_R

    first_K, last_K = int((step_of_N == 0).sum()), int((step_of_N == S - 1).sum())
    rows_first = max(1, math.ceil(min(math.ceil(num_draws / first_K), max_row_steps // S) / L))  # per label
    rows_last = max(1, math.ceil(math.ceil(prefix_draws / last_K) / L)) if S > 1 and prefix_draws > 0 else 0
    level = false_alarm / (2 * len(settings) * ((2 if S > 1 else 1) + (1 if rows_last else 0)))
    with torch.no_grad():
        for k, (name, sampling) in enumerate(settings.items()):
            gen = _generator(teacher, seed + 101 + k)
            tokens_RN, label_R = draw(rows_first, sampling, gen)
            tallies = _tally(teacher, tokens_RN, label_R, labels_L, sampling,
                             {"AR step 0": (step_of_N == 0).nonzero().flatten()}, g, shared=True)
            if S > 1:
                later = "AR step 1" if S == 2 else f"AR steps 1 to {S - 1}"
                tallies += _tally(teacher, tokens_RN, label_R, labels_L, sampling,
                                  {f"{later} (each token given the prefix it was drawn after)":
                                   (step_of_N > 0).nonzero().flatten()}, g)
            if rows_last:
                prefix_LN = tokens_RN[::rows_first].to(teacher.device)  # the first sequence of each label
                tokens_RN, label_R = draw(rows_last, sampling, gen, prefix_LN)
                tallies += _tally(teacher, tokens_RN, label_R, labels_L, sampling, {
                    f"AR step {S - 1} continuing a fixed prefix (sample(prefix_BN=..., start_step={S - 1}))":
                        (step_of_N == S - 1).nonzero().flatten()}, g, shared=True)
            for tally in tallies:
                if tally.impossible is not None:
                    code, i, li = tally.impossible
                    raise AssertionError(
                        f"sample() drew code {code} at position {i} of {tally.what} for label {int(labels_L[li])} "
                        f"under the {name} settings {sampling}, a code that sampling_probs() gives probability 0; "
                        f"sample() and sampling_probs() must keep the same codes, so guide() and filter_logits() "
                        f"must apply the sampler's own guidance, temperature, top-k and top-p to the same logits "
                        f"(not to reversed or shifted ones)")
                stat, df = 0.0, 0
                for li in range(L):
                    part, part_df = _pearson_binned(tally.counts_LV[li], tally.expected_LV[li], min_expected)
                    stat, df = stat + part, df + part_df
                p_value = _chi2_sf(stat, df)
                p_text = f"= {p_value:.1e}" if p_value > 1e-300 else "< 1e-300"
                assert p_value >= level, (
                    f"sample() draws the tokens of {tally.what} with frequencies that disagree with "
                    f"sampling_probs() under the {name} settings {sampling} (Pearson chi-square {stat:.1f} on {df} "
                    f"degrees of freedom over {int(tally.counts_LV.sum())} draws, p-value {p_text}, under the level "
                    f"{level:.1e}); "
                    f"sample() must draw from the distribution sampling_probs() describes, so the sampler and "
                    f"sampling_probs() must apply the same guide() and filter_logits() to the same logits")
                u = torch.cat(tally.pit)
                bins = min(20, len(u) // int(min_expected))
                if bins >= 2:
                    counts = torch.bincount((u * bins).long().clamp(max=bins - 1), minlength=bins).double()
                    stat = float(((counts - len(u) / bins) ** 2).sum() / (len(u) / bins))
                    p_value = _chi2_sf(stat, bins - 1)
                    p_text = f"= {p_value:.1e}" if p_value > 1e-300 else "< 1e-300"
                    likelier = "likelier" if float(u.mean()) < 0.5 else "less likely"
                    assert p_value >= level, (
                        f"sample() draws the tokens of {tally.what} from {likelier} codes than sampling_probs() "
                        f"says under the {name} settings {sampling} (the probability-integral transform of "
                        f"{len(u)} draws, codes by decreasing probability, has mean {float(u.mean()):.3f} instead "
                        f"of 0.5 and is not uniform: chi-square {stat:.1f} on {bins - 1} degrees of freedom, "
                        f"p-value {p_text}, under the level {level:.1e}); the sampler and sampling_probs() must "
                        f"apply the same guidance strength, temperature, top-k and top-p")


def check_backbone_reads_prefix(teacher: Teacher, batch_size: int = 2, seed: int = 0,
                                backbone: Backbone | None = None) -> None:
    """The backbone's features at AR step `s + 1` change when the latents `z` of step `s` change.

    The generator computes `q_i` from `ε_i` and the features `f_i(ε)` alone (docs/method.md §3, eq. 3.1), so
    the features are its only view of the earlier tokens: a backbone that feeds its transformer position and
    class embeddings but not `z` (or drops some earlier steps) cannot reproduce the teacher's dependence on
    the prefix. `backbone` defaults to a fresh `teacher.new_backbone()`.
    """
    spec = teacher.spec
    if spec.num_steps < 2:
        return
    backbone = teacher.new_backbone() if backbone is None else backbone
    was_training = backbone.training
    backbone.eval()
    g = torch.Generator().manual_seed(seed + 5)
    z = torch.randn(batch_size, spec.num_tokens, spec.latent_dim, generator=g).to(teacher.device)
    labels = _labels(teacher, batch_size, seed)
    steps = teacher.steps_tensor()
    try:
        with torch.no_grad():
            f = backbone(z, labels)
            for s in range(spec.num_steps - 1):
                z2 = z.clone()
                z2[:, steps == s] += torch.randn(z2[:, steps == s].shape, generator=g).to(z.device)
                f2 = backbone(z2, labels)
                later = steps > s
                assert not torch.allclose(f[:, later], f2[:, later], atol=1e-7), (
                    f"backbone features of every later step ignore the latents z of AR step {s}, so the "
                    f"generator, whose only view of earlier tokens is the features (docs/method.md §3), cannot "
                    f"depend on them; new_backbone() must feed z of earlier steps into the transformer as the "
                    f"teacher feeds its codebook vectors, not only position and class embeddings")
                nxt = steps == s + 1
                assert not torch.allclose(f[:, nxt], f2[:, nxt], atol=1e-7), (
                    f"backbone features of AR step {s + 1} ignore the latents z of step {s} just before it, so "
                    f"the generator, whose only view of earlier tokens is the features (docs/method.md §3), "
                    f"cannot depend on them there; new_backbone() must feed z of every earlier step into the "
                    f"transformer as the teacher feeds its codebook vectors")
    finally:
        backbone.train(was_training)


def check_variant(teacher: Teacher, variant: Variant) -> None:
    """The registered `Variant` describes the loaded teacher: `variant.image_size == spec.image_size`."""
    size = teacher.spec.image_size
    assert variant.image_size == size, (
        f"Variant '{variant.name}' declares image_size={variant.image_size} but its teacher's spec.image_size is "
        f"{size}; make Variant.image_size (what 'dd2 teachers' lists) and the TeacherSpec the loader builds agree")


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
                  check_backbone: bool = True, num_draws: int = 512, variant: Variant | None = None) -> None:
    """Run every contract check on `teacher` (eval mode, fp32).

    `num_draws` sizes `check_sampler_distribution` (0 skips it); `variant`, the registered `Variant` the
    teacher was loaded from, adds `check_variant`.
    """
    teacher.eval()
    check_spec(teacher)
    if variant is not None:
        check_variant(teacher, variant)
    check_logits(teacher, batch_size, seed)
    check_causality(teacher, batch_size, seed)
    check_sampler(teacher, batch_size, seed, atol)
    check_sampler_distribution(teacher, num_draws, seed)
    check_decode(teacher, batch_size, seed)
    if check_backbone:
        backbone = check_new_backbone(teacher, batch_size, seed)
        check_backbone_reads_prefix(teacher, batch_size, seed, backbone=backbone)
