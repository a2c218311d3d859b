"""dd2 benchmarks, one entry point: sampling, training steps and the closed-form score, side by side.

    python benchmarks/run.py                     # CPU: digits variants, VAR-d16 and GPT-B (random weights)
    python benchmarks/run.py --quick             # < 3 min on a 2-core CPU; CI runs it to keep the code alive
    python benchmarks/run.py --device cuda --precision bf16 [--compile]   # GPU: adds GPT-L, real VAR-d16 training

Prints one table per section and writes everything as JSON (`--json-out`, default
benchmarks/results/latest.json). Ratios are what to compare; absolute times only mean something
on a GPU. Sections (`--only`):

- sampling: the one-step generator (untrained, the architecture `dd2 distill` builds) against the
  teacher's KV-cached AR sampler with CFG at the evaluation settings, batch 1 and a large batch;
  token generation and the tokenizer decode are timed apart, so the table shows both
  "excl. decode" and "incl. decode" (= generation + decode);
- training: one stage-1, guidance and generator step as a ratio to a plain backbone forward +
  backward, with peak memory and tokens/s (bench_distill_steps);
- closed-form: the denoiser dense vs chunked vs top-k support, forward and gradient, with a
  float64 reference (bench_closed_form).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SECTIONS = ("sampling", "training", "closed-form")
QUICK_MODELS = ("var-digits", "llamagen-digits")
CPU_MODELS = QUICK_MODELS + ("var-d16", "llamagen-b")
GPU_MODELS = CPU_MODELS + ("llamagen-l",)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and one repeat (CI)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: CUDA autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile the one-step generator")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--models", default="", help="sampling subjects, comma list (default depends on --quick/--device)")
    ap.add_argument("--batch-sizes", default="", help="sampling batch sizes, e.g. 1,8 (default 1,8 on CPU, 1,64 GPU)")
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats, median reported (default 3; 1 quick)")
    ap.add_argument("--train-config", default="", choices=["", "mini", "d16"], help="training-step teacher "
                    "(default: d16 on CUDA, mini on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json-out", default=str(HERE / "results" / "latest.json"), help="where to write the results")
    return ap


def _defaults(args) -> None:
    cuda = args.device.startswith("cuda")
    if not args.models:
        args.models = ",".join(QUICK_MODELS if args.quick else GPU_MODELS if cuda else CPU_MODELS)
    if not args.batch_sizes:
        args.batch_sizes = "1,4" if args.quick else "1,64" if cuda else "1,8"
    if not args.repeats:
        args.repeats = 1 if args.quick else 3
    if not args.train_config:
        args.train_config = "d16" if cuda and not args.quick else "mini"


# ---- sampling --------------------------------------------------------------------------------------

def sampling(args) -> list[dict]:
    """One row per (model, batch): generation and decode seconds of teacher and one-step generator."""
    import torch
    from _measure import timeit
    from bench_sampling_speed import build_subject

    from dd2cli.engine.runtime import sampling_context
    from dd2cli.engine.speed import time_sampling

    rows = []
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for name in args.models.split(","):
        t0 = time.perf_counter()
        teacher, gen, label = build_subject(name, args.device)
        built_s = time.perf_counter() - t0
        spec = teacher.spec
        # 1. token generation only: the teacher's AR sampler vs the one-step generator
        speed = time_sampling(teacher, gen, args.device, batch_sizes, warmup=1, repeats=args.repeats,
                              precision=args.precision, compile=args.compile, decode=False)
        by_batch = {}
        for r in speed:
            by_batch.setdefault(r.batch_size, {})["teacher" if r.mode.startswith("teacher") else "generator"] = r
        for bs in batch_sizes:
            # 2. the tokenizer decode of a batch of tokens, timed on its own
            tokens = torch.randint(0, spec.vocab_size, (bs, spec.num_tokens), device=args.device)

            def decode(teacher=teacher, tokens=tokens):  # (bound now: the loop rebinds both)
                with sampling_context(args.precision, args.device):
                    return teacher.decode(tokens)

            dec_s = timeit(decode, repeats=args.repeats, warmup=1, device=args.device)
            teach_s = by_batch[bs]["teacher"].latency_ms / 1e3
            gen_s = by_batch[bs]["generator"].latency_ms / 1e3
            rows.append({
                "model": label, "tokens": spec.num_tokens, "ar_steps": spec.num_steps, "batch": bs,
                "sampling": spec.evaluation.as_dict(), "built_s": built_s,
                "teacher_s": teach_s, "generator_s": gen_s, "decode_s": dec_s,
                "teacher_incl_decode_s": teach_s + dec_s, "generator_incl_decode_s": gen_s + dec_s,
                "speedup_excl_decode": teach_s / gen_s,
                "speedup_incl_decode": (teach_s + dec_s) / (gen_s + dec_s),
                "teacher_images_per_s": bs / (teach_s + dec_s), "generator_images_per_s": bs / (gen_s + dec_s),
            })
            print_sampling_row(rows[-1], header=len(rows) == 1)
        del teacher, gen
    return rows


def print_sampling_row(r: dict, header: bool = False) -> None:
    if header:
        print(f"\n{'model':<28}{'batch':>6}{'teacher s':>11}{'1-step s':>10}{'decode s':>10}{'speed-up':>10}"
              f"{'incl. dec':>11}{'teacher img/s':>15}{'1-step img/s':>14}")
    print(f"{r['model']:<28}{r['batch']:>6}{r['teacher_s']:>11.3f}{r['generator_s']:>10.4f}{r['decode_s']:>10.3f}"
          f"{r['speedup_excl_decode']:>9.1f}x{r['speedup_incl_decode']:>10.1f}x"
          f"{r['teacher_images_per_s']:>15.2f}{r['generator_images_per_s']:>14.2f}", flush=True)


# ---- training and the closed-form score (the existing scripts, called as functions) ----------------

def _sized(ns, args):
    """A section script's arguments with run.py's size: batch 2 and one repeat in --quick, else --repeats."""
    if args.quick:
        ns.batch, ns.repeats = 2, 1
    else:
        ns.repeats = args.repeats
    return ns


def training(args) -> dict:
    import bench_distill_steps

    ns = _sized(bench_distill_steps.parser().parse_args(["--device", args.device, "--config", args.train_config,
                                                         "--precision", args.precision]), args)
    result = bench_distill_steps.run(ns)
    print()
    bench_distill_steps.print_table(result, args.device)
    return result


def closed_form(args) -> dict:
    import bench_closed_form

    ns = _sized(bench_closed_form.parser().parse_args(["--device", args.device]), args)
    results = bench_closed_form.run(ns)
    print()
    bench_closed_form.print_table(results, ns)
    return {"shape": {k: getattr(ns, k) for k in ("batch", "n", "V", "d", "k", "chunk")}, "results": results}


# ---- driver ----------------------------------------------------------------------------------------

def machine(args) -> dict:
    import torch

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "device": args.device,
            "precision": args.precision, "compile": args.compile, "quick": args.quick}
    if hasattr(os, "getloadavg"):
        info["load_average"] = os.getloadavg()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    _defaults(args)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}.")
    import torch

    from dd2cli.engine.runtime import check_precision
    from dd2cli.errors import DD2Error

    try:
        check_precision(args.precision, args.device)
    except DD2Error as exc:
        sys.exit(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"machine": machine(args), "args": vars(args)}
    print(" ".join(f"{k}={v}" for k, v in out["machine"].items()))
    t0 = time.perf_counter()
    if "sampling" in sections:
        out["sampling"] = sampling(args)
    if "training" in sections:
        out["training"] = training(args)
    if "closed-form" in sections:
        out["closed_form"] = closed_form(args)
    out["seconds"] = time.perf_counter() - t0
    path = Path(args.json_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\n{out['seconds']:.0f} s; results written to {path}")


if __name__ == "__main__":
    main()
