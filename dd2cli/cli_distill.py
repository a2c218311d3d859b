"""`dd2 distill`: parse the options, run the engine, print where the results are and the quality table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .cli_common import OFFLINE, Stage, console, go_offline, handle_errors, parse_weights, progress_for, say, show, state
from .config import describe
from .errors import DD2Error
from .files import read_json
from .settings import DistillSettings

if TYPE_CHECKING:
    from .engine.distill import Prepared
    from .engine.memory import MemoryPlan


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
    list_settings: bool = typer.Option(False, "--list-settings", metavar="", help="Print every setting this run would use "
                                       "(after --teacher, --config, --set or --resume), where its value comes from "
                                       "and what it means, then exit without writing anything."),
    dry_run: bool = typer.Option(False, "--dry-run", metavar="", help="Print the memory plan of this run (weights, "
                                 "gradients, optimiser states and activations per rank, per stage, under ddp and fsdp, "
                                 "fp32 and bf16, with and without activation checkpointing), then exit; needs no "
                                 "weight files for the official variants."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="With --dry-run: the number of processes (GPUs) to plan "
                                        "for (default: $WORLD_SIZE, else 1)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="With --dry-run: memory per GPU, e.g. 80GB; "
                                             "the plan then says whether each stage fits and what to change if not."),
    offline: bool = OFFLINE,
) -> None:
    """Distil a teacher into a one-step generator: stage 1 (GTS init) then stage 2 (CSD). Resumable.

    Runs data-parallel under torchrun: torchrun --nproc_per_node N -m dd2cli distill ...
    """
    go_offline(offline)
    from .engine.distill import DistillRequest, prepare, run  # (torch: imported when a command runs, not at start-up)

    req = DistillRequest(teacher=teacher, weights=parse_weights(weights), config=config, overrides=tuple(set_),
                         out=out, resume=resume, stage=stage.value, device=device, seed=seed)
    if list_settings:  # the engine resolves the settings exactly as the run would; it reads and writes nothing
        console.print(settings_table(prepare(req), resumed=resume is not None))
        return
    if nproc is not None or gpu_memory is not None:
        if not dry_run:
            raise DD2Error("--nproc and --gpu-memory describe the machine for --dry-run; add --dry-run (a real run takes "
                           "its processes from torchrun).")
    if dry_run:
        from .engine.memory import memory_plan
        from .plugins import get_variant

        prepared = prepare(req)
        plan = memory_plan(get_variant(prepared.info["teacher"]), prepared.settings, nproc=nproc,
                           gpu_memory=gpu_memory, weights=req.weights)
        print_plan(plan)
        state.skip_teardown = True
        return
    progress = progress_for(state.quiet)

    def ready(run_dir: Path, info: dict) -> None:
        say(f"Run directory: {run_dir} (teacher {info['teacher']})")

    result = run(req, progress=progress, on_ready=ready)
    show(f"Done: {result.run_dir}")
    if result.grid is not None:
        show(f"Sample grid: {result.grid}")
    if stage != Stage.one:  # (after stage 1 alone there is no generator to score yet)
        _quality_table(result.run_dir, device, result.threads)


#: between a setting's value and where it comes from, in `--list-settings`
SOURCE_MARK = "  · from "


def _toml(value: object) -> str:
    """A setting's value as `--set` and a TOML file write it (`unset` for an optional value left to the variant)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # (a TOML basic string is a JSON string)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def settings_table(prepared: Prepared, resumed: bool = False) -> Table:
    """Every setting of a prepared run: the key, then its value and source on the same line (so that a grep for
    the key finds both), the meaning and type below.

    Cells are `Text`, never markup, so values, types and help in brackets (`[t_min, 1]`) print as they are; the
    key column never wraps and is as wide as the longest key, and the meaning folds at spaces in the rest.
    """
    rows = describe(DistillSettings)
    title = (f"Settings of the resumed run {prepared.run_dir}" if resumed else
             f"Settings of a new run of {prepared.info['teacher']}") + " (--set KEY=VALUE, or in a TOML file)"
    table = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("setting", no_wrap=True, min_width=max(len(key) for key, *_ in rows))
    table.add_column("value · from where · meaning", ratio=1)
    for key, type_name, _, help_ in rows:
        value = prepared.settings
        for part in key.split("."):
            value = getattr(value, part)
        cell = Text(_toml(value), style="bold")
        cell.append(f"{SOURCE_MARK}{prepared.sources[key]}", style="cyan")
        cell.append(f"\n{help_} ({type_name})", style="dim")
        table.add_row(Text(key), cell)
    recorded = prepared.info.get("threads") if resumed else None
    if isinstance(recorded, int) and recorded > 0:
        table.caption = Text(f"--resume computes with the {recorded} torch thread(s) recorded in config.json unless "
                             f"--set threads=N asks for another count.")
        table.caption_justify = "left"
    return table


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


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f}" if nbytes >= 0.05e9 or nbytes == 0 else f"{nbytes / 1e9:.2f}"


def _line(text: str, style: str | None = None) -> None:
    """A line of the plan on stdout, folded at the terminal's width (80 columns in a log)."""
    console.print(Text(text, style=style or ""))


def print_plan(plan: MemoryPlan) -> None:
    """`dd2 distill --dry-run`: three tables and a verdict per stage, each line within 80 columns."""
    s = plan.settings
    gpus = f", {plan.gpu_bytes / 1e9:.0f} GB per GPU" if plan.gpu_bytes else ""
    procs = f"{plan.nproc} process{'es' if plan.nproc > 1 else ''}"
    _line(f"Memory plan of {plan.teacher}: {procs}{gpus} (GB = 10^9 bytes)", style="bold")

    nets = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=Text("networks (GB)"), title_justify="left")
    for col in ("network", "params", "weights", "grads", "Adam"):
        nets.add_column(col, justify="left" if col == "network" else "right")
    trained = {h.network for st in plan.stages for h in st.holds if h.role == "trained"}
    held = {h.network for st in plan.stages for h in st.holds}
    for key, n in plan.networks.items():
        if key not in held:
            continue
        train = key in trained
        nets.add_row(n.name, f"{n.params / 1e6:,.0f} M", _gb(n.weight_bytes), _gb(n.grad_bytes) if train else "-",
                     _gb(n.adam_bytes) if train else "-")
    console.print(nets)

    acts = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=Text("activations per sequence (GB)"),
                 title_justify="left")
    for col in ("update", "fp32", "bf16", "fp32 ckpt", "bf16 ckpt"):
        acts.add_column(col, justify="left" if col == "update" else "right")
    for st in plan.stages:
        for name, a in st.updates:
            acts.add_row(f"{st.key}: {name}", *(_gb(a.per_sample(p, c)) for c in (False, True)
                                                 for p in ("fp32", "bf16")))
    console.print(acts)

    per = Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left",
                title=Text("per rank at the configured batch (GB); ckpt: activation checkpointing"))
    for col in ("stage", "batch/rank", "ddp fp32", "ddp bf16", "fsdp fp32", "fsdp bf16"):
        per.add_column(col, justify="left" if col == "stage" else "right")
    for st in plan.stages:
        for ckpt in (False, True):
            cells = [_gb(plan.per_rank(st, par, prec, ckpt).total) for par in ("ddp", "fsdp") for prec in ("fp32", "bf16")]
            per.add_row(f"{st.key}{' ckpt' if ckpt else ''}", f"{st.batch / plan.nproc:g}", *cells)
    console.print(per)

    flags = f"parallel={s.parallel}, precision={s.precision}, activation_checkpointing={str(s.activation_checkpointing).lower()}"
    _line(f"Configured: {flags}")
    for st in plan.stages:
        total = plan.configured(st).total
        line = f"{st.title}: {_gb(total)} GB per rank"
        if plan.gpu_bytes:
            advice = plan.advice(st)
            line += " - fits" if advice is None else f" > {plan.gpu_bytes / 1e9:.0f} GB: {advice}"
        _line(line)
    _line("bf16: the networks' saved tensors at 2 bytes (a lower bound until measured on a GPU); "
        "activations traced, then scaled by a factor measured on CPU (benchmarks/RESULTS.md).", style="dim")
