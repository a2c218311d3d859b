"""VAR teacher speed on CPU at real size (random weights, official config, fp32).

    python benchmarks/bench_var_teacher.py                    # VAR-d16, batch 1 and 8, median of 3
    python benchmarks/bench_var_teacher.py --depth 20 --batch-sizes 1 --repeats 1

Measures, side by side:
- one 10-step AR sample with classifier-free guidance (KV cache, batch doubled to [cond; null]),
  excluding and including the VQVAE decode to 256×256 pixels;
- one teacher-forced pass over all 680 tokens (what DD2 needs per sequence for p_i), alone and as
  the conditional + unconditional pair used with guidance.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import time_runs  # noqa: E402

from dd2_var import EVALUATION
from dd2_var.config import vae_config, var_config
from dd2_var.teacher import new_teacher


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = time_runs(fn, repeats)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    var_cfg = var_config(args.depth)
    teacher = new_teacher(var_cfg, vae_config(var_cfg.patch_nums), seed=0, variant_name=f"var-d{args.depth}-random",
                          lively=False)
    n_var = sum(p.numel() for p in teacher.var.parameters())
    n_vae = sum(p.numel() for p in teacher.vae.parameters())
    print(f"VAR-d{args.depth} random weights: transformer {n_var:,} params, VQVAE {n_vae:,} params "
          f"(built in {time.perf_counter() - t0:.1f}s)")
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
          f"fp32, median of {args.repeats}; sampling cfg={EVALUATION.cfg} top_k={EVALUATION.top_k} "
          f"top_p={EVALUATION.top_p}")

    rows = []
    L = teacher.spec.num_tokens
    with torch.no_grad():
        for B in args.batch_sizes:
            labels = torch.arange(B) % var_cfg.num_classes
            gen = torch.Generator().manual_seed(0)
            sample_runs, full_runs = [], []
            for _ in range(args.repeats):
                # incl. decode = this run's sample time + the decode of its tokens
                t0 = time.perf_counter()
                tokens = teacher.sample(labels, EVALUATION, generator=gen)
                t1 = time.perf_counter()
                teacher.decode(tokens)
                t2 = time.perf_counter()
                sample_runs.append(t1 - t0)
                full_runs.append(t2 - t0)
            rows.append((f"AR sample, {var_cfg.num_scales} steps, CFG", B, statistics.median(sample_runs),
                         statistics.median(full_runs), sample_runs, full_runs))

        tokens = torch.randint(0, var_cfg.vocab_size, (2, L), generator=torch.Generator().manual_seed(1))
        labels = torch.tensor([1, var_cfg.num_classes])
        one_s, one_runs = _median_time(lambda: teacher.logits(tokens[:1], labels[:1]), args.repeats)
        pair_s, pair_runs = _median_time(lambda: teacher.logits(tokens, labels), args.repeats)

    print()
    print(f"{'what':<34} {'batch':>5} {'excl. decode':>13} {'incl. decode':>13}   runs (s)")
    for what, B, excl, incl, r1, r2 in rows:
        runs = ", ".join(f"{t:.2f}" for t in r1) + " | " + ", ".join(f"{t:.2f}" for t in r2)
        print(f"{what:<34} {B:>5} {excl:>12.2f}s {incl:>12.2f}s   {runs}")
    print(f"{f'teacher-forced pass, {L} tokens':<34} {1:>5} {one_s:>12.2f}s {'-':>13}   "
          + ", ".join(f"{t:.2f}" for t in one_runs))
    print(f"{'teacher-forced pass, cond + null':<34} {2:>5} {pair_s:>12.2f}s {'-':>13}   "
          + ", ".join(f"{t:.2f}" for t in pair_runs))


if __name__ == "__main__":
    main()
