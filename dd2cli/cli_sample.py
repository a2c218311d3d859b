"""`dd2 sample`: a thin command over `dd2cli.sample` (no torch import until it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


class _RichSampleProgress:
    """A rich bar: images done / total, images per second, ETA."""

    def __init__(self, console) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._console = console
        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                           TimeRemainingColumn(), console=console)
        self._task = None
        self._t0 = 0.0
        self._done = 0

    def start(self, description: str, total: int, completed: int) -> None:
        import time

        self._p.start()
        self._task = self._p.add_task(description, total=total, completed=completed, rate="")
        self._t0, self._done = time.perf_counter(), 0

    def advance(self, count: int) -> None:
        import time

        self._done += count
        rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
        self._p.update(self._task, advance=count, rate=f"{rate:.1f} images/s")

    def stop(self) -> None:
        self._p.stop()

    def message(self, text: str) -> None:
        self._console.print(text, highlight=False)


def _split_weights(items: list[str]) -> tuple[str, dict[str, str]]:
    """`--weights ema|raw` (run sources) and `--weights KEY=PATH` (teachers) share one option."""
    from .errors import DD2Error

    which, files = "ema", {}
    for item in items:
        if "=" in item:
            key, path = item.split("=", 1)
            files[key.strip()] = path.strip()
        elif item.strip() in ("ema", "raw"):
            which = item.strip()
        else:
            raise DD2Error(f"--weights '{item}' is neither ema, raw (which generator of a run) nor KEY=PATH (a "
                           f"teacher weight file).")
    return which, files


def register(app: typer.Typer) -> None:
    from .cli import console, handle_errors, state

    @app.command()
    @handle_errors
    def sample(
        source: Optional[Path] = typer.Option(None, "--from", help="A distillation run directory or an exported "
                                              "bundle (default: the most recent run under the runs folder)."),
        teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Sample the teacher itself (its own AR "
                                              "sampler) instead of a distilled generator."),
        weights: list[str] = typer.Option([], "--weights", help="ema (default) or raw: which generator of a run; "
                                          "or KEY=PATH: a weight file of --teacher (repeatable)."),
        steps: Optional[int] = typer.Option(None, "--steps", "-k", help="1 = one-step generator; k > 1 = the teacher "
                                            "re-samples the last k-1 AR steps (default 1; a teacher uses its own "
                                            "step count)."),
        baseline: Optional[str] = typer.Option(None, "--baseline", help="set-prediction: every position drawn "
                                               "independently from its per-class marginal (paper App. E.5)."),
        baseline_samples: int = typer.Option(2000, "--baseline-samples", help="Teacher samples that estimate the "
                                             "set-prediction marginals (cached)."),
        n: int = typer.Option(50000, "--num-samples", "-n", help="Number of images (the ADM protocol uses 50000)."),
        batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per forward pass (does not change "
                                       "any image)."),
        labels: str = typer.Option("uniform", "--labels", help="uniform, balanced (i mod classes) or a comma list "
                                   "of class ids, cycled."),
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
                                           "<mode>-<time> under the run, or ./samples for a teacher). Re-running "
                                           "into it finishes the missing images."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 (CUDA autocast; refused on CPU)."),
        compile_: bool = typer.Option(False, "--compile", help="torch.compile the one-step generator (minutes of "
                                      "compilation before the first image; pays off for large sample sets)."),
        threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0 = torch's default); 1 is often "
                                    "fastest for the small digits models, and on a machine with another busy job."),
    ) -> None:
        """Draw a sample set (PNGs + ADM .npz + manifest) from a distilled generator, a bundle or a teacher.

        Resumable; under torchrun the images are sharded over ranks: torchrun --nproc_per_node N -m dd2cli sample ...
        """
        from .sample import SampleRequest, run

        _set_threads(threads)
        which, files = _split_weights(weights)
        req = SampleRequest(source=source, teacher=teacher, teacher_weights=files, which=which, steps=steps,
                            baseline=baseline, baseline_samples=baseline_samples, n=n, batch_size=batch_size,
                            labels=labels, seed=seed, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                            block_size=block_size, out=out, device=device,
                            precision=precision, compile=compile_)
        progress = None if state.quiet else _RichSampleProgress(console)
        result = run(req, progress=progress)
        if result.manifest is None:
            return  # a rank other than 0 under torchrun: rank 0 reports
        speed = f", {result.images_per_s:.1f} images/s" if result.generated else ""
        console.print(f"Samples: {result.out_dir} ({result.n} images; {result.generated} new, {result.existing} "
                      f"already there{speed})", highlight=False)
        console.print(f"ADM npz: {result.npz}", highlight=False)
        if not state.quiet:
            console.print(f"Preview: {result.preview}\nManifest: {result.manifest}", highlight=False)


def _set_threads(threads: int) -> None:
    if threads < 0:
        raise typer.BadParameter(f"--threads must be >= 0 (0 = torch's default), got {threads}.")
    if threads:
        import torch

        torch.set_num_threads(threads)
