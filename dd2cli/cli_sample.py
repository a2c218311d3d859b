"""`dd2 sample`: parse the options, run the sampling engine, print where the sample set is."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import (
    OFFLINE,
    Baseline,
    GeneratorWeights,
    Precision,
    go_offline,
    handle_errors,
    parse_weights,
    progress_for,
    say,
    set_threads,
    show,
    state,
)


@handle_errors
def sample(
    ctx: typer.Context,
    source: Optional[Path] = typer.Option(None, "--from", help="A distillation run directory or an exported "
                                          "bundle (default: the most recent run under the runs folder)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Sample the teacher itself (its own AR "
                                          "sampler) instead of a distilled generator."),
    generator: GeneratorWeights = typer.Option(GeneratorWeights.ema, "--generator", help="Which generator of a run: "
                                               "the EMA weights or the raw trained ones."),
    weights: list[str] = typer.Option([], "--weights", help="KEY=PATH: a weight file of --teacher (repeatable)."),
    steps: Optional[int] = typer.Option(None, "--steps", "-k", help="1 = one-step generator; k > 1 = the teacher "
                                        "re-samples the last k-1 AR steps (default 1; a teacher uses its own "
                                        "step count)."),
    baseline: Optional[Baseline] = typer.Option(None, "--baseline", help="set-prediction: every position drawn "
                                           "independently from its per-class marginal (paper App. E.5)."),
    baseline_samples: int = typer.Option(2000, "--baseline-samples", help="Teacher samples that estimate the "
                                         "set-prediction marginals (cached)."),
    n: int = typer.Option(1000, "--num-samples", "-n", help="Number of images (a quick look; FID against the ADM "
                          "reference uses -n 50000)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per forward pass (does not change "
                                   "any image)."),
    labels: str = typer.Option("auto", "--labels", help="auto (balanced when the class count divides -n, else "
                               "uniform), uniform, balanced (i mod classes) or a comma list of class ids, cycled."),
    seed: int = typer.Option(0, "--seed", help="Sample i depends only on the seed and i."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance (family convention; default: the "
                                        "teacher's evaluation setting). Used by the teacher and k-step."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k of the teacher's sampler (0 = off)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Top-p of the teacher's sampler (1 = off)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Softmax temperature of the "
                                                "teacher's sampler."),
    block_size: int = typer.Option(64, "--block-size", help="Indices per random generator for the teacher and "
                                   "k-step sampling (changing it changes those images)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: samples/<source>-"
                                       "<mode>-<time> under the run, or under ./dd2-samples for a teacher). Re-running "
                                       "into it finishes the missing images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    precision: Precision = typer.Option(Precision.fp32, "--precision", help="fp32, or bf16 (CUDA autocast; refused on CPU)."),
    compile_: bool = typer.Option(False, "--compile", metavar="", help="torch.compile the one-step generator (minutes of "
                                  "compilation before the first image; pays off for large sample sets)."),
    threads: int = typer.Option(-1, "--threads", help="CPU threads for torch: -1 = one per idle "
                                "core (the count is said on stderr), 0 = torch's default, N = N; the "
                                "same on every dd2 command."),
    offline: bool = OFFLINE,
) -> None:
    """Draw a sample set (PNGs + ADM .npz + manifest) from a distilled generator, a bundle or a teacher.

    Resumable; under torchrun the images are sharded over ranks: torchrun --nproc_per_node N -m dd2cli sample ...
    """
    go_offline(offline)
    from .engine.sample import SampleRequest, run

    set_threads(ctx, threads)
    req = SampleRequest(source=source, teacher=teacher, teacher_weights=parse_weights(weights), which=generator.value, steps=steps,
                        baseline=baseline.value if baseline else None, baseline_samples=baseline_samples, n=n, batch_size=batch_size,
                        labels=labels, seed=seed, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                        block_size=block_size, out=out, device=device,
                        precision=precision.value, compile=compile_)
    progress = progress_for(state.quiet)
    result = run(req, progress=progress)
    if result.manifest is None:
        return  # a rank other than 0 under torchrun: rank 0 reports
    speed = f", {result.images_per_s:.1f} images/s" if result.generated else ""
    show(f"Samples: {result.out_dir} ({result.n} images; {result.generated} new, {result.existing} "
                  f"already there{speed})")
    show(f"ADM npz: {result.npz}")
    say(f"Preview: {result.preview}\nManifest: {result.manifest}")
