"""How long the memory plan takes: `dd2 distill --dry-run` as a user runs it, and the trace with and without
replaying repeated blocks, side by side.

    python benchmarks/bench_dry_run.py                    # var-d20 on 8 GPUs of 80 GB, the README's command
    python benchmarks/bench_dry_run.py --repeats 3 --teacher llamagen-b --config ""

Part 1 starts the command as its own process `--repeats` times (no weight file anywhere: the plan is built from
the family's skeleton on the meta device) and prints the median wall and CPU seconds of the whole process, start-up
and torch's import included. Part 2 plans the same run in this process, alternately with each repeated backbone
block traced once and replayed (`replay_blocks=True`, what the command does) and with every block traced
(`False`), and prints the median of each and their ratio, after one unmeasured plan that pays the imports.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command_times(argv: list[str], repeats: int) -> list[tuple[float, float]]:
    """(wall, user + system CPU) seconds of each run of `argv` as a child process."""
    out = []
    with tempfile.TemporaryDirectory() as empty:
        env = {**os.environ, "DD2_WEIGHTS_DIR": empty, "DD2_OFFLINE": "1", "HF_HUB_CACHE": empty}
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                sys.exit(f"the command failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            out.append((wall, cpu))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="var-d20")
    ap.add_argument("--config", default="examples/configs/var-d16.toml", help='"" for the variant\'s defaults')
    ap.add_argument("--nproc", type=int, default=8)
    ap.add_argument("--gpu-memory", default="80GB")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    config = ["--config", args.config] if args.config else []
    argv = [sys.executable, "-m", "dd2cli", "distill", "--teacher", args.teacher, *config, "--dry-run",
            "--nproc", str(args.nproc), "--gpu-memory", args.gpu_memory]
    print("$ dd2 " + " ".join(argv[3:]))
    runs = command_times(argv, args.repeats)
    walls, cpus = [w for w, _ in runs], [c for _, c in runs]
    print(f"whole process, {len(runs)} runs: wall median {statistics.median(walls):.2f} s "
          f"(min {min(walls):.2f}, max {max(walls):.2f}); CPU median {statistics.median(cpus):.2f} s; "
          f"load average before the last run {os.getloadavg()[0]:.2f}")

    os.environ.setdefault("DD2_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from dd2cli.config import config_layers, resolve_layers
    from dd2cli.engine.memory import memory_plan
    from dd2cli.plugins import get_variant
    from dd2cli.settings import DistillSettings

    variant = get_variant(args.teacher)
    settings, _ = resolve_layers(DistillSettings, [("variant", dict(variant.distill_defaults)),
                                                   *config_layers(str(ROOT / args.config) if args.config else None,
                                                                  ())])
    memory_plan(variant, settings, nproc=args.nproc)  # imports and the first meta kernels, not measured
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for replay in (True, False):  # interleaved: a slow spell of the machine hits both
            start = time.perf_counter()
            memory_plan(variant, settings, nproc=args.nproc, replay_blocks=replay)
            times[replay].append(time.perf_counter() - start)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"plan in process, {args.repeats} runs each: blocks replayed {on:.2f} s, every block traced {off:.2f} s "
          f"(median; {off / on:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
