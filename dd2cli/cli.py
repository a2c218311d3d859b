"""The `dd2` command line. Commands are thin: they parse options and call the engine.

Start-up must stay instant: no torch import and no plugin loading at import time; each command
imports what it needs.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import DD2Error

app = typer.Typer(
    name="dd2",
    help="Distilled Decoding 2: distil image auto-regressive models (VAR, LlamaGen, plugins) into one-step "
         "generators, then sample, evaluate and export them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
err_console = Console(stderr=True)


class _State:
    quiet = False
    verbose = False


state = _State()


def handle_errors(fn: Callable) -> Callable:
    """Turn a `DD2Error` into one red sentence on stderr and a non-zero exit (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DD2Error as exc:
            err_console.print(f"[bold red]Error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"dd2 {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                           help="Print the dd2 version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print results and errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print debug information."),
) -> None:
    """Global options apply to every command."""
    state.quiet = quiet
    state.verbose = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
@handle_errors
def teachers(
    name: Optional[str] = typer.Argument(None, help="Show only this variant (or family)."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", help="Folder with official weight files "
                                               "(default: $DD2_WEIGHTS_DIR or ~/.cache/dd2/weights)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """List installed teacher families and variants, the weight files each needs, and whether they are found."""
    from .plugins import registry
    from .teachers import default_weights_dir

    reg = registry()
    wdir = weights_dir or default_weights_dir()
    selected = {reg.get(name).name} if name and name not in reg.families else None
    rows = []
    for fam in sorted(reg.families.values(), key=lambda f: f.name):
        if name and name in reg.families and fam.name != name:
            continue
        for v in fam.variants:
            if selected is not None and v.name not in selected:
                continue
            found = v.locate_weights(weights_dir=wdir)
            files = [{
                "key": w.key, "filename": w.filename, "description": w.description, "url": w.url,
                "bundled": w.bundled is not None,
                "path": str(found[w.key]) if found[w.key] else None,
                "expected": str(w.expected_location(wdir)),
            } for w in v.weights]
            rows.append({"family": fam.name, "plugin": fam.plugin, "variant": v.name,
                         "description": v.description, "image_size": v.image_size,
                         "ready": all(f["path"] for f in files), "weights": files})
    if as_json:
        console.print_json(json.dumps({"weights_dir": str(wdir), "teachers": rows}))
        return
    if not rows:
        console.print("No teachers installed. Install a teacher plugin (see 'dd2 plugins').")
        return
    table = Table(title="Teachers")
    for col in ("variant", "family", "px", "weights", "description"):
        table.add_column(col, overflow="fold")
    any_missing = False
    for r in rows:
        parts = []
        for f in r["weights"]:
            if f["bundled"]:
                parts.append(f"[green]{f['key']}: bundled[/green]")
            elif f["path"]:
                parts.append(f"[green]{f['key']}: {f['filename']} ✓[/green]")
            else:
                any_missing = True
                parts.append(f"[red]{f['key']}: {f['filename']} missing[/red]")
        table.add_row(r["variant"], r["family"], str(r["image_size"] or ""), "\n".join(parts) or "none",
                      r["description"])
    console.print(table)
    if any_missing:
        console.print(f"Missing weight files are looked up in {wdir} (set $DD2_WEIGHTS_DIR or use --weights-dir), "
                      f"or pass them explicitly with --weights KEY=PATH; 'dd2 teachers --json' lists the download URLs.",
                      highlight=False)


@app.command()
@handle_errors
def plugins(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """List installed plugins, their versions and the hooks they implement."""
    from .plugins import list_plugins

    infos = list_plugins()
    if as_json:
        console.print_json(json.dumps([
            {"name": p.name, "hooks": list(p.hooks), "version": p.version, "distribution": p.distribution}
            for p in infos]))
        return
    table = Table(title="Plugins")
    for col in ("name", "distribution", "version", "hooks"):
        table.add_column(col)
    for p in infos:
        table.add_row(p.name, p.distribution or "-", p.version or "-", ", ".join(p.hooks))
    console.print(table)


@app.command()
@handle_errors
def inspect(
    path: Path = typer.Argument(..., help="A .safetensors file written by dd2, or an official .pth/.pt checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Check that a weights file is readable (integrity, plain weights only) and list its tensors."""
    from .files import load_foreign_checkpoint, load_safetensors

    if path.suffix == ".safetensors":
        tensors, metadata = load_safetensors(path)
    else:
        tensors, metadata = load_foreign_checkpoint(path, what="checkpoint"), {}
    entries = [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
               for k, v in tensors.items()]
    total = sum(v.numel() for v in tensors.values())
    if as_json:
        console.print_json(json.dumps({"path": str(path), "tensors": entries, "numel": total, "metadata": metadata}))
        return
    table = Table(title=f"{path} ({len(entries)} tensors, {total:,} values)")
    for col in ("key", "shape", "dtype"):
        table.add_column(col)
    for e in entries:
        table.add_row(e["key"], str(tuple(e["shape"])), e["dtype"])
    console.print(table)


class _RichProgress:
    """Live display of a training stage: step/total, losses, it/s, ETA (rich)."""

    def __init__(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[metrics]}"), TextColumn("{task.fields[speed]}"),
                           TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                           transient=False)
        self._task = None

    def start(self, stage: str, total: int, completed: int) -> None:
        self._p.start()
        self._task = self._p.add_task(stage, total=total, completed=completed, metrics="", speed="")

    def update(self, completed: int, metrics) -> None:
        shown = "  ".join(f"{k[5:] if k.startswith('loss_') else k} {v:.4g}" for k, v in metrics.items()
                          if k.startswith("loss_"))
        self._p.update(self._task, completed=completed, metrics=shown, speed=f"{metrics.get('it_s', 0):.2f} it/s")

    def stop(self) -> None:
        self._p.stop()

    def message(self, text: str) -> None:
        console.print(text, highlight=False)


def _parse_weights(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise DD2Error(f"--weights '{item}' is not of the form KEY=PATH (e.g. --weights var=var_d16.pth).")
        key, path = item.split("=", 1)
        out[key.strip()] = path.strip()
    return out


@app.command()
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
    stage: str = typer.Option("all", "--stage", help="1 (GTS initialisation only), 2 (CSD only; needs --resume of "
                              "a run whose stage 1 is done) or all."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N (default: the setting, auto)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Base random seed (default: the setting, 0)."),
    list_settings: bool = typer.Option(False, "--list-settings", help="Print every setting with its default and "
                                       "meaning, then exit."),
) -> None:
    """Distil a teacher into a one-step generator: stage 1 (GTS init) then stage 2 (CSD). Resumable.

    Runs data-parallel under torchrun: torchrun --nproc_per_node N -m dd2cli distill ...
    """
    from .distill import DistillRequest, run

    if list_settings:
        from .config import describe
        from .settings import DistillSettings

        table = Table(title="dd2 distill settings (--set KEY=VALUE, or in a TOML file)")
        for col in ("key", "type", "default", "meaning"):
            table.add_column(col, overflow="fold")
        for key, tp, default, help_ in describe(DistillSettings):
            table.add_row(key, tp, repr(default), help_)
        console.print(table)
        return
    req = DistillRequest(teacher=teacher, weights=_parse_weights(weights), config=config, overrides=tuple(set_),
                         out=out, resume=resume, stage=stage, device=device, seed=seed)
    progress = _RichProgress() if not state.quiet else None

    def ready(run_dir: Path, info: dict) -> None:
        if not state.quiet:
            console.print(f"Run directory: [bold]{run_dir}[/bold] (teacher {info['teacher']})", highlight=False)

    result = run(req, progress=progress, on_ready=ready)
    console.print(f"Done: {result.run_dir}", highlight=False)
    if result.grid is not None:
        console.print(f"Sample grid: {result.grid}", highlight=False)
    if stage != "1":  # (after stage 1 alone there is no generator to score yet)
        _quality_table(result.run_dir, device, result.threads)


def _quality_table(run_dir: Path, device: Optional[str], threads: int = 0) -> None:
    """`run.eval_samples > 0` (the digits demo): one-step vs teacher vs set-prediction, in the digits space."""
    import os

    from .distill import torch_threads
    from .files import read_json
    from .report import quality_report

    if int(os.environ.get("RANK", "0")) != 0:
        return
    settings = read_json(run_dir / "config.json")["settings"]
    n = int(settings.get("run", {}).get("eval_samples", 0))
    if n <= 0:
        return
    say = None if state.quiet else (lambda m: console.print(m, style="dim", highlight=False))
    with torch_threads(threads):  # what the run used
        rows = quality_report(run_dir, n, device=device or settings.get("device", "auto"), on_message=say)
    table = Table(title=f"Quality on {n} balanced samples (digits features; dd2 eval all --features digits "
                        f"{run_dir}/quality/*)")
    for col in ("sampler", "digits-FID", "precision", "recall", "class-consistency", "images/s"):
        table.add_column(col, justify="left" if col == "sampler" else "right")
    for r in rows:
        m = r.metrics
        table.add_row(r.name, f"{m.get('fid', float('nan')):.1f}", f"{m.get('precision', float('nan')):.3f}",
                      f"{m.get('recall', float('nan')):.3f}", f"{m.get('class_consistency', float('nan')):.3f}",
                      f"{r.images_per_s:.0f}")
    console.print(table)
    console.print(f"Written: {run_dir / 'quality.json'}", highlight=False)


def _register_more_commands() -> None:
    """Commands that live in their own modules (none imports torch at import time)."""
    from . import cli_eval, cli_export, cli_sample

    for module in (cli_sample, cli_eval, cli_export):
        module.register(app)


_register_more_commands()


def main() -> None:
    app(prog_name="dd2")


if __name__ == "__main__":  # pragma: no cover
    main()
