"""LlamaGenTeacher: the dd2 teacher contract, guidance/filtering as upstream, sampler, adapter, backbone."""

import pytest
import torch
import torch.nn.functional as F

from dd2_llamagen import digits_variant
from dd2_llamagen import teacher as teacher_module
from dd2_llamagen.gpt import GPTConfig, LlamaGenGPT
from dd2_llamagen.teacher import ContinuousInputAdapter, LlamaGenBackbone, LlamaGenTeacher, cached_input_adapter, fit_input_adapter
from dd2_llamagen.vq import VQConfig, VQModel
from dd2cli import DD2Error, SamplingSettings, check_teacher


def _mini_teacher(seed=0, vocab=64, **kw):
    torch.manual_seed(seed)
    gpt = LlamaGenGPT(GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=vocab, block_size=16, num_classes=10))
    vq = VQModel(VQConfig(codebook_size=vocab, ch=32, ch_mult=(1, 1, 2), z_channels=32, num_res_blocks=1))
    return LlamaGenTeacher(gpt, vq, variant_name="llamagen-mini", **kw)


@pytest.fixture(scope="module")
def mini():
    return _mini_teacher()


@pytest.fixture(scope="module")
def digits():
    return digits_variant().load()


# ---- contract suite ------------------------------------------------------------------------------

def test_contract_on_random_miniature(mini):
    check_teacher(mini)


def test_contract_on_bundled_digits(digits):
    check_teacher(digits)


def test_contract_on_continuous_input_teacher(mini):
    adapted = mini.with_continuous_input(mini.fitted_adapter())
    assert adapted.input_adapter is not None and mini.input_adapter is None
    check_teacher(adapted, check_backbone=False)
    # it reads latents through the adapter: no snapping, so off-codebook inputs change its logits
    ids, labels = torch.randint(0, 64, (2, 16)), torch.tensor([1, 2])
    z = mini.as_latents(ids)
    with torch.no_grad():
        assert not torch.allclose(adapted.logits(z + 0.05, labels), adapted.logits(z, labels), atol=1e-4)
        assert torch.allclose(mini.logits(z + 1e-3, labels), mini.logits(ids, labels))


# ---- spec ------------------------------------------------------------------------------------------

def test_spec_of_a_paper_size_teacher_on_meta():
    with torch.device("meta"):
        t = LlamaGenTeacher(LlamaGenGPT(GPTConfig.named("B")), VQModel(VQConfig()), variant_name="llamagen-b",
                            image_size=256)
        logits = t.logits(torch.zeros(2, 256, dtype=torch.long), torch.tensor([3, 1000]))
        f = LlamaGenBackbone(t.gpt, ContinuousInputAdapter(8, 768, 4096))(torch.randn(2, 256, 8), torch.tensor([3, 4]))
    spec = t.spec
    assert (spec.num_tokens, spec.vocab_size, spec.latent_dim, spec.num_classes, spec.null_class) == (
        256, 16384, 8, 1000, 1000)
    assert spec.steps == tuple(range(256)) and spec.num_steps == 256 and t.input_adapter is None
    assert spec.stage1 == SamplingSettings(cfg=2.0, top_k=8000, top_p=1.0)
    assert spec.target == SamplingSettings(cfg=2.0, top_k=900, top_p=1.0)
    assert spec.evaluation == SamplingSettings(cfg=2.0, top_k=8000, top_p=1.0)
    assert logits.shape == (2, 256, 16384) and logits.dtype == torch.float32
    assert f.shape == (2, 256, 768)


def test_digits_spec_and_normalised_codebook(digits):
    spec = digits.spec
    assert (spec.num_tokens, spec.image_size, spec.latent_dim, spec.num_classes, spec.null_class) == (16, 16, 8, 10, 10)
    V = spec.vocab_size
    assert spec.stage1.top_k == round(8000 * V / 16384) and spec.target.top_k == round(900 * V / 16384)
    assert spec.stage1.cfg == spec.target.cfg == spec.evaluation.cfg == 2.0
    cb = digits.codebook()
    assert torch.allclose(cb, F.normalize(digits.vq.quantize.embedding.weight, dim=-1))
    assert torch.allclose(cb.norm(dim=-1), torch.ones(V), atol=1e-5)
    ident = digits.identity()
    assert ident["teacher"] == "llamagen-digits" and len(ident["weights"]["gpt"]) == 64


# ---- guidance and filtering --------------------------------------------------------------------------

def _hf_reference(logits, top_k, top_p):
    """Row-by-row reference of HF top_k_top_p_filtering (written with Python lists)."""
    out = logits.clone()
    for r in range(logits.shape[0]):
        row = logits[r].tolist()
        if top_k > 0:
            kth = sorted(row, reverse=True)[min(top_k, len(row)) - 1]
            row = [v if v >= kth else float("-inf") for v in row]
        if top_p < 1.0:
            order = sorted(range(len(row)), key=lambda i: -row[i])
            probs = torch.tensor([row[i] for i in order]).softmax(0).tolist()
            cum, removed = 0.0, set()
            for rank, i in enumerate(order):
                if rank > 0 and cum > top_p:
                    removed.add(i)
                cum += probs[rank]
            row = [float("-inf") if i in removed else v for i, v in enumerate(row)]
        out[r] = torch.tensor(row)
    return out


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (5, 1.0, 1.0), (0, 0.8, 1.0), (7, 0.6, 0.7),
                                                     (100, 0.95, 1.3), (0, 0.0, 1.0)])
def test_filter_logits_matches_hf_semantics(mini, top_k, top_p, temperature):
    g = torch.Generator().manual_seed(top_k + int(top_p * 10))
    logits = torch.randn(6, 64, generator=g) * 2
    settings = SamplingSettings(top_k=top_k, top_p=top_p, temperature=temperature)
    got = mini.filter_logits(logits[None], settings)[0]
    ref = _hf_reference(logits / temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert torch.allclose(got[kept], ref[kept])
    assert (kept.sum(-1) >= 1).all()  # top-p always keeps the most likely token


def test_top_k_keeps_ties_and_temperature_floor(mini):
    logits = torch.tensor([[[3.0, 1.0, 1.0, 0.5, -2.0]]])
    out = mini.filter_logits(logits, SamplingSettings(top_k=2))
    assert torch.isinf(out).tolist() == [[[False, False, False, True, True]]]  # the tie with the 2nd is kept
    cold = mini.filter_logits(logits, SamplingSettings(temperature=0.0))
    assert torch.allclose(cold, logits / 1e-5)


def test_guide_formula_and_cfg_interval(mini):
    c, u = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    assert torch.allclose(mini.guide(c, u, SamplingSettings(cfg=2.5)), u + 2.5 * (c - u))
    out = mini.guide(c, u, SamplingSettings(cfg=2.5, cfg_interval=3))
    assert torch.allclose(out[:, :5], (u + 2.5 * (c - u))[:, :5])  # positions 0..cfg_interval+1 guided
    assert torch.equal(out[:, 5:], c[:, 5:])
    assert mini.uses_guidance(SamplingSettings(cfg=2.0)) and not mini.uses_guidance(SamplingSettings(cfg=1.0))


@pytest.mark.parametrize("cfg_interval", [-1, 4])
def test_greedy_cfg_sampling_follows_teacher_forced_guided_logits(mini, cfg_interval):
    """The sampler's per-step distribution is filter(guide(cond, null)) of the teacher-forced logits."""
    labels = torch.tensor([2, 9, 0])
    settings = SamplingSettings(cfg=3.0, top_k=1, cfg_interval=cfg_interval)
    tokens = mini.sample(labels, settings, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        guided = mini.guide(mini.logits(tokens, labels), mini.logits(tokens, torch.full_like(labels, 10)), settings)
    assert torch.equal(tokens, guided.argmax(-1))


def test_sampler_continues_from_prefix_and_checks_arguments(mini):
    labels = torch.tensor([1, 5])
    s = SamplingSettings(cfg=2.0, top_k=10)
    full = mini.sample(labels, s, generator=torch.Generator().manual_seed(1))
    for start in (1, 8, 16):
        cont, logits = mini.sample(labels, s, prefix_BN=full, start_step=start,
                                   generator=torch.Generator().manual_seed(2), return_logits=True)
        assert torch.equal(cont[:, :start], full[:, :start])
        with torch.no_grad():
            assert torch.allclose(logits, mini.logits(cont, labels), atol=1e-4)
    with pytest.raises(DD2Error, match="start_step"):
        mini.sample(labels, s, prefix_BN=full, start_step=17)
    with pytest.raises(DD2Error, match="prefix"):
        mini.sample(labels, s, start_step=3)


def test_sampler_distribution_matches_teacher_probabilities(mini):
    """First-token frequencies of many samples follow sampling_probs at position 0."""
    n = 4000
    labels = torch.full((n,), 4)
    s = SamplingSettings(cfg=2.0, top_k=8)
    tokens = mini.sample(labels, s, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        p0 = mini.sampling_probs(tokens[:1], labels[:1], s)[0, 0]
    freq = torch.bincount(tokens[:, 0], minlength=64).float() / n
    assert (freq[p0 == 0] == 0).all()
    assert 0.5 * (freq - p0).abs().sum() < 0.05


# ---- continuous input adapter and backbone ---------------------------------------------------------

def test_adapter_fit_is_accurate_cached_and_deterministic(digits):
    adapter = digits.fitted_adapter()
    assert digits.fitted_adapter() is adapter  # fitted once per teacher
    err = digits.adapter_fit_error
    cb, emb = digits.codebook(), digits.gpt.tok_embeddings.weight
    assert err < 1e-4
    assert abs(err - ((adapter(cb) - emb).norm() / emb.norm()).item()) < 1e-6
    again, err2 = fit_input_adapter(cb, emb)
    assert torch.equal(again.fc2.weight, adapter.fc2.weight) and err2 == err
    assert not any(p.requires_grad for p in adapter.parameters())


def test_a_fitted_adapter_is_read_back_from_the_cache_folder_by_any_later_process(tmp_path, monkeypatch):
    monkeypatch.setenv("DD2_CACHE_DIR", str(tmp_path))
    g = torch.Generator().manual_seed(1)
    cb, emb = torch.randn(96, 4, generator=g), torch.randn(96, 24, generator=g)
    first = cached_input_adapter(cb, emb, steps=20)
    entries = list((tmp_path / "llamagen").glob("input-adapter-*.safetensors"))
    assert len(entries) == 1

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again although the cache holds this fit")

    monkeypatch.setattr(teacher_module, "fit_input_adapter", no_fit)
    again = cached_input_adapter(cb, emb, steps=20)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert (again.beta, again.fit_error) == (first.beta, first.fit_error) and not again.fc1.weight.requires_grad
    # other embeddings, another beta or step count are another key: fitted, not read back
    for args in ((cb, emb + 1e-3, None, 20), (cb, emb, 64.0, 20), (cb, emb, None, 21)):
        with pytest.raises(AssertionError, match="fitted again"):
            cached_input_adapter(*args)
    monkeypatch.undo()
    # a damaged entry is fitted again and replaced
    monkeypatch.setenv("DD2_CACHE_DIR", str(tmp_path))
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    fixed = cached_input_adapter(cb, emb, steps=20)
    assert torch.equal(fixed.fc2.weight, first.fc2.weight) and entries[0].stat().st_size > 100


def test_adapter_fit_refines_a_blunt_lookup_and_is_robust_near_the_codebook():
    g = torch.Generator().manual_seed(0)
    cb = F.normalize(torch.randn(512, 8, generator=g), dim=-1)
    emb = torch.randn(512, 32, generator=g)
    _, blunt = fit_input_adapter(cb, emb, beta=4.0, steps=0)
    _, refined = fit_input_adapter(cb, emb, beta=16.0, steps=100)
    adapter, err = fit_input_adapter(cb, emb)
    assert refined < 1e-3 and err < 1e-4 < 0.5 < blunt
    assert adapter.beta >= 16 and adapter.fc1.weight.shape == (512, 8)
    # a small perturbation of a codebook vector still reads (almost) that token's embedding
    z = cb + 0.02 * torch.randn(cb.shape, generator=g)
    assert ((adapter(z) - emb).norm() / emb.norm()).item() < 0.05


def test_backbone_reproduces_teacher_features_on_codebook_inputs(digits):
    backbone = digits.new_backbone()
    assert backbone.feature_dim == digits.gpt.cfg.dim
    assert not hasattr(backbone.trunk, "output") and not hasattr(backbone.trunk, "tok_embeddings")
    ids = torch.randint(0, digits.spec.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 5, 10])
    backbone.eval()
    with torch.no_grad():
        f = backbone(digits.as_latents(ids), labels)
        ref = digits.gpt.run(digits._input_sequence(ids[:, :-1], labels), 0)
        assert ((f - ref).norm() / ref.norm()).item() < 0.05
        # reading the trunk's head gives back the teacher's logits (up to the fit error)
        probs_bb = digits.gpt.head(f).softmax(-1)
        probs_t = digits.logits(ids, labels).softmax(-1)
    assert 0.5 * (probs_bb - probs_t).abs().sum(-1).mean() < 0.05
    # a copy: training it leaves the teacher untouched
    before = digits.gpt.layers[0].attention.wqkv.weight.clone()
    with torch.no_grad():
        backbone.trunk.layers[0].attention.wqkv.weight.add_(1.0)
    assert torch.equal(digits.gpt.layers[0].attention.wqkv.weight, before)


# ---- images ----------------------------------------------------------------------------------------

def test_decode_encode_round_trip_on_digits(digits):
    from dd2cli import load_digits_dataset

    images, _ = load_digits_dataset(16, "heldout")
    ids = digits.encode(images[:32])
    assert ids.shape == (32, 16) and ids.dtype == torch.long
    rec = digits.decode(ids)
    assert rec.shape == (32, 3, 16, 16) and 0 <= rec.min() and rec.max() <= 1
    assert (rec - images[:32]).abs().mean() < 0.1
    assert (digits.encode(rec) == ids).float().mean() > 0.7
    with pytest.raises(DD2Error, match="resize"):
        digits.encode(torch.rand(1, 3, 32, 32))


def test_digits_samples_show_the_requested_class(digits):
    from dd2cli import load_digits_classifier  # (ships with dd2)

    labels = torch.arange(10).repeat_interleave(8)
    tokens = digits.sample(labels, digits.spec.evaluation, generator=torch.Generator().manual_seed(0))
    acc = (load_digits_classifier().predict(digits.decode(tokens)) == labels).float().mean().item()
    assert acc > 0.8, acc
