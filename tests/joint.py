"""Joint-distribution measurements on the synthetic teacher (Proposition 1 of the paper).

Total variation between an empirical joint over token ids (from samples) and the teacher's exact
joint, averaged over classes, for: the set-prediction baseline, the generator right after
initialisation, the AR-diffusion model (Euler sampler), the trained generator, and the teacher's own
samples (the sampling-noise floor).
"""

from __future__ import annotations

from pathlib import Path

import torch
from synthetic import SyntheticTeacher

from dd2cli.engine.checkpoint import final_stage1_checkpoint
from dd2cli.networks import Generator


def _flat(tokens_BN: torch.Tensor, V: int) -> torch.Tensor:
    idx = torch.zeros(tokens_BN.shape[0], dtype=torch.long)
    for i in range(tokens_BN.shape[1]):
        idx = idx * V + tokens_BN[:, i].cpu()
    return idx


def tv_from_tokens(tokens_BN: torch.Tensor, exact: torch.Tensor) -> float:
    V = exact.shape[0]
    emp = torch.bincount(_flat(tokens_BN, V), minlength=exact.numel()).double() / tokens_BN.shape[0]
    return 0.5 * (emp - exact.flatten().double()).abs().sum().item()


def _per_class(teacher: SyntheticTeacher, n: int, seed: int, draw) -> float:
    g = torch.Generator().manual_seed(seed)
    tvs = []
    for c in range(teacher.spec.num_classes):
        labels = torch.full((n,), c)
        tokens = draw(labels, g)
        tvs.append(tv_from_tokens(tokens, teacher.exact_joint(c, teacher.spec.target)))
    return sum(tvs) / len(tvs)


@torch.no_grad()
def tv_generator(gen: Generator, teacher: SyntheticTeacher, n: int = 20000, seed: int = 1) -> float:
    def draw(labels, g):
        eps = torch.randn(len(labels), teacher.spec.num_tokens, teacher.spec.latent_dim, generator=g)
        return teacher.as_tokens(gen(eps, labels))
    return _per_class(teacher, n, seed, draw)


@torch.no_grad()
def tv_teacher_samples(teacher: SyntheticTeacher, n: int = 20000, seed: int = 2) -> float:
    return _per_class(teacher, n, seed, lambda labels, g: teacher.sample(labels, teacher.spec.target, generator=g))


@torch.no_grad()
def tv_set_prediction(teacher: SyntheticTeacher, n: int = 20000, seed: int = 3) -> float:
    """Every position drawn independently from its marginal, estimated from n teacher samples."""
    V, N = teacher.spec.vocab_size, teacher.spec.num_tokens

    def draw(labels, g):
        ref = teacher.sample(labels, teacher.spec.target, generator=g)
        out = torch.empty_like(ref)
        for i in range(N):
            marg = torch.bincount(ref[:, i], minlength=V).double()
            out[:, i] = torch.multinomial(marg / marg.sum(), len(labels), replacement=True, generator=g)
        return out
    return _per_class(teacher, n, seed, draw)


@torch.no_grad()
def tv_ar_diffusion(model, teacher: SyntheticTeacher, n: int = 20000, seed: int = 4, euler_steps: int = 10) -> float:
    steps = teacher.steps_tensor()

    def draw(labels, g):
        z = model.sample(labels, steps, teacher.codebook(), euler_steps=euler_steps, generator=g)
        return teacher.as_tokens(z)
    return _per_class(teacher, n, seed, draw)


def stage1_model(run_dir: Path, new_model):
    """The tuned AR-diffusion model ψ₀ of a run (its final stage-1 checkpoint)."""
    model = new_model()
    final_stage1_checkpoint(run_dir).load_module("model", model)
    return model.eval()


def report(run_dir: Path, n: int = 20000) -> dict[str, float]:
    """All TVs side by side for a finished run on a synthetic teacher."""
    import copy

    from dd2cli.engine.distill import _Run
    from dd2cli.engine.distributed import DistInfo
    from dd2cli.engine.progress import Progress
    from dd2cli.engine.runs import load_generator_from_run

    ema, teacher, info = load_generator_from_run(run_dir, which="ema")
    raw, _, _ = load_generator_from_run(run_dir, which="raw")
    from dd2cli.config import from_dict
    from dd2cli.settings import DistillSettings

    r = _Run(Path(run_dir), from_dict(DistillSettings, info["settings"]), teacher, info["teacher"], DistInfo(), "cpu",
             Progress())
    psi0 = stage1_model(run_dir, r.new_model)
    init = Generator(copy.deepcopy(psi0)).eval()
    out = {
        "noise floor (teacher samples)": tv_teacher_samples(teacher, n),
        "set-prediction baseline": tv_set_prediction(teacher, n),
        "generator at initialisation": tv_generator(init, teacher, n),
        "AR-diffusion, 10 Euler steps/token": tv_ar_diffusion(psi0, teacher, n),
    }
    final1 = final_stage1_checkpoint(run_dir)
    if final1.has_module("generator"):  # stage 1 ended with the flow-map regression (flow_init.steps > 0)
        flow_gen = Generator(r.new_model()).eval()
        final1.load_module("generator", flow_gen)
        out["generator after the flow-map init"] = tv_generator(flow_gen, teacher, n)
    out["generator (raw)"] = tv_generator(raw, teacher, n)
    out["generator (EMA)"] = tv_generator(ema, teacher, n)
    return out


def generator_at(run_dir: Path, stage2_step: int, which: str = "ema"):
    """(generator, teacher) from the stage-2 checkpoint of `run_dir` at `stage2_step`."""
    from dd2cli.config import from_dict
    from dd2cli.engine.checkpoint import Checkpoint
    from dd2cli.engine.distill import _Run
    from dd2cli.engine.distributed import DistInfo
    from dd2cli.engine.progress import Progress
    from dd2cli.files import read_json
    from dd2cli.plugins import get_variant
    from dd2cli.settings import DistillSettings

    info = read_json(Path(run_dir) / "config.json")
    teacher = get_variant(info["teacher"]).load().eval()
    r = _Run(Path(run_dir), from_dict(DistillSettings, info["settings"]), teacher, info["teacher"], DistInfo(), "cpu",
             Progress())
    gen = Generator(r.new_model()).eval()
    Checkpoint(Path(run_dir) / "checkpoints" / f"stage2-{stage2_step:07d}").load_module(which, gen)
    return gen, teacher
