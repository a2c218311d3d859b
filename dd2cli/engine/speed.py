"""`dd2 eval speed`: images per second and latency of the one-step generator against the teacher (and k-step),
decode included, timed side by side in one process (median of repeats, after warm-up runs).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..config import load_settings
from ..errors import DD2Error
from ..networks import Generator, build_model
from ..plugins import get_variant
from ..settings import DistillSettings
from .progress import Progress
from .runs import find_latest_run, load_generator_from_run
from .runtime import check_precision, maybe_compile, resolve_device, sampling_context


@dataclass
class SpeedRequest:
    run_dir: Optional[Path] = None
    teacher: Optional[str] = None
    weights: Mapping[str, str] = field(default_factory=dict)
    device: str = "auto"
    batch_sizes: tuple[int, ...] = (1, 64)
    k_steps: tuple[int, ...] = ()
    warmup: int = 2
    repeats: int = 5
    precision: str = "fp32"  # fp32 | bf16 (CUDA autocast)
    compile: bool = False  # torch.compile the one-step generator


@dataclass
class SpeedRow:
    mode: str
    batch_size: int
    latency_ms: float  # median wall time of one batch, decode included
    images_per_s: float
    speedup: float = 1.0  # vs the teacher at the same batch size


def _timed(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_sampling(teacher, generator, device: str, batch_sizes: Sequence[int], k_steps: Sequence[int] = (),
                  warmup: int = 2, repeats: int = 5, settings=None,
                  progress: Progress | None = None, precision: str = "fp32", compile: bool = False,
                  decode: bool = True) -> list[SpeedRow]:
    """Median latency / images per second of the teacher, the one-step generator and k-step sampling.

    Every mode ends in pixels (`teacher.decode`), so the decoder's cost is in every row; with
    `decode=False` every mode stops at token ids (the benchmarks time the decoder apart). `precision`
    "bf16" runs every mode under CUDA bf16 autocast; `compile` wraps the generator in `torch.compile`
    (its compilation happens in the warm-up runs, so keep `warmup >= 1` with it).
    """

    check_precision(precision, device)
    generator = maybe_compile(generator, compile)
    progress = progress or Progress()
    spec = teacher.spec
    settings = settings or spec.evaluation
    for k in k_steps:
        if not 1 < k <= spec.num_steps:
            raise DD2Error(f"--steps {k} is out of range: k-step sampling needs 2 <= k <= {spec.num_steps}.")
    rows: list[SpeedRow] = []
    for bs in batch_sizes:
        labels = torch.arange(bs, device=device) % spec.num_classes
        g = torch.Generator(device=device).manual_seed(0)
        eps = torch.randn(bs, spec.num_tokens, spec.latent_dim, generator=g, device=device)

        finish = teacher.decode if decode else (lambda tokens: tokens)

        def teacher_run():
            with sampling_context(precision, device):
                return finish(teacher.sample(labels, settings, generator=g))

        def one_step():
            with sampling_context(precision, device):
                return finish(teacher.as_tokens(generator(eps, labels)))

        def k_step(k):
            def run():
                with sampling_context(precision, device):
                    tokens = teacher.as_tokens(generator(eps, labels))
                    return finish(teacher.sample(labels, settings, prefix_BN=tokens,
                                                 start_step=spec.num_steps - (k - 1), generator=g))
            return run

        progress.message(f"batch {bs}: teacher ({spec.num_steps} steps)")
        t_teacher = _timed(teacher_run, device, warmup, repeats)
        rows.append(SpeedRow(f"teacher ({spec.num_steps} steps)", bs, t_teacher * 1e3, bs / t_teacher, 1.0))
        progress.message(f"batch {bs}: one-step generator")
        t_one = _timed(one_step, device, warmup, repeats)
        rows.append(SpeedRow("dd2 1 step", bs, t_one * 1e3, bs / t_one, t_teacher / t_one))
        for k in k_steps:
            progress.message(f"batch {bs}: {k} steps")
            t_k = _timed(k_step(k), device, warmup, repeats)
            rows.append(SpeedRow(f"dd2 {k} steps", bs, t_k * 1e3, bs / t_k, t_teacher / t_k))
    return rows


def measure_speed(req: SpeedRequest, progress: Progress | None = None) -> tuple[list[SpeedRow], dict]:
    """`dd2 eval speed`: one-step generator vs the teacher's AR sampler (and k-step), same device."""

    progress = progress or Progress()
    if not req.batch_sizes or any(b <= 0 for b in req.batch_sizes):
        raise DD2Error("Batch sizes must be positive.")
    if req.repeats <= 0 or req.warmup < 0:
        raise DD2Error("--repeats must be positive and --warmup non-negative.")
    device = resolve_device(req.device)

    check_precision(req.precision, device)  # before minutes of loading a teacher

    teacher, generator, info = build_speed_subjects(req.run_dir, req.teacher, req.weights, device)
    rows = time_sampling(teacher, generator, device, req.batch_sizes, req.k_steps, req.warmup, req.repeats,
                         progress=progress, precision=req.precision, compile=req.compile)
    info = {**info, "device": device, "warmup": req.warmup, "repeats": req.repeats, "precision": req.precision,
            "compile": req.compile,
            "sampling": teacher.spec.evaluation.as_dict(), "torch": torch.__version__}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return rows, info


def build_speed_subjects(run_dir: Optional[Path], teacher_name: Optional[str], weights: Mapping[str, str],
                         device: str) -> tuple[Any, Any, dict]:
    """(teacher, one-step generator, info) for timing.

    With `--teacher` only, the generator is an untrained one of the default architecture: its speed
    does not depend on the weights.
    """

    if run_dir is not None and teacher_name is not None:
        raise DD2Error("Give either --from RUN_DIR or --teacher NAME, not both.")
    if teacher_name is not None:
        variant = get_variant(teacher_name)
        teacher = variant.load(dict(weights) or None, device=device).eval().requires_grad_(False)
        gen = untrained_generator(teacher, variant.distill_defaults)
        return teacher, gen, {"teacher": variant.name, "generator": "untrained, default architecture (speed only)"}

    run_dir = Path(run_dir) if run_dir is not None else find_latest_run()
    if not (run_dir / "config.json").is_file():
        raise DD2Error(f"{run_dir} is not a distillation run (no config.json); check the path.")
    gen, teacher, info = load_generator_from_run(run_dir, device=device)
    return teacher, gen, {"teacher": info["teacher"], "generator": f"EMA generator of {run_dir}"}


def untrained_generator(teacher, distill_defaults: Mapping[str, Any] | None = None):
    """A generator of the architecture `dd2 distill` would build for `teacher` (random head; for timing)."""
    h = load_settings(DistillSettings, None, (), base=dict(distill_defaults or {})).head
    model = build_model(teacher.new_backbone().to(teacher.device), teacher.spec.latent_dim, h.width, h.depth,
                        h.mlp_ratio, device=teacher.device)
    return Generator(model).eval().requires_grad_(False)
