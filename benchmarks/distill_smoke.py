"""A few iterations of `dd2 distill` on a random-weight VAR teacher: the whole engine, no weight files.

    python benchmarks/distill_smoke.py --teacher var-d16-random --out /tmp/run --device cuda --precision bf16
    python benchmarks/distill_smoke.py --teacher var-mini-random --out /tmp/run          # CPU, seconds

Registers a throw-away plugin whose variants build VAR teachers with random weights (the real
VAR-d16 architecture and tokenizer, or a miniature), then runs the public CLI with 2 stage-1 and
2 stage-2 iterations by default and checks that the run wrote its generator and sample grid.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

MINI = dict(depth=2, width=64, num_heads=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 4))


def _load(variant, weight_paths, device):
    """`Variant.loader`: a random-weight VAR teacher (the paper's sampling settings)."""
    from dd2_var import EVALUATION, STAGE1, TARGET
    from dd2_var.config import VARConfig, VQVAEConfig, vae_config, var_config
    from dd2_var.teacher import new_teacher

    if variant.options["depth"]:
        var_cfg = var_config(variant.options["depth"])
        vae_cfg = vae_config(var_cfg.patch_nums)
    else:
        var_cfg = VARConfig(**MINI)
        vae_cfg = VQVAEConfig(vocab_size=MINI["vocab_size"], z_channels=MINI["z_channels"], ch=32, ch_mult=(1, 2),
                              patch_nums=MINI["patch_nums"])
    top_k = min(STAGE1.top_k, var_cfg.vocab_size // 4)  # the miniature's V is 64
    settings = {k: s.with_overrides(top_k=top_k) for k, s in
                (("stage1", STAGE1), ("target", TARGET), ("evaluation", EVALUATION))}
    return new_teacher(var_cfg, vae_cfg, seed=0, variant_name=variant.name, lively=False, **settings).to(device)


class RandomTeachers:
    """The throw-away plugin: `var-d16-random` and `var-mini-random`, no weight files."""

    def __init__(self) -> None:
        from dd2cli import hookimpl

        self.dd2_register_teachers = hookimpl(self._register)

    @staticmethod
    def _register(register) -> None:
        from dd2cli.teachers import Family, Variant

        variants = tuple(Variant(name=f"var-{tag}-random", description=f"VAR {tag}, random weights (benchmarks)",
                                 loader=_load, image_size=size, options={"depth": depth})
                         for tag, depth, size in (("d16", 16, 256), ("mini", 0, 16)))
        register(Family(name="bench-random", description="random-weight teachers for benchmarks",
                        variants=variants))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="var-mini-random", choices=["var-d16-random", "var-mini-random"])
    ap.add_argument("--out", required=True, help="run directory (must not exist)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--stage1-steps", type=int, default=2)
    ap.add_argument("--stage2-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args(argv)

    from dd2cli import plugins
    from dd2cli.cli import main as dd2_main

    plugins.register_plugin(RandomTeachers(), name="bench-random")
    cli = ["--quiet", "distill", "--teacher", args.teacher, "--out", args.out,
           "--set", f"device={args.device}", "--set", f"precision={args.precision}",
           "--set", f"stage1.steps={args.stage1_steps}", "--set", f"stage2.steps={args.stage2_steps}",
           "--set", f"stage1.batch_size={args.batch_size}", "--set", f"stage2.batch_size={args.batch_size}",
           "--set", "stage1.head_only_steps=0", "--set", "stage1.warmup_steps=1", "--set", "stage2.warmup_steps=1"]
    t0 = time.perf_counter()
    sys.argv = ["dd2", *cli]
    try:
        dd2_main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    grid = Path(args.out) / "samples" / "final.png"
    if not grid.is_file():
        sys.exit(f"distillation smoke test: {grid} was not written")
    print(f"distillation smoke test passed: {args.teacher}, {args.stage1_steps} stage-1 + {args.stage2_steps} "
          f"stage-2 iterations on {args.device} ({args.precision}) in {time.perf_counter() - t0:.1f} s; run in "
          f"{args.out}")


if __name__ == "__main__":
    main()
