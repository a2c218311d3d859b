"""`dd2cli.testing.check_teacher` refuses the mistakes a plugin author makes, each with its own sentence.

Every broken teacher is the exact synthetic teacher (tests/synthetic.py) with one mistake; the unmodified
teacher passes. Real families apply guidance and filtering inside their sampler with code of their own (VAR,
LlamaGen), so a wrong `guide()` / `filter_logits()` shows only in `sampling_probs()`, which the engine trains
on: `_SamplerOwnsPostprocessing` mimics that.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from synthetic import SYNTHETIC_VARIANTS, SyntheticTeacher

from dd2cli import PluginError
from dd2cli.testing import (
    _chi2_sf,
    _pearson_binned,
    check_backbone_reads_prefix,
    check_sampler_distribution,
    check_teacher,
    check_variant,
)


class _SamplerOwnsPostprocessing(SyntheticTeacher):
    """A family whose sampler post-processes logits with its own code (`_sampler_methods`), not the overridable
    `guide()` / `filter_logits()` the engine calls through `sampling_probs()`."""

    _sampler_methods: dict = {"guide": SyntheticTeacher.guide, "filter_logits": SyntheticTeacher.filter_logits}

    def sample(self, *args, **kwargs):
        own = {name: types.MethodType(fn, self) for name, fn in self._sampler_methods.items()}
        self.__dict__.update(own)  # instance attributes shadow the methods while the sampler runs
        try:
            return super().sample(*args, **kwargs)
        finally:
            for name in own:
                del self.__dict__[name]


# ---- the reference: an exact teacher passes everything ------------------------------------------------

@pytest.mark.parametrize("variant", SYNTHETIC_VARIANTS, ids=[v.name for v in SYNTHETIC_VARIANTS])
def test_the_synthetic_teacher_passes_every_check(variant):
    teacher = variant.load()  # Variant.load accepts it: the image sizes agree
    check_teacher(teacher, variant=variant)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_distribution_check_passes_a_correct_sampler_whatever_the_seed(seed):
    teacher = SyntheticTeacher(steps=(0, 1, 1, 2, 2, 2), vocab_size=3, seed=seed).eval()
    check_sampler_distribution(teacher, num_draws=2048, seed=seed)


def test_the_binned_chi_square_holds_its_level_on_a_large_vocabulary():
    """Many codes with tiny expected counts (V = 500, 2048 draws): binning keeps the test calibrated."""
    g = torch.Generator().manual_seed(0)
    p_V = torch.softmax(2.0 * torch.randn(500, generator=g, dtype=torch.float64), 0)
    p_values = []
    for _ in range(400):
        counts_V = torch.bincount(torch.multinomial(p_V, 2048, replacement=True, generator=g), minlength=500)
        stat, df = _pearson_binned(counts_V.double(), 2048 * p_V, 10.0)
        p_values.append(_chi2_sf(stat, df))
    rejected = sum(p < 0.05 for p in p_values) / len(p_values)
    assert 0.02 <= rejected <= 0.09, rejected
    assert min(p_values) > 1e-4


def test_the_chi_square_tail_is_scipys():
    stats = pytest.importorskip("scipy.stats")
    for stat, df in [(3.0, 1), (40.0, 7), (250.0, 180), (900.0, 600)]:
        assert math.isclose(_chi2_sf(stat, df), stats.chi2.sf(stat, df), rel_tol=1e-6)


# ---- (a) guidance --------------------------------------------------------------------------------------

def test_a_guide_returning_random_noise_is_refused():
    class NoisyGuide(SyntheticTeacher):
        def guide(self, logits_c_BNV, logits_u_BNV, settings):
            return torch.randn_like(logits_c_BNV)

    with pytest.raises(AssertionError, match=r"sampling_probs\(\) gives different values .* guide\(\) and "
                                             r"filter_logits\(\) must be deterministic"):
        check_teacher(NoisyGuide().eval())


def test_a_guide_unlike_the_samplers_guidance_is_refused():
    """Deterministic noise: sampling_probs is reproducible, but it is not what the sampler draws from."""
    class UnrelatedGuide(_SamplerOwnsPostprocessing):
        def guide(self, logits_c_BNV, logits_u_BNV, settings):
            g = torch.Generator().manual_seed(0)
            return 3.0 * torch.randn(logits_c_BNV.shape, generator=g).to(logits_c_BNV.device)

    with pytest.raises(AssertionError, match=r"sample\(\) dr.* evaluation settings .*guide\(\) and "
                                             r"filter_logits\(\)"):
        check_teacher(UnrelatedGuide().eval())


# ---- (b) filtering -------------------------------------------------------------------------------------

class _ReversedFilter(_SamplerOwnsPostprocessing):
    def filter_logits(self, logits_BNV, settings):
        return SyntheticTeacher.filter_logits(self, logits_BNV.flip(-1), settings)


def test_a_filter_reversing_the_vocabulary_is_refused():
    with pytest.raises(AssertionError, match=r"sample\(\) draws the tokens of AR step 0 with frequencies that "
                                             r"disagree with sampling_probs\(\) under the target settings"):
        check_teacher(_ReversedFilter().eval())


def test_a_code_the_filter_removed_must_never_be_drawn():
    teacher = _ReversedFilter().eval()  # evaluation keeps top-k = V - 1 codes: the sampler draws a removed one
    with pytest.raises(AssertionError, match=r"sample\(\) drew code \d+ at position 0 of AR step 0 for label \d+ "
                                             r"under the evaluation settings .* sampling_probs\(\) gives "
                                             r"probability 0"):
        check_sampler_distribution(teacher, settings={"evaluation": teacher.spec.evaluation})


# ---- (c) a sampler that ignores sampling_probs -------------------------------------------------------

def test_a_uniform_sampler_is_refused():
    class UniformSampler(_SamplerOwnsPostprocessing):
        _sampler_methods = {**_SamplerOwnsPostprocessing._sampler_methods,
                            "filter_logits": lambda self, logits_BNV, settings: torch.zeros_like(logits_BNV)}

    with pytest.raises(AssertionError, match=r"sample\(\) draws the tokens of AR step 0 with frequencies that "
                                             r"disagree with sampling_probs\(\) under the target settings .*"
                                             r"p-value [=<] .* must draw from the distribution sampling_probs\(\) describes"):
        check_teacher(UniformSampler().eval())


class _UniformAfterStep0(SyntheticTeacher):
    """Right at the first AR step, uniform at every later one (its sampler calls filter_logits once per step)."""

    def sample(self, labels_B, settings, prefix_BN=None, start_step=0, generator=None, return_logits=False):
        calls = iter(range(start_step, self.spec.num_steps))

        def step_filter(logits_BNV, settings):
            if next(calls) == 0:
                return SyntheticTeacher.filter_logits(self, logits_BNV, settings)
            return torch.zeros_like(logits_BNV)

        self.__dict__["filter_logits"] = step_filter
        try:
            return super().sample(labels_B, settings, prefix_BN, start_step, generator, return_logits)
        finally:
            del self.__dict__["filter_logits"]


def test_a_sampler_wrong_after_the_first_step_is_refused():
    """Each later token is compared with sampling_probs() given the prefix it was drawn after."""
    with pytest.raises(AssertionError, match=r"sample\(\) draws the tokens of AR steps 1 to 2 \(each token given the "
                                             r"prefix it was drawn after\) with frequencies that disagree"):
        check_teacher(_UniformAfterStep0(steps=(0, 1, 1, 2, 2, 2), vocab_size=3).eval())


def test_a_sampler_ignoring_the_prefix_it_continues_is_refused():
    """Continuing a prefix (sample(prefix_BN=..., start_step=s)) must condition on that prefix."""
    class ForgetsThePrefix(SyntheticTeacher):
        def sample(self, labels_B, settings, prefix_BN=None, start_step=0, generator=None, return_logits=False):
            if prefix_BN is not None and start_step > 0:  # conditions on another prefix, keeps the given one
                other = torch.randint_like(self.as_tokens(prefix_BN), self.spec.vocab_size)
                tokens = super().sample(labels_B, settings, other, start_step, generator, return_logits=False)
                keep = self.steps_tensor() < start_step
                tokens[:, keep] = self.as_tokens(prefix_BN)[:, keep]
                return tokens
            return super().sample(labels_B, settings, prefix_BN, start_step, generator, return_logits)

    with pytest.raises(AssertionError, match=r"sample\(\) draws the tokens of AR step 2 continuing a fixed prefix "
                                             r"\(sample\(prefix_BN=\.\.\., start_step=2\)\) with frequencies"):
        check_sampler_distribution(ForgetsThePrefix(steps=(0, 1, 1, 2, 2, 2), vocab_size=3).eval(), num_draws=2048)


# ---- (d) a backbone that does not read the prefix ---------------------------------------------------

def _teacher_whose_backbone_sees(allowed) -> SyntheticTeacher:
    """The synthetic teacher, its backbone's query of step t reading z of step s only where `allowed(s, t)`."""
    class Masked(SyntheticTeacher):
        def new_backbone(self):
            backbone = super().new_backbone()
            steps_N = self.steps_tensor().cpu()
            backbone.mask_NM[:, 1:] = ~allowed(steps_N[None, :], steps_N[:, None])  # column 0: the label
            return backbone

    return Masked().eval()


def test_a_prefix_blind_backbone_is_refused():
    """Position and class embeddings only: the generator could never recover the earlier tokens."""
    with pytest.raises(AssertionError, match=r"backbone features of every later step ignore the latents z of AR "
                                             r"step 0, so the generator, whose only view of earlier tokens is the "
                                             r"features \(docs/method.md §3\)"):
        check_teacher(_teacher_whose_backbone_sees(lambda s, t: torch.zeros_like(s < t)))


def test_a_backbone_skipping_the_step_just_before_is_refused():
    """An off-by-one shift: step t reads the steps before t - 1 but not t - 1 itself."""
    with pytest.raises(AssertionError, match=r"backbone features of AR step 1 ignore the latents z of step 0 "
                                             r"just before it"):
        check_backbone_reads_prefix(_teacher_whose_backbone_sees(lambda s, t: s < t - 1))


# ---- (e) the registered image size -------------------------------------------------------------------

def test_a_variant_whose_image_size_disagrees_is_refused():
    variant = dataclasses.replace(SYNTHETIC_VARIANTS[0], image_size=8)  # the teacher renders 4 px
    with pytest.raises(PluginError) as info:
        variant.load()
    message = str(info.value)
    assert "image_size 8" in message and "spec.image_size is 4" in message, message
    assert "\n" not in message and ". " not in message and message.endswith("."), message  # one sentence
    with pytest.raises(AssertionError, match=r"Variant 'synthetic-corr' declares image_size=8 but its teacher's "
                                             r"spec.image_size is 4"):
        check_teacher(SyntheticTeacher().eval(), variant=variant)
    check_variant(SyntheticTeacher().eval(), SYNTHETIC_VARIANTS[0])
