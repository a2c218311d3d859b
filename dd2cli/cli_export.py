"""`dd2 export`: write a run's one-step generator as a self-contained bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import OFFLINE, DType, ExportFormat, GeneratorWeights, go_offline, handle_errors, progress_for, show, state


@handle_errors
def export(
    run_dir: Path = typer.Argument(..., help="A distillation run directory with a finished stage 2."),
    out: Path = typer.Option(..., "--out", "-o", help="The bundle folder to create (must not exist or be "
                             "empty)."),
    dtype: DType = typer.Option(DType.fp32, "--dtype", help="fp32, bf16 or fp16: how the generator and decoder "
                              "weights are stored (loading always computes in fp32)."),
    generator: GeneratorWeights = typer.Option(GeneratorWeights.ema, "--generator", help="Which generator of the "
                                               "run: the EMA weights or the raw trained ones."),
    format_: ExportFormat = typer.Option(ExportFormat.safetensors, "--format", help="safetensors, or pt2 to also write "
                                "generator.pt2 (a torch.export program that runs without dd2; loading a .pt2 runs "
                                "code, so only load one from a trusted source: the safetensors files are the safe "
                                "way to share a generator)."),
    offline: bool = OFFLINE,
) -> None:
    """Export a run's one-step generator as a self-contained bundle (weights, decoder, codebook, model card).

    Load it with 'dd2 sample --from BUNDLE_DIR' or in Python with dd2cli.load_generator(BUNDLE_DIR).
    """
    go_offline(offline)
    from .engine.export import ExportRequest
    from .engine.export import export as run_export
    from .engine.model_card import human_size

    result = run_export(ExportRequest(run_dir=run_dir, out=out, dtype=dtype.value, weights=generator.value,
                                      format=format_.value), progress=progress_for(state.quiet))
    show(f"Bundle: {result.out} ({human_size(sum(result.files.values()))}, teacher {result.teacher}, "
                  f"{generator.value} weights as {dtype.value})")
    if not state.quiet:
        for name, size in result.files.items():
            show(f"  {name:24s} {human_size(size):>10s}")
        if result.check_max_abs_diff is not None:
            show(f"Check: max pixel difference to the run's images {result.check_max_abs_diff:.3g}")
        if result.pt2_batch is not None:
            batch = "any batch size" if result.pt2_batch == "dynamic" else f"batch size {result.pt2_batch} only"
            show(f"generator.pt2 takes {batch}")
        show(f"Sample it: dd2 sample --from {result.out}\nIn Python: dd2cli.load_generator(\"{result.out}\")")
