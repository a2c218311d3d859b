"""Data-free continuous input adaptation (dd2_llamagen.adapt)."""

import pytest
import torch

from dd2_llamagen.adapt import adapt_teacher, agreement
from dd2_llamagen.gpt import GPTConfig, LlamaGenGPT
from dd2_llamagen.teacher import LlamaGenTeacher
from dd2_llamagen.vq import VQConfig, VQModel
from dd2cli import DD2Error, SamplingSettings, check_sampler


def _underfitted_teacher():
    """A random miniature whose adapter has too few features to fit tok_embeddings (large KL)."""
    torch.manual_seed(0)
    gpt = LlamaGenGPT(GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10))
    with torch.no_grad():
        gpt.tok_embeddings.weight.mul_(3.0)  # make the token input matter
    vq = VQModel(VQConfig(codebook_size=64, ch=32, ch_mult=(1, 1, 2), z_channels=32, num_res_blocks=1))
    return LlamaGenTeacher(gpt, vq, variant_name="llamagen-mini", adapter_beta=2.0, adapter_fit_steps=0)


def test_adaptation_reduces_kl_and_gives_a_continuous_teacher():
    teacher = _underfitted_teacher()
    assert teacher.adapter_fit_error > 0.3
    seen = []
    report = adapt_teacher(teacher, steps=60, batch_size=16, lr=1e-2, settings=SamplingSettings(cfg=2.0, top_k=16),
                           generator=torch.Generator().manual_seed(0), progress=lambda i, n, m: seen.append((i, n)),
                           eval_size=32)
    assert seen[-1] == (60, 60) and len(report.losses) == 60
    assert report.after["kl"] < 0.8 * report.before["kl"]
    assert report.after["total_variation"] < report.before["total_variation"]
    assert report.after["kl_noisy"] < report.before["kl_noisy"]
    adapted = report.teacher
    assert adapted.input_adapter is not None and teacher.input_adapter is None
    assert not any(p.requires_grad for p in adapted.parameters())
    assert adapted.identity()["continuous_input"] is True
    # the adapted teacher is a complete teacher: its sampler agrees with its teacher-forced logits
    check_sampler(adapted)
    # the original teacher is untouched
    assert teacher.input_adapter is None


def test_agreement_is_perfect_for_the_teacher_itself():
    teacher = _underfitted_teacher()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])

    class Exact(torch.nn.Module):  # maps codebook vectors back to the exact embedding rows
        def forward(self, z):
            return teacher.gpt.tok_embeddings(teacher.as_tokens(z))

    same = teacher.with_continuous_input(Exact())
    m = agreement(teacher, same, ids, labels)
    assert m["kl"] < 1e-6 and m["argmax_agreement"] == 1.0 and m["total_variation"] < 1e-5
    m_bad = agreement(teacher, teacher.with_continuous_input(teacher.fitted_adapter()), ids, labels)
    assert m_bad["kl"] > 1e-3


def test_adapting_the_whole_model_updates_a_copy():
    teacher = _underfitted_teacher()
    before = teacher.gpt.layers[0].attention.wqkv.weight.clone()
    report = adapt_teacher(teacher, steps=10, batch_size=8, lr=3e-3, train_model=True, eval_size=8,
                           generator=torch.Generator().manual_seed(0))
    assert report.kept == "adapted"
    assert torch.equal(teacher.gpt.layers[0].attention.wqkv.weight, before)
    assert not torch.equal(report.teacher.gpt.layers[0].attention.wqkv.weight, before)
    assert "adapted_gpt" in report.teacher.identity()["weights"]


def test_a_worse_adaptation_keeps_the_fitted_adapter():
    teacher = _underfitted_teacher()
    report = adapt_teacher(teacher, steps=5, batch_size=8, lr=30.0, eval_size=8, noise_std=0.0,
                           generator=torch.Generator().manual_seed(0))
    assert report.after["kl"] > report.before["kl"] and report.kept == "fitted"
    fitted = teacher.fitted_adapter()
    assert torch.equal(report.teacher.input_adapter.fc2.weight, fitted.fc2.weight)


def test_bad_arguments_are_user_errors():
    teacher = _underfitted_teacher()
    with pytest.raises(DD2Error, match="steps"):
        adapt_teacher(teacher, steps=-1)
    adapted = teacher.with_continuous_input(teacher.fitted_adapter())
    with pytest.raises(DD2Error, match="already reads continuous"):
        adapt_teacher(adapted, steps=1)
