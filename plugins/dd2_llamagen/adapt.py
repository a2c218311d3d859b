"""Data-free continuous input adaptation of a LlamaGen teacher (DD2 paper, docs/method.md §3).

LlamaGen reads token ids through `tok_embeddings`; DD2 needs a teacher that reads continuous
latents. `adapt_teacher` starts from the fitted input adapter (`adapter(c_j) ≈ tok_embeddings[j]`)
and fine-tunes it (optionally the whole GPT too) so that the ADAPTED teacher, reading normalised
codebook vectors (plus a little noise) through the adapter, predicts the same next-token
distributions as the ORIGINAL teacher reading ids:

    minimise  KL( p_original(· | class, ids_<i) ‖ p_adapted(· | class, c_{ids_<i} + noise) )

averaged over positions, on token sequences sampled from the original teacher itself (no data)
with class labels replaced by the null class at rate `null_fraction` (CFG needs both).

    report = adapt_teacher(teacher, steps=300, batch_size=32, lr=1e-4)
    student = report.teacher            # logits(latents) use the adapter
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from dd2cli import DD2Error, SamplingSettings, Teacher

#: `progress(done, total, metrics)` called after every optimisation step
Progress = Callable[[int, int, dict], None]


@dataclass
class AdaptReport:
    """Outcome of `adapt_teacher`. `before`/`after` hold `kl`, `argmax_agreement`, `total_variation`
    of next-token distributions (adapted vs original) on a fixed held-out set of teacher samples,
    reading the exact codebook vectors, and the same with `_noisy` suffixes for codebook vectors
    plus `noise_std` Gaussian noise (when `noise_std > 0`)."""

    teacher: Teacher
    steps: int
    fit_error: float
    before: dict[str, float]
    after: dict[str, float]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    #: "adapted", or "fitted" when fine-tuning did not improve the measured KL and `teacher`
    #: therefore reads through the fitted adapter (and the original GPT) instead
    kept: str = "adapted"

    def as_dict(self) -> dict:
        return {"steps": self.steps, "fit_error": self.fit_error, "before": self.before, "after": self.after,
                "kept": self.kept, "final_loss": self.losses[-1] if self.losses else None,
                "seconds": round(self.seconds, 2)}


@torch.no_grad()
def sample_sequences(teacher: Teacher, count: int, settings: SamplingSettings,
                     generator: torch.Generator | None, batch: int = 256) -> tuple[Tensor, Tensor]:
    """`count` teacher samples `(ids (count, n), uniformly drawn class labels (count,))`."""
    dev = teacher.device
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    labels = torch.randint(0, teacher.spec.num_classes, (count,), generator=generator, device=gen_dev).to(dev)
    ids = torch.cat([teacher.sample(labels[s : s + batch], settings, generator=generator)
                     for s in range(0, count, batch)])
    return ids, labels


def _with_null(labels_B: Tensor, null_class: int, fraction: float, generator) -> Tensor:
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    drop = (torch.rand(labels_B.shape[0], generator=generator, device=gen_dev) < fraction).to(labels_B.device)
    return torch.where(drop, torch.full_like(labels_B, null_class), labels_B)


def _log_probs(t: Teacher, x_BN: Tensor, labels_B: Tensor) -> Tensor:
    return torch.log_softmax(t.logits(x_BN, labels_B), dim=-1)


@torch.no_grad()
def agreement(original: Teacher, adapted: Teacher, ids_BN: Tensor, labels_B: Tensor,
              noise_BNd: Tensor | None = None, chunk: int = 64) -> dict[str, float]:
    """Next-token agreement of `adapted` (reading codebook vectors) with `original` (reading ids).

    Evaluated for the given labels AND the null class (both enter CFG). `noise_BNd` (optional) is
    added to the codebook vectors the adapted teacher reads. Returns the mean per-position `kl` =
    KL(original ‖ adapted) in nats, `argmax_agreement` (fraction of positions whose most likely
    token is the same) and `total_variation` = ½ Σ|p − q|.
    """
    null_B = torch.full_like(labels_B, original.spec.null_class)
    ids_2B, labels_2B = torch.cat([ids_BN, ids_BN]), torch.cat([labels_B, null_B])
    z_2B = adapted.as_latents(ids_2B)
    if noise_BNd is not None:
        z_2B = z_2B + torch.cat([noise_BNd, noise_BNd])
    kl = agree = tv = 0.0
    count = 0
    for s in range(0, len(ids_2B), chunk):
        ids, lab = ids_2B[s : s + chunk], labels_2B[s : s + chunk]
        logp = _log_probs(original, ids, lab)
        logq = _log_probs(adapted, z_2B[s : s + chunk], lab)
        p = logp.exp()
        kl += (p * (logp - logq)).sum(-1).sum().item()
        agree += (logp.argmax(-1) == logq.argmax(-1)).float().sum().item()
        tv += 0.5 * (p - logq.exp()).abs().sum(-1).sum().item()
        count += ids.shape[0] * ids.shape[1]
    return {"kl": kl / count, "argmax_agreement": agree / count, "total_variation": tv / count}


def _measure(original, adapted, ids, labels, noise) -> dict[str, float]:
    out = agreement(original, adapted, ids, labels)
    if noise is not None:
        out.update({f"{k}_noisy": v for k, v in agreement(original, adapted, ids, labels, noise).items()})
    return out


def adapt_teacher(teacher: Teacher, steps: int = 300, batch_size: int = 32, lr: float = 1e-4,
                  settings: SamplingSettings | None = None, generator: torch.Generator | None = None,
                  progress: Progress | None = None, *, train_model: bool = False, noise_std: float = 0.05,
                  null_fraction: float = 0.1, pool_size: int | None = None, eval_size: int = 128,
                  weight_decay: float = 0.0) -> AdaptReport:
    """Fine-tune the continuous input adapter (and the GPT if `train_model`) to match `teacher`.

    `settings`: how the training/evaluation sequences are sampled from the original teacher
    (default: `teacher.spec.stage1`, the paper's data setting). `pool_size` sequences (default
    `min(steps·batch_size, 4096)`) are sampled once and batches drawn from them; `eval_size`
    further sequences measure KL/agreement before and after. Returns an `AdaptReport` whose
    `teacher` reads continuous latents through the adapter; `teacher` itself is unchanged.
    If fine-tuning made the measured KL worse (the objective it trains: with noise when
    `noise_std > 0`), the report keeps the fitted adapter instead (`report.kept == "fitted"`).
    """
    if teacher.input_adapter is not None:
        raise DD2Error("This teacher already reads continuous latents; adapt the original (id-reading) teacher.")
    if steps < 0 or batch_size < 1 or lr <= 0:
        raise DD2Error(f"Adaptation needs steps >= 0, batch_size >= 1 and lr > 0 (got {steps}, {batch_size}, {lr}).")
    t0 = time.time()
    settings = settings or teacher.spec.stage1
    generator = generator if generator is not None else torch.Generator().manual_seed(0)

    # 1. the starting point: the adapter fitted to tok_embeddings; trainable copies
    fitted = teacher.fitted_adapter()
    adapter = copy.deepcopy(fitted)
    gpt = copy.deepcopy(teacher.gpt) if train_model else None
    adapted = teacher.with_continuous_input(adapter, gpt=gpt)
    params = list(adapter.parameters()) + (list(gpt.parameters()) if gpt is not None else [])
    for p in params:
        p.requires_grad_(True)

    # 2. data-free sequences: a fixed evaluation set and a training pool, both from the teacher
    eval_ids, eval_labels = sample_sequences(teacher, eval_size, settings, generator)
    eval_noise = None
    if noise_std > 0:  # the same perturbation before and after, to measure robustness too
        eval_noise = noise_std * torch.randn((*eval_ids.shape, teacher.spec.latent_dim), generator=generator,
                                             device=generator.device).to(eval_ids.device)
    before = _measure(teacher, adapted, eval_ids, eval_labels, eval_noise)
    pool = pool_size or min(max(steps * batch_size, batch_size), 4096)
    pool_ids, pool_labels = sample_sequences(teacher, pool, settings, generator)

    # 3. KL(original ‖ adapted) on teacher-forced next-token distributions
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    codebook_Vd = teacher.codebook()
    gen_dev = generator.device
    losses: list[float] = []
    adapter.train()
    for step in range(steps):
        idx = torch.randint(0, pool, (batch_size,), generator=generator, device=gen_dev).to(pool_ids.device)
        ids_BN = pool_ids[idx]
        labels_B = _with_null(pool_labels[idx], teacher.spec.null_class, null_fraction, generator)
        with torch.no_grad():
            logp_BNV = _log_probs(teacher, ids_BN, labels_B)
        z_BNd = codebook_Vd[ids_BN]
        if noise_std > 0:
            # robustness: the adapted teacher will read generated latents near, not on, the codebook
            noise = torch.randn(z_BNd.shape, generator=generator, device=gen_dev).to(z_BNd.device)
            z_BNd = z_BNd + noise_std * noise
        logq_BNV = _log_probs(adapted, z_BNd, labels_B)
        loss = (logp_BNV.exp() * (logp_BNV - logq_BNV)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, {"kl": losses[-1]})

    # 4. freeze and measure on the held-out teacher samples
    for p in params:
        p.requires_grad_(False)
    adapter.eval()
    adapted = teacher.with_continuous_input(adapter, gpt=gpt)  # refresh the identity fingerprints
    after = _measure(teacher, adapted, eval_ids, eval_labels, eval_noise)
    key = "kl_noisy" if eval_noise is not None else "kl"
    kept = "adapted"
    if after[key] > before[key]:
        adapted, kept = teacher.with_continuous_input(copy.deepcopy(fitted)), "fitted"
    return AdaptReport(teacher=adapted, steps=steps, fit_error=teacher.adapter_fit_error, before=before,
                       after=after, losses=losses, seconds=time.time() - t0, kept=kept)
