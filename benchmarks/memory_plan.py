"""The memory plan (`dd2 distill --dry-run`) against measured peaks at real shapes on CPU.

    python benchmarks/memory_plan.py                                  # llamagen-b and var-d16, batch 1, 2, 4
    python benchmarks/memory_plan.py --teachers llamagen-b --batches 1,2 --json-out plan.json

Each row is one fresh process that runs two updates of one stage through the engine (`dd2cli.engine.distill.run`)
on the variant's skeleton with its initial (random) weights, so no weight file is needed: stage 1 (GTS, backbone
training), the flow-map phase, or stage 2 (one guidance and one generator update each), fp32, one process. The
measured number is the process's peak resident memory less what it held after its imports (the interpreter and
torch's libraries); glibc is told to return freed blocks to the system at once (MALLOC_MMAP_THRESHOLD_), so the
peak follows the live tensors. The predicted number is the plan's per-rank total for the same settings.

The activation factor (`dd2cli.engine.memory.ACTIVATION_FACTOR`) is the measured growth per sequence (the slope
over the batch sizes) over the traced bytes per sequence; the table shows the prediction error with the factor
in use and prints the factor these measurements imply.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("stage1", "flow_init", "stage2")
COMMON = ["run.sample_every=0", "run.eval_samples=0", "run.grid_per_class=1", "run.checkpoint_every=1000", "run.log_every=1",
          "device=cpu", "precision=fp32", "parallel=ddp", "activation_checkpointing=false", "stage1.head_only_steps=0",
          "stage1.cache_sequences=0", "adapt.steps=0"]


def stage_overrides(stage: str, batch: int) -> tuple[list[str], str]:
    """`--set` values that run two updates of `stage` alone, and the `--stage` to stop after."""
    if stage == "stage1":
        return ["stage1.steps=2", f"stage1.batch_size={batch}", "flow_init.steps=0"], "1"
    if stage == "flow_init":
        return ["stage1.steps=0", "flow_init.steps=2", f"flow_init.batch_size={batch}", "flow_init.euler_steps=2",
                "flow_init.warmup_steps=0"], "1"
    return ["stage1.steps=0", "flow_init.steps=0", "stage2.steps=2", f"stage2.batch_size={batch}",
            "stage2.guidance_updates=1", "stage2.warmup_steps=0", "stage2.align_at=0"], "all"


class SkeletonTeachers:
    """A plugin whose variants `NAME-skeleton` load NAME's skeleton on the CPU (its initial weights, no file)."""

    def __init__(self, variants: list) -> None:
        from dataclasses import replace

        from dd2cli import hookimpl
        from dd2cli.teachers import Family

        def load(variant, weight_paths, device):
            real = variant.options["of"]
            return real.skeleton(real).to(device).eval().requires_grad_(False)

        family = Family(name="skeletons", description="variants' skeletons (benchmarks)", variants=tuple(
            replace(v, name=f"{v.name}-skeleton", loader=load, weights=(), family="", options={**v.options, "of": v})
            for v in variants))

        def dd2_register_teachers(register) -> None:
            register(family)

        self.dd2_register_teachers = hookimpl(dd2_register_teachers)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_so_far() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(teacher: str, stage: str, batch: int, out: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from dd2cli import plugins
    from dd2cli.engine import distill
    from dd2cli.engine.distill import DistillRequest, run
    from dd2cli.engine.progress import Progress

    plugins.register_plugin(SkeletonTeachers([plugins.get_variant(teacher)]), name="skeletons")
    # the peak of the updates: what the process had reached when the stage's last checkpoint write begins (after
    # it come the checkpoint and the sample grid, whose decoder is not part of the plan)
    peaks: list[int] = []
    write = distill._Run.checkpoint

    def checkpoint(self, *args, **kwargs):
        peaks.append(_peak_so_far())
        return write(self, *args, **kwargs)

    distill._Run.checkpoint = checkpoint
    # what the run imports on its way (the family's model code, checkpoint and image libraries) belongs to the
    # start-up footprint, not to the plan: import it before taking that footprint
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    real = plugins.get_variant(teacher)
    with torch.device("meta"):
        real.skeleton(real)
    base = _rss()
    sets, stop = stage_overrides(stage, batch)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run(DistillRequest(teacher=f"{teacher}-skeleton", out=Path(tmp) / "run", stage=stop,
                           overrides=tuple(COMMON + sets)), progress=Progress())
    out.write_text(json.dumps({"base": base, "peak": peaks[-1], "seconds": time.perf_counter() - t0}))


def predicted(teacher: str, stage: str, batch: int):
    """The plan's one-process fp32 total for the same settings, and the traced activation bytes per sequence."""
    from dd2cli.config import resolve_layers
    from dd2cli.engine.memory import memory_plan
    from dd2cli.plugins import get_variant
    from dd2cli.settings import DistillSettings

    variant = get_variant(teacher)
    sets, _ = stage_overrides(stage, batch)
    overrides = dict(kv.split("=", 1) for kv in COMMON + sets)
    from dd2cli.config import config_layers

    settings, _ = resolve_layers(DistillSettings, [("variant", dict(variant.distill_defaults)),
                                                   *config_layers(None, tuple(f"{k}={v}" for k, v in overrides.items()))])
    plan = memory_plan(variant, settings, nproc=1)
    st = next(s for s in plan.stages if s.key == stage)
    mem = plan.per_rank(st, "ddp", "fp32", False)
    return mem, max(a.per_sample("fp32", False) for _, a in st.updates)


def _available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", default="llamagen-b,var-d16")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--child", nargs=4, metavar=("TEACHER", "STAGE", "BATCH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        teacher, stage, batch, out = args.child
        child(teacher, stage, int(batch), Path(out), args.threads)
        return 0
    from dd2cli.engine.memory import ACTIVATION_FACTOR, GB

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "DD2_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    rows, failed = [], False
    print(f"{'teacher':<11} {'stage':<10} {'batch':>5} {'predicted':>10} {'measured':>9} {'error':>7} "
          f"{'act/seq':>8} {'time':>6}")
    for teacher in args.teachers.split(","):
        for stage in args.stages.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                mem, per_seq = predicted(teacher, stage, batch)
                row = {"teacher": teacher, "stage": stage, "batch": batch, "predicted": mem.total,
                       "held": mem.held, "activations": mem.activations, "workspace": mem.workspace,
                       "traced_per_sequence": per_seq / ACTIVATION_FACTOR}
                if mem.total * 1.3 > _available():  # measured numbers, never a swap-bound guess
                    row["status"] = f"skipped: needs about {mem.total * 1.3 / GB:.1f} GB, {_available() / GB:.1f} free"
                    rows.append(row)
                    print(f"{teacher:<11} {stage:<10} {batch:>5} {mem.total / GB:>9.2f}G {row['status']}")
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "m.json"
                    proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", teacher,
                                           stage, str(batch), str(out)], env=env, capture_output=True, text=True)
                    if proc.returncode != 0 or not out.is_file():
                        failed = True
                        row["status"] = "FAILED: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
                        rows.append(row)
                        print(f"{teacher:<11} {stage:<10} {batch:>5} {row['status']}", flush=True)
                        continue
                    got = json.loads(out.read_text())
                measured = got["peak"] - got["base"]
                row.update(status="ok", measured=measured, base=got["base"], seconds=got["seconds"],
                           error=(mem.total - measured) / measured)
                rows.append(row)
                print(f"{teacher:<11} {stage:<10} {batch:>5} {mem.total / GB:>9.2f}G {measured / GB:>8.2f}G "
                      f"{row['error']:>+7.1%} {per_seq / GB:>7.3f}G {got['seconds']:>5.0f}s", flush=True)
    # the factor these measurements imply: measured growth per sequence over traced bytes per sequence
    implied = []
    for teacher in args.teachers.split(","):
        for stage in args.stages.split(","):
            ok = sorted((r for r in rows if r["teacher"] == teacher and r["stage"] == stage and r["status"] == "ok"),
                        key=lambda r: r["batch"])
            # (the two largest batches: at small ones the optimiser step's temporaries, not the activations, can
            # set the peak)
            if len(ok) >= 2 and ok[-1]["batch"] > ok[-2]["batch"]:
                slope = (ok[-1]["measured"] - ok[-2]["measured"]) / (ok[-1]["batch"] - ok[-2]["batch"])
                implied.append({"teacher": teacher, "stage": stage, "factor": slope / ok[-1]["traced_per_sequence"]})
    for f in implied:
        print(f"implied activation factor, {f['teacher']} {f['stage']}: {f['factor']:.2f}")
    errors = [abs(r["error"]) for r in rows if r["status"] == "ok"]
    if errors:
        print(f"factor in use {ACTIVATION_FACTOR}; prediction error: median {sorted(errors)[len(errors) // 2]:.1%}, "
              f"worst {max(errors):.1%} over {len(errors)} measurements")
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "implied_factors": implied,
                                             "factor": ACTIVATION_FACTOR}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
