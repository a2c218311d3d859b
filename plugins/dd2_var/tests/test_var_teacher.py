"""VarTeacher against the DD2 teacher contract on random miniatures (unshared and d36-style shared
AdaLN), plus VAR's own sampling rules: guidance ramp, top-k/top-p, sampler distribution."""

import pytest
import torch

from dd2_var.config import VARConfig, VQVAEConfig, vae_config, var_config
from dd2_var.model import VAR
from dd2_var.teacher import VarBackbone, VarTeacher, filter_logits, new_teacher
from dd2_var.vqvae import VQVAE, split_scales
from dd2cli import DD2Error, SamplingSettings, check_teacher

MINI_VAR = VARConfig(depth=2, width=128, num_heads=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 4))
MINI_VAE = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
SETTINGS = dict(stage1=SamplingSettings(cfg=2.0, top_k=16, top_p=1.0),
                target=SamplingSettings(cfg=2.0, top_k=16, top_p=0.95),
                evaluation=SamplingSettings(cfg=1.5, top_k=16, top_p=0.96))


@pytest.fixture(scope="module")
def mini():
    return new_teacher(MINI_VAR, MINI_VAE, seed=0, variant_name="var-mini", **SETTINGS)


@pytest.fixture(scope="module")
def mini_shared():
    cfg = VARConfig(**{**MINI_VAR.to_dict(), "shared_aln": True, "patch_nums": (1, 2, 3, 4)})
    vae = VQVAEConfig(**{**MINI_VAE.to_dict(), "patch_nums": (1, 2, 3, 4)})
    return new_teacher(cfg, vae, seed=1, variant_name="var-mini-saln", **SETTINGS)


def test_contract_suite_on_a_random_miniature(mini):
    check_teacher(mini, batch_size=2, seed=0)


def test_contract_suite_on_the_shared_adaln_miniature(mini_shared):
    assert mini_shared.var.cfg.shared_aln and hasattr(mini_shared.var.blocks[0], "ada_gss")
    check_teacher(mini_shared, batch_size=2, seed=3)


def test_spec(mini):
    spec = mini.spec
    assert spec.num_tokens == 21 and spec.vocab_size == 64 and spec.latent_dim == 8
    assert spec.steps == (0,) + (1,) * 4 + (2,) * 16
    assert spec.null_class == 10 and spec.image_size == 16
    assert torch.equal(mini.codebook(), mini.vae.quantize.embedding.weight)


@pytest.mark.parametrize("label", [3, 10])
def test_teacher_forced_logits_equal_kv_cached_sampler_logits(mini, label):
    labels = torch.tensor([label, 7 if label != 10 else 10, label])
    settings = SamplingSettings(cfg=1.5, top_k=16, top_p=0.9)
    tokens, ar_logits = mini.sample(labels, settings, generator=torch.Generator().manual_seed(5), return_logits=True)
    with torch.no_grad():
        tf_logits = mini.logits(tokens, labels)
    assert (ar_logits - tf_logits).abs().max().item() <= 1e-4
    # and the cache really is used: scale 2 logits change with scale-1 tokens
    changed = tokens.clone()
    changed[:, 1:5] = (changed[:, 1:5] + 1) % 64
    with torch.no_grad():
        assert not torch.allclose(mini.logits(changed, labels)[:, 5:], tf_logits[:, 5:])


def test_logits_of_latents_are_differentiable_and_match_ids(mini):
    tokens = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    z = mini.as_latents(tokens).clone().requires_grad_(True)
    logits = mini.logits(z, torch.tensor([1, 2]))
    logits[:, 5:].sum().backward()
    assert z.grad is not None and z.grad[:, :5].abs().sum() > 0
    assert z.grad[:, 5:].abs().sum() == 0  # the last scale is never read
    assert torch.allclose(logits, mini.logits(tokens, torch.tensor([1, 2])), atol=1e-5)


def test_guide_is_vars_linear_ramp(mini):
    lc, lu = torch.randn(2, 21, 64), torch.randn(2, 21, 64)
    out = mini.guide(lc, lu, SamplingSettings(cfg=2.0))
    for j, scale in enumerate(mini.spec.steps):
        t = 2.0 * scale / 2  # three scales: t = cfg · scale / (3 − 1)
        assert torch.allclose(out[:, j], (1 + t) * lc[:, j] - t * lu[:, j], atol=1e-6)
    assert torch.equal(mini.guide(lc, lu, SamplingSettings(cfg=0.0)), lc)
    assert mini.uses_guidance(SamplingSettings(cfg=0.5)) and not mini.uses_guidance(SamplingSettings(cfg=0.0))


def _reference_filter(logits_V, top_k, top_p):
    """The rule in plain Python, one row at a time."""
    vals = logits_V.tolist()
    keep = [True] * len(vals)
    if top_k > 0:
        kth = sorted(vals, reverse=True)[top_k - 1]
        keep = [v >= kth for v in vals]
    if 0 < top_p < 1:
        live = [v if k else float("-inf") for v, k in zip(vals, keep)]
        probs = torch.tensor(live).softmax(0).tolist()
        order = sorted(range(len(vals)), key=lambda i: live[i])
        cum = 0.0
        for rank, i in enumerate(order):
            cum += probs[i]
            if cum <= 1 - top_p + 1e-7 and rank != len(order) - 1:
                keep[i] = False
    return keep


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (7, 0.9), (3, 0.05), (20, 0.5)])
def test_filter_logits_follows_vars_top_k_top_p(top_k, top_p):
    logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(top_k))
    out = filter_logits(logits, SamplingSettings(top_k=top_k, top_p=top_p))
    for row in range(6):
        keep = torch.tensor(_reference_filter(logits[row], top_k, top_p))
        assert torch.equal(torch.isfinite(out[row]), keep), (row, keep)
        assert torch.equal(out[row][keep], logits[row][keep])
        assert torch.isfinite(out[row, logits[row].argmax()])  # the arg-max always survives


def test_filter_logits_temperature_and_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    out = filter_logits(logits, SamplingSettings(top_k=2, temperature=2.0))
    # both tied values at the k-th place are kept, and the logits are divided by the temperature
    assert out[0].tolist() == [float("-inf"), 1.5, 1.5, float("-inf"), float("-inf")]
    assert torch.equal(logits, torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]]))  # out of place
    # probabilities 1/8, 1/8, 2/8, 4/8 are exact in fp32: the ascending cumulative sum 0.25 equals
    # 1 − top_p, and VAR removes it too ("<=")
    dyadic = torch.tensor([[1.0, 2.0, 1.0, 4.0]]).log()
    kept = torch.isfinite(filter_logits(dyadic, SamplingSettings(top_p=0.75)))
    assert kept.tolist() == [[False, True, False, True]]
    # a vanishing top_p (1 − top_p rounds to 1 in fp32) still keeps the arg-max, and only it
    kept = torch.isfinite(filter_logits(dyadic, SamplingSettings(top_p=1e-9)))
    assert kept.tolist() == [[False, False, False, True]]


def test_sampler_draws_from_sampling_probs(mini):
    """Continue from a fixed scale-0 token: the scale-1 tokens follow the guided, filtered p_i."""
    n = 3000
    settings = SamplingSettings(cfg=1.5, top_k=10, top_p=0.9)
    prefix = torch.zeros(n, 21, dtype=torch.long)
    prefix[:, 0] = 11
    labels = torch.full((n,), 4)
    tokens = mini.sample(labels, settings, prefix_BN=prefix, start_step=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = mini.sampling_probs(prefix[:1], labels[:1], settings)[0, 1]
    freq = torch.bincount(tokens[:, 1], minlength=64).float() / n
    assert (freq[probs == 0] == 0).all()
    assert 0.5 * (freq - probs).abs().sum() < 0.05


def test_sampler_uses_the_generator_and_labels(mini):
    s = SamplingSettings(cfg=1.5)
    a = mini.sample(torch.tensor([1, 2]), s, generator=torch.Generator().manual_seed(0))
    b = mini.sample(torch.tensor([1, 2]), s, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError):
        mini.sample(torch.tensor([1]), s, start_step=1)


def test_backbone_is_a_headless_copy_with_the_teacher_input_chain(mini):
    backbone = mini.new_backbone()
    assert isinstance(backbone, VarBackbone) and backbone.feature_dim == 128
    names = dict(backbone.named_parameters())
    assert not any(n.startswith(("body.head", "body.head_nm")) for n in names)
    assert "body.blocks.0.ada_lin.1.weight" in names
    tokens = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 10])
    with torch.no_grad():
        f = backbone(mini.as_latents(tokens), labels)
        h, cond = mini.var.features(labels, mini.vae.quantize.var_input(
            split_scales(mini.as_latents(tokens), (1, 2, 4))))
        assert torch.allclose(f, h, atol=1e-6)
        # the teacher's own head on the backbone features gives the teacher's logits
        assert torch.allclose(mini.var.get_logits(f, cond), mini.logits(tokens, labels), atol=1e-5)
    # training the copy leaves the teacher alone; φ is copied as buffers, not trained
    before = mini.var.blocks[0].attn.proj.weight.clone()
    backbone(torch.randn(2, 21, 8), labels).sum().backward()
    assert torch.equal(mini.var.blocks[0].attn.proj.weight, before)
    assert "phi.weight_KCC33" in dict(backbone.named_buffers())


def test_decode_encode_shapes_and_range(mini):
    tokens = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(3))
    img = mini.decode(tokens)
    assert img.shape == (2, 3, 16, 16) and 0 <= img.min() and img.max() <= 1
    ids = mini.encode(img)
    assert ids.shape == (2, 21) and ids.dtype == torch.long
    with pytest.raises(DD2Error, match=r"\(B, 3, 16, 16\)"):
        mini.encode(torch.rand(1, 3, 32, 32))


def test_teacher_stays_frozen_and_in_eval(mini):
    mini.train()
    assert not mini.training and not mini.var.training
    assert not any(p.requires_grad for p in mini.parameters())


def test_d16_shapes_on_the_meta_device():
    """Real-size spec, logits and backbone shapes without allocating the 310M weights."""
    with torch.device("meta"):
        teacher = VarTeacher(VAR(var_config(16)), VQVAE(vae_config()), variant_name="var-d16")
        tokens = torch.zeros(2, 680, dtype=torch.long)
        logits = teacher.logits(tokens, torch.tensor([1, 1000]))
        backbone = teacher.new_backbone()
        feats = backbone(torch.zeros(2, 680, 32), torch.tensor([1, 1000]))
    spec = teacher.spec
    assert spec.num_tokens == 680 and spec.vocab_size == 4096 and spec.latent_dim == 32
    assert spec.image_size == 256 and spec.num_steps == 10 and spec.null_class == 1000
    assert [spec.steps.index(s) for s in range(10)] == [0, 1, 5, 14, 30, 55, 91, 155, 255, 424]
    assert logits.shape == (2, 680, 4096) and logits.dtype == torch.float32
    assert feats.shape == (2, 680, 1024) and backbone.feature_dim == 1024
    assert teacher.codebook().shape == (4096, 32)
