"""`dd2 eval fid|sfid|kid|is|prec-recall|class-consistency|all|speed|joint-tv`: thin commands over the evaluation engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from .cli_common import (
    OFFLINE,
    Features,
    Precision,
    Resize,
    console,
    go_offline,
    handle_errors,
    parse_weights,
    progress_for,
    say,
    set_threads,
    state,
)
from .errors import DD2Error

# KID in scientific notation: its scale depends on the feature space (about 1e-3 on Inception, 1e3 on digits)
_FORMAT = {"fid": ("FID", "{:.3f}"), "sfid": ("sFID", "{:.3f}"), "kid": ("KID", "{:.2e}"),
           "is": ("IS", "{:.2f}"), "precision": ("prec.", "{:.3f}"), "recall": ("recall", "{:.3f}"),
           "class_consistency": ("class-cons.", "{:.3f}")}


def _short(path: Path) -> str:
    """The path relative to the working directory when it is inside it, else its last two parts."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(*Path(path).parts[-2:]))


def _print_results(results, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps([{"samples": str(r.samples), "count": r.count, "features": r.features,
                                        "reference": r.reference, "metrics": r.metrics} for r in results]))
        return
    keys = [k for k in _FORMAT if any(k in r.metrics for r in results)]
    first = results[0]
    title = escape(f"dd2 eval ({first.features} features, reference {first.reference})")  # (paths are not markup)
    # fits 80 columns: a set is named by its folder (the full paths follow the table), numbers never wrap
    # fits 80 columns: a set is named by its folder, numbers never wrap; with many metrics the source (teacher,
    # mode) moves from its column to the lines under the table, which also give the full paths
    with_source = len(keys) <= 3
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("set", overflow="fold")
    if with_source:
        table.add_column("source", overflow="fold")
    table.add_column("n", justify="right", no_wrap=True)
    for k in keys:
        table.add_column(_FORMAT[k][0], justify="right", no_wrap=True)
    for r in results:
        source = [escape(r.source or "-")] if with_source else []
        table.add_row(escape(Path(r.samples).name), *source, str(r.count),
                      *[_FORMAT[k][1].format(r.metrics[k]) if k in r.metrics else "-" for k in keys])
    console.print(table)
    if not with_source or len(results) > 1:
        for r in results:
            source = "" if with_source or not r.source else f"{r.source}, "
            say(f"{Path(r.samples).name}: {source}{_short(r.samples)}")
    for path in dict.fromkeys(r.json_path for r in results if r.json_path is not None):
        say(f"Written: {path}")


def _metric_command(metrics: tuple[str, ...], doc: str) -> Callable:
    @handle_errors
    def command(
        ctx: typer.Context,
        samples: Optional[list[Path]] = typer.Argument(None, help="Sample sets: folders of PNGs or ADM .npz files "
                                                       "(default: the most recent dd2 sample set)."),
        ref: Optional[Path] = typer.Option(None, "--ref", help="Reference: an ADM reference .npz (its mu/sigma are "
                                           "used when present), a folder or an .npz of images, or imagenet256 / "
                                           "imagenet512 (the ADM batch, downloaded once) (digits default: the "
                                           "real train split at the samples' resolution, at most the classifier's 16 px)."),
        features: Features = typer.Option(Features.auto, "--features", help="inception, digits, or auto (digits for samples of a "
                                     "digits teacher, else inception)."),
        inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Path of "
                                                         "weights-inception-2015-12-05-6726825d.pth (else looked up "
                                                         "in $TORCH_HOME/hub/checkpoints; never downloaded)."),
        resize: Resize = typer.Option(Resize.adm, "--resize", help="adm (TF1 bilinear, as the ADM evaluator) or antialias "
                                   "(torchmetrics' default)."),
        batch_size: int = typer.Option(100, "--batch-size", "-b", help="Images per network pass."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the results file here (default: "
                                                "eval-<features>.json next to each sample set)."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print the results as JSON on stdout instead of a table."),
        threads: int = typer.Option(-1, "--threads", help="CPU threads for torch: -1 = one per idle "
                                    "core (the count is said on stderr), 0 = torch's default, N = N; the "
                                    "same on every dd2 command."),
        offline: bool = OFFLINE,
    ) -> None:
        go_offline(offline)
        from .engine.evaluate import EvalRequest, evaluate

        set_threads(ctx, threads)

        req = EvalRequest(metrics=metrics, samples=tuple(samples or ()), ref=ref, features=features.value,
                          inception_weights=inception_weights, resize=resize.value, batch_size=batch_size, device=device,
                          json_path=json_out)
        progress = progress_for(state.quiet or as_json, transient=True)
        _print_results(evaluate(req, progress=progress), as_json)

    command.__doc__ = doc
    return command


def eval_app() -> typer.Typer:
    """The `dd2 eval` command group."""
    eval_app = typer.Typer(help="Evaluate sample sets (FID, sFID, IS, precision/recall as the ADM evaluator; KID; "
                                "digits metrics) and sampling speed.", no_args_is_help=True)
    eval_app.command("fid")(_metric_command(("fid",), "Fréchet distance to the reference (Inception pool_3, or "
                                            "digits-classifier features)."))
    eval_app.command("sfid")(_metric_command(("sfid",), "Spatial FID: first 7 channels of Inception's mixed_6/conv "
                                             "(17x17x7)."))
    eval_app.command("kid")(_metric_command(("kid",), "Kernel Inception Distance: the unbiased MMD² (cubic "
                                            "polynomial kernel) to the reference features, mean ± std over 100 "
                                            "subsets of up to 1,000 images."))
    eval_app.command("is")(_metric_command(("is",), "Inception score: 1008-way logits without bias, 10 splits."))
    eval_app.command("prec-recall")(_metric_command(("prec-recall",), "Precision and recall (k-NN manifolds, k=3) "
                                                    "against the reference images."))
    eval_app.command("class-consistency")(_metric_command(("class-consistency",), "Digits: the fraction of samples "
                                                          "the digits classifier assigns their requested label."))
    eval_app.command("all")(_metric_command(("all",), "Every metric of the feature space; several sample sets give "
                                            "one comparison table."))

    @eval_app.command("speed")
    @handle_errors
    def speed(
        ctx: typer.Context,
        source: Optional[Path] = typer.Option(None, "--from", help="A distillation run (default: the most recent)."),
        teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Time a teacher against an untrained "
                                              "generator of the default architecture (speed does not depend on "
                                              "weights)."),
        weights: list[str] = typer.Option([], "--weights", help="KEY=PATH of a teacher weight file (repeatable)."),
        batch_size: int = typer.Option(64, "--batch-size", "-b", help="The large batch size (batch 1 is always "
                                       "timed)."),
        steps: str = typer.Option("", "--steps", "-k", help="Also time k-step sampling, e.g. --steps 2,4."),
        repeats: int = typer.Option(5, "--repeats", help="Timed repeats (the median is reported)."),
        warmup: int = typer.Option(2, "--warmup", help="Untimed warm-up runs."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        precision: Precision = typer.Option(Precision.fp32, "--precision", help="fp32, or bf16 (CUDA autocast; refused on CPU)."),
        compile_: bool = typer.Option(False, "--compile", metavar="", help="torch.compile the one-step generator (compiled "
                                      "during the warm-up runs)."),
        threads: int = typer.Option(-1, "--threads", help="CPU threads for torch: -1 = one per idle "
                                    "core (the count is said on stderr), 0 = torch's default, N = N; the "
                                    "same on every dd2 command."),
        offline: bool = OFFLINE,
    ) -> None:
        """Images/s and latency of the one-step generator vs the teacher (and k-step), decode included."""
        go_offline(offline)
        from .engine.speed import SpeedRequest, measure_speed

        set_threads(ctx, threads)

        try:
            k_steps = tuple(int(s) for s in steps.split(",") if s.strip())
        except ValueError:
            raise DD2Error(f"--steps '{steps}' is not a comma list of step counts (e.g. 2,4).") from None
        sizes = tuple(dict.fromkeys((1, batch_size)))
        req = SpeedRequest(run_dir=source, teacher=teacher, weights=parse_weights(weights), device=device,
                           batch_sizes=sizes, k_steps=k_steps, warmup=warmup, repeats=repeats,
                           precision=precision.value, compile=compile_)
        progress = progress_for(state.quiet, transient=True)
        rows, info = measure_speed(req, progress=progress)
        table = Table(title=f"Sampling speed: {info['teacher']} on {info.get('gpu', info['device'])} "
                            f"(median of {info['repeats']}, decode included, {info['precision']}"
                            f"{', compiled' if info['compile'] else ''})")
        for col in ("mode", "batch", "latency (ms)", "images/s", "vs teacher"):
            table.add_column(col, justify="right" if col != "mode" else "left")
        for r in rows:
            table.add_row(r.mode, str(r.batch_size), f"{r.latency_ms:.2f}", f"{r.images_per_s:.1f}",
                          f"{r.speedup:.1f}×")
        console.print(table)
        say(f"Generator: {info['generator']}")

    @eval_app.command("joint-tv")
    @handle_errors
    def joint_tv(
        ctx: typer.Context,
        samples: list[Path] = typer.Argument(..., help="Finished dd2 sample sets (their tokens.npy is read)."),
        teacher: str = typer.Option(..., "--teacher", "-t", help="A teacher that exposes its exact joint "
                                    "distribution (e.g. exact-raster, exact-scales)."),
        weights: list[str] = typer.Option([], "--weights", help="KEY=PATH of a teacher weight file (repeatable)."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print the results as JSON on stdout instead of a table."),
        threads: int = typer.Option(-1, "--threads", help="CPU threads for torch: -1 = one per idle "
                                    "core (the count is said on stderr), 0 = torch's default, N = N; the "
                                    "same on every dd2 command."),
        offline: bool = OFFLINE,
    ) -> None:
        """Total variation between the samples' joint over token ids and the teacher's exact joint, per class,
        with the noise floor at that sample size, the set-prediction baseline and each AR step's conditional
        error (writes joint-tv.json next to each set)."""
        go_offline(offline)
        from .engine.joint import score_sample_sets

        set_threads(ctx, threads)
        scored = score_sample_sets(teacher, samples, weights=parse_weights(weights))
        if as_json:
            console.print_json(json.dumps([{"samples": folder, "sampling": text, **rep.as_dict()}
                                           for folder, rep, text in scored]))
            return
        table = Table(title=escape(f"dd2 eval joint-tv (teacher {teacher})"), box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("set", "n", "TV", "floor", "×floor", "set-pred.", "worst step"):
            table.add_column(col, justify="left" if col == "set" else "right", no_wrap=col != "set",
                             overflow="fold")
        for folder, rep, _ in scored:
            worst = max(range(len(rep.step_errors)), key=lambda s: rep.step_errors[s])
            table.add_row(escape(Path(folder).name), str(rep.n), f"{rep.tv:.3f}", f"{rep.noise_floor:.3f}",
                          f"{rep.tv / rep.noise_floor:.1f}" if rep.noise_floor > 0 else "-",
                          f"{rep.set_prediction:.3f}", f"{rep.step_errors[worst]:.3f} (step {worst})")
        console.print(table)
        for folder, rep, text in scored:
            steps = ", ".join(f"{e:.3f}" for e in rep.step_errors)
            say(f"{Path(folder).name}: per-step conditional errors {steps}; joint under {text}; {_short(Path(folder))}")
            say(f"Written: {Path(folder) / 'joint-tv.json'}")

    return eval_app
