"""`dd2 distill`: parse the options, run the engine, print where the results are and the quality table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import Stage, console, handle_errors, parse_weights, progress_for, say, show, state
from .config import describe
from .files import read_json
from .settings import DistillSettings


@handle_errors
def distill(
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t",
                                          help="Teacher variant to distil (see 'dd2 teachers'); default var-digits."),
    weights: list[str] = typer.Option([], "--weights", help="KEY=PATH of a weight file the variant needs "
                                      "(repeatable), e.g. --weights var=var_d16.pth --weights vae=vae.pth."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file of settings (see --list-settings)."),
    set_: list[str] = typer.Option([], "--set", help="Override one setting, e.g. --set stage2.lr=1e-5 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="New run directory (default: a new folder under "
                                       "$DD2_RUNS_DIR or ./runs, printed)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its last "
                                          "complete checkpoint."),
    stage: Stage = typer.Option(Stage.all, "--stage", help="1 (GTS initialisation only), 2 (CSD only; needs --resume of "
                              "a run whose stage 1 is done) or all."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N (default: the setting, auto)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Base random seed (default: the setting, 0)."),
    list_settings: bool = typer.Option(False, "--list-settings", help="Print every setting with its default and "
                                       "meaning, then exit."),
) -> None:
    """Distil a teacher into a one-step generator: stage 1 (GTS init) then stage 2 (CSD). Resumable.

    Runs data-parallel under torchrun: torchrun --nproc_per_node N -m dd2cli distill ...
    """
    from .engine.distill import DistillRequest, run  # (torch: imported when a command runs, not at start-up)

    if list_settings:
        table = Table(title="dd2 distill settings (--set KEY=VALUE, or in a TOML file)")
        for col in ("key", "type", "default", "meaning"):
            table.add_column(col, overflow="fold")
        for key, tp, default, help_ in describe(DistillSettings):
            table.add_row(key, escape(tp), escape(repr(default)), escape(help_))
        console.print(table)
        return
    req = DistillRequest(teacher=teacher, weights=parse_weights(weights), config=config, overrides=tuple(set_),
                         out=out, resume=resume, stage=stage.value, device=device, seed=seed)
    progress = progress_for(state.quiet)

    def ready(run_dir: Path, info: dict) -> None:
        say(f"Run directory: {run_dir} (teacher {info['teacher']})")

    result = run(req, progress=progress, on_ready=ready)
    show(f"Done: {result.run_dir}")
    if result.grid is not None:
        show(f"Sample grid: {result.grid}")
    if stage != Stage.one:  # (after stage 1 alone there is no generator to score yet)
        _quality_table(result.run_dir, device, result.threads)


def _quality_table(run_dir: Path, device: Optional[str], threads: int = 0) -> None:
    """`run.eval_samples > 0` (the digits demo): one-step vs teacher vs set-prediction, in the digits space."""
    from .engine.report import quality_report
    from .engine.runtime import torch_threads

    if int(os.environ.get("RANK", "0")) != 0:
        return
    settings = read_json(run_dir / "config.json")["settings"]
    n = int(settings.get("run", {}).get("eval_samples", 0))
    if n <= 0:
        return

    def note(text: str) -> None:
        say(text, style="dim")

    with torch_threads(threads):  # what the run used
        rows = quality_report(run_dir, n, device=device or settings.get("device", "auto"), on_message=note)
    table = Table(title=escape(f"Quality on {n} balanced samples (digits features; dd2 eval all --features digits "
                               f"{run_dir}/quality/*)"))
    for col in ("sampler", "digits-FID", "precision", "recall", "class-consistency", "images/s"):
        table.add_column(col, justify="left" if col == "sampler" else "right")
    for r in rows:
        m = r.metrics
        table.add_row(r.name, f"{m.get('fid', float('nan')):.1f}", f"{m.get('precision', float('nan')):.3f}",
                      f"{m.get('recall', float('nan')):.3f}", f"{m.get('class_consistency', float('nan')):.3f}",
                      f"{r.images_per_s:.0f}")
    console.print(table)
    show(f"Written: {run_dir / 'quality.json'}")
