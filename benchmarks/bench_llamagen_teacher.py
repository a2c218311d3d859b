"""LlamaGen teacher speed: KV-cached AR sampling vs one teacher-forced pass, real GPT-B size.

    python benchmarks/bench_llamagen_teacher.py                 # CPU, fp32, GPT-B 256 px, random weights
    python benchmarks/bench_llamagen_teacher.py --size L --batch 1 8 --repeats 3 --threads 2

Side by side (median of `--repeats` runs each):
- `sample`: `teacher.sample` with CFG (batch doubled, cond-first), cfg 2.0 / top-k 8000 (the
  paper's evaluation setting), 256 KV-cached steps;
- `teacher-forced`: one `teacher.logits` pass over 256 tokens (what DD2 training calls per sequence).

Weights are random (timing does not depend on them); the tokenizer is a small stand-in with the
same codebook size, because sampling never runs it. Reference for upstream LlamaGen on the
development CPU: 10.8 s for one 256-step CFG sample at batch 1, 0.31 s teacher-forced.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import time_runs  # noqa: E402

from dd2_llamagen.gpt import GPTConfig, LlamaGenGPT
from dd2_llamagen.teacher import LlamaGenTeacher
from dd2_llamagen.vq import VQConfig, VQModel
from dd2cli.teachers import SamplingSettings

UPSTREAM_SAMPLE_B1_S = 10.8
UPSTREAM_TEACHER_FORCED_B1_S = 0.31


def build_teacher(size: str, image_size: int, device: str, real_tokenizer: bool = False) -> LlamaGenTeacher:
    """A GPT-{size} with random weights; `real_tokenizer`: the released VQ-16 architecture (random
    weights) so that decode times are real, else a small stand-in (sampling only reads its codebook).

    The continuous-input adapter is built without fitting (`adapter_fit_steps=0`, fixed β): at
    V = 16384 the fit takes minutes, and the generator's speed does not depend on its weights.
    """
    torch.manual_seed(0)
    cfg = GPTConfig.named(size, image_size)
    with torch.device("meta"):
        gpt = LlamaGenGPT(cfg)
    gpt = gpt.to_empty(device=device)
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    gpt.reset_rope(device)
    if real_tokenizer:
        vq = VQModel(VQConfig(codebook_size=cfg.vocab_size)).to(device)
    else:
        vq = VQModel(VQConfig(codebook_size=cfg.vocab_size, ch=32, ch_mult=(1, 1, 1, 1, 1), z_channels=32,
                              num_res_blocks=1)).to(device)
    return LlamaGenTeacher(gpt, vq, variant_name=f"llamagen-{size.lower()}-random", image_size=image_size,
                           adapter_beta=10.0, adapter_fit_steps=0).eval().requires_grad_(False)


def streaming_floor(teacher: LlamaGenTeacher, repeats: int) -> tuple[float, float]:
    """(bytes of weights each decoding step must read, seconds to stream that many bytes now).

    Decoding a token is a matrix-vector product per weight matrix: the CPU is bound by memory
    bandwidth, so `sum()` over a buffer of the same size, timed now, is the floor of one step on
    this (possibly shared, busy) machine.
    """
    step_bytes = sum(p.numel() * p.element_size() for n, p in teacher.gpt.named_parameters()
                     if p.dim() == 2 and "embedding" not in n)
    buf = torch.ones(step_bytes // 4)
    return step_bytes, min(time_runs(lambda: buf.sum(), max(repeats, 5), "cpu"))


def weight_matmuls_only(teacher: LlamaGenTeacher, rows: int, steps: int):
    """A function running, `steps` times, just the matrix products one decoding step must do.

    Every `nn.Linear` of the GPT (all blocks and the output head) applied in model order to a
    `(rows, in_features)` input: the sampler's work with everything else (norms, RoPE, attention,
    cache writes, CFG mixing, top-k, drawing) removed. No sampler, however lean, can beat it, so
    its time, in teacher-forced passes measured alongside, bounds what any loop built on PyTorch's
    matrix products can reach here.
    """
    linears = [m for m in teacher.gpt.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, m.in_features, device=m.weight.device) for m in linears]

    def run() -> None:
        for _ in range(steps):
            for m, x in zip(linears, inputs):
                m(x)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="B", choices=["B", "L", "XL", "XXL", "3B"])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--top-k", type=int, default=8000)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher = build_teacher(args.size, args.image_size, args.device)
    n = teacher.spec.num_tokens
    settings = SamplingSettings(cfg=args.cfg, top_k=args.top_k, top_p=1.0)
    print(f"GPT-{args.size} {args.image_size}px ({n} tokens), {sum(p.numel() for p in teacher.gpt.parameters()):,} "
          f"params, fp32, device {args.device}, {torch.get_num_threads()} threads, cfg {args.cfg} top-k {args.top_k}")
    rows = []
    with torch.no_grad():
        for B in args.batch:
            labels = torch.arange(B, device=args.device) % teacher.spec.num_classes
            gen = torch.Generator(device=args.device).manual_seed(0)
            tokens = teacher.sample(labels, settings, generator=gen)  # warm-up, and tokens for the pass
            matmuls = weight_matmuls_only(teacher, 2 * B if args.cfg != 1.0 else B, n)
            # interleaved, so that a shared machine's drift moves all three alike
            sample_s, tf_s, mm_s = [], [], []
            for _ in range(args.repeats):
                sample_s += time_runs(lambda: teacher.sample(labels, settings, generator=gen), 1, args.device)
                tf_s += time_runs(lambda: teacher.logits(tokens, labels), 1, args.device)
                mm_s += time_runs(matmuls, 1, args.device)
            rows.append((B, statistics.median(sample_s), min(sample_s), statistics.median(tf_s), min(tf_s),
                         statistics.median(mm_s)))

    print()
    print(f"| batch | {n}-step KV-cached CFG sample (s), median / min | teacher-forced {n}-token pass (s), "
          f"median / min | ratio of medians | weight matmuls alone x {n} (s) | in teacher-forced passes |")
    print("|---|---|---|---|---|---|")
    for B, s, s_min, t, t_min, mm in rows:
        print(f"| {B} | {s:.2f} / {s_min:.2f} | {t:.3f} / {t_min:.3f} | {s / t:.0f}x | {mm:.2f} | {mm / t:.1f}x |")
    if args.device == "cpu":
        step_bytes, step_s = streaming_floor(teacher, args.repeats)
        print(f"\nweights read per decoding step: {step_bytes / 1e6:.0f} MB; "
              f"streaming them now takes {step_s * 1e3:.1f} ms "
              f"({step_bytes / step_s / 1e9:.1f} GB/s) -> memory floor of {n} steps: {n * step_s:.2f} s")
    if args.size == "B" and args.image_size == 256 and args.device == "cpu":
        up_passes = UPSTREAM_SAMPLE_B1_S / UPSTREAM_TEACHER_FORCED_B1_S
        for B, s, _, t, _, mm in rows:
            if B == 1:
                print(f"\nupstream reference at batch 1 on the development CPU: sample {UPSTREAM_SAMPLE_B1_S} s, "
                      f"teacher-forced {UPSTREAM_TEACHER_FORCED_B1_S} s = {up_passes:.1f} passes.\n"
                      f"In teacher-forced passes of this run: dd2's sampler {s / t:.1f} -> {up_passes / (s / t):.2f}x "
                      f"upstream's speed; the weight matmuls alone {mm / t:.1f} -> no sampler on these matmuls can exceed "
                      f"{up_passes / (mm / t):.2f}x upstream's speed (the target asks 1.5x).")


if __name__ == "__main__":
    main()
