"""Fidelity on a family of exact teachers: how close one step (and two) comes to the teacher's joint.

    python benchmarks/fidelity.py                        # 6 generated teachers, the shipped recipe, ~1 CPU-hour
    python benchmarks/fidelity.py --teachers 2 --quick   # a few minutes: short distillations, 2,000 samples
    python benchmarks/fidelity.py --set stage2.steps=600 # a recipe variation, on every teacher

Each teacher (`dd2_exact.model.shape_family`: raster and scale orders, 3–6 codes, separated / clustered /
anisotropic codebooks, several correlation strengths) is distilled with `dd2 distill` and the exact family's
recipe (`dd2_exact.EXACT_TEACHER_DEFAULTS`, `--set` changes it), one torch thread per run, `--jobs` runs side by
side. Then, with `--samples` per class: the total variation to the exact joint of the one-step generator (EMA)
and of two steps (the teacher re-samples the last AR step, paper Alg. 4), the noise floor (the TV of as many
draws from the exact joint itself), the set-prediction baseline (exact), and the worst per-AR-step conditional
error of one step (`dd2cli.engine.joint`). The summary line gives the median and worst one-step TV as multiples
of the floor. Results: benchmarks/RESULTS.md; what was compared to reach the recipe: docs/experiments/fidelity.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("DD2_LOAD_PLUGINS", "")  # only the benchmark's own teachers (registered below)

from dd2cli import hookimpl  # noqa: E402  (torch-free)

QUICK = ["stage1.steps=100", "flow_init.steps=100", "stage2.steps=50"]


class _BenchFamily:
    """Registers `exact-bench-I` for the first `count` shapes of `shape_family(count, seed)`."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed = count, seed

    @hookimpl
    def dd2_register_teachers(self, register):
        from dd2_exact import EXACT_TEACHER_DEFAULTS, FAMILY, _load
        from dd2_exact.model import shape_family
        from dd2cli import Family, Variant

        variants = tuple(Variant(name=f"exact-bench-{i}", description=_describe(shape), loader=_load,
                                 image_size=shape.image_size, options=shape.as_options(),
                                 distill_defaults=EXACT_TEACHER_DEFAULTS)
                         for i, shape in enumerate(shape_family(self.count, self.seed)))
        register(Family(name="exact-bench", description="fidelity benchmark teachers", variants=variants,
                        bundle_factories=FAMILY.bundle_factories))


def _describe(shape) -> str:
    steps = "+".join(map(str, shape.tokens_per_step))
    return (f"{steps} tokens, V={shape.vocab_size}, d={shape.latent_dim}, {shape.geometry}, "
            f"strength {shape.strength:g}, {shape.num_classes} classes")


def _register(count: int, seed: int) -> None:
    from dd2cli import plugins

    plugins.register_plugin(_BenchFamily(count, seed), name="exact-bench")


def _cli(count: int, seed: int, argv: list[str]) -> None:
    """`python fidelity.py --cli COUNT SEED -- dd2 arguments`: the dd2 CLI with the benchmark teachers."""
    import torch

    torch.set_num_threads(1)
    _register(count, seed)
    from dd2cli.cli import main

    sys.argv = ["dd2", *argv]
    main()


def _score(run_dir: Path, samples: int, seed: int) -> dict:
    import torch

    from dd2cli.engine.joint import joint_report
    from dd2cli.engine.runs import load_generator_from_run

    gen, teacher, _ = load_generator_from_run(run_dir, which="ema")
    spec, target = teacher.spec, teacher.spec.target
    labels_M = torch.arange(spec.num_classes).repeat_interleave(samples)
    g = torch.Generator().manual_seed(seed)
    one, two = [], []
    with torch.no_grad():
        for start in range(0, len(labels_M), 4096):
            lab = labels_M[start:start + 4096]
            eps = torch.randn(len(lab), spec.num_tokens, spec.latent_dim, generator=g)
            tokens = teacher.as_tokens(gen(eps, lab))
            one.append(tokens)
            two.append(teacher.sample(lab, target, prefix_BN=tokens, start_step=spec.num_steps - 1, generator=g))
    r1 = joint_report(teacher, torch.cat(one), labels_M, target, seed=seed)
    r2 = joint_report(teacher, torch.cat(two), labels_M, target, seed=seed)
    return {"floor": r1.noise_floor, "baseline": r1.set_prediction, "one_step": r1.tv, "two_step": r2.tv,
            "one_step_step_errors": r1.step_errors, "worst_step_error": max(r1.step_errors),
            "worst_step": r1.step_errors.index(max(r1.step_errors))}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--cli":
        count, seed = int(sys.argv[2]), int(sys.argv[3])
        return _cli(count, seed, sys.argv[5:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", type=int, default=6, help="How many generated teachers (the first 6 are fixed).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the teacher family.")
    ap.add_argument("--only", default="", help="Comma list of teacher indices to run (e.g. 2,5): a quick look at a few.")
    ap.add_argument("--samples", type=int, default=20000, help="Samples per class for every TV.")
    ap.add_argument("--jobs", type=int, default=2, help="Distillations side by side (one thread each).")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE recipe change (repeatable).")
    ap.add_argument("--quick", action="store_true", help="Short distillations and 2,000 samples: a smoke run.")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity"), help="Runs and results here.")
    ap.add_argument("--json-out", type=Path, default=None, help="Results file (default: OUT/fidelity.json).")
    args = ap.parse_args()
    sets = (QUICK if args.quick else []) + args.sets
    samples = 2000 if args.quick and args.samples == 20000 else args.samples
    args.out.mkdir(parents=True, exist_ok=True)

    picked = [int(i) for i in args.only.split(",") if i.strip()] or list(range(args.teachers))
    if any(not 0 <= i < args.teachers for i in picked):
        sys.exit(f"--only {args.only}: indices must be in 0..{args.teachers - 1}")
    names = [f"exact-bench-{i}" for i in picked]
    pending, running, seconds, cpu_seconds = list(names), {}, {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            run_dir = args.out / name
            argv = ["--quiet", "distill", "--teacher", name, "--set", "threads=1", "--set", "run.sample_every=0",
                    *[x for s in sets for x in ("--set", s)]]
            argv += ["--resume", str(run_dir)] if (run_dir / "config.json").is_file() else ["--out", str(run_dir)]
            log = open(args.out / f"{name}.log", "w")
            proc = subprocess.Popen([sys.executable, __file__, "--cli", str(args.teachers), str(args.seed), "--",
                                     *argv], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            running[name] = (proc, time.perf_counter(), log)
        time.sleep(1)
        for name, (proc, t0, log) in list(running.items()):
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # (the child's own CPU time, not its neighbours')
            if pid == 0:
                continue
            log.close()
            del running[name]
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                sys.exit(f"dd2 distill on {name} failed (exit {code}); see {args.out / (name + '.log')}")
            seconds[name] = time.perf_counter() - t0
            cpu_seconds[name] = usage.ru_utime + usage.ru_stime
            print(f"{name}: distilled in {seconds[name]:.0f} s ({cpu_seconds[name]:.0f} CPU-s)", file=sys.stderr)

    import torch

    torch.set_num_threads(1)
    _register(args.teachers, args.seed)
    from dd2cli.plugins import get_variant

    rows = []
    for i, name in zip(picked, names):
        row = {"teacher": name, "shape": get_variant(name).description, "distill_s": seconds.get(name),
               "distill_cpu_s": cpu_seconds.get(name),
               **_score(args.out / name, samples, seed=1000 + i)}
        rows.append(row)
    print(f"\nFidelity on {len(rows)} exact teachers, {samples} samples per class, recipe: exact-teacher defaults"
          f"{' + ' + ' '.join(sets) if sets else ''}\n")
    head = f"{'teacher':14} {'floor':>6} {'set-pred':>8} {'1 step':>7} {'×floor':>6} {'2 steps':>7} {'×floor':>6} " \
           f"{'worst step err':>15} {'CPU-min':>7}  shape"
    print(head)
    for r in rows:
        print(f"{r['teacher']:14} {r['floor']:6.3f} {r['baseline']:8.3f} {r['one_step']:7.3f} "
              f"{r['one_step'] / r['floor']:6.2f} {r['two_step']:7.3f} {r['two_step'] / r['floor']:6.2f} "
              f"{r['worst_step_error']:8.3f} (s{r['worst_step']}) {(r['distill_cpu_s'] or 0) / 60:7.1f}  {r['shape']}")
    one = [r["one_step"] / r["floor"] for r in rows]
    two = [r["two_step"] / r["floor"] for r in rows]
    summary = {"one_step_median_x_floor": statistics.median(one), "one_step_worst_x_floor": max(one),
               "two_step_median_x_floor": statistics.median(two), "two_step_worst_x_floor": max(two)}
    print(f"\none step: median {summary['one_step_median_x_floor']:.2f}× the noise floor, worst "
          f"{summary['one_step_worst_x_floor']:.2f}×; two steps: median {summary['two_step_median_x_floor']:.2f}×, "
          f"worst {summary['two_step_worst_x_floor']:.2f}×")
    out = args.json_out or args.out / "fidelity.json"
    out.write_text(json.dumps({"samples_per_class": samples, "sets": sets, "rows": rows, "summary": summary}, indent=2))
    print(f"Written: {out}")


if __name__ == "__main__":
    main()
