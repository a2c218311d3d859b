"""Cost of one DD2 training step, as a ratio to a plain forward + backward of the backbone.

    python benchmarks/bench_distill_steps.py [--device cpu|cuda] [--quick] [--config mini|d16]

A VAR-shaped teacher with random weights (default `mini`: VAR-d16's 16 blocks at width 256, 8 scales =
255 tokens, V = 512, Cvae = 16; `d16`: the real VAR-d16 transformer, 680 tokens, GPU only in practice).
The MLP head is as wide as the backbone in both (as in `examples/configs/var-d16.toml`), so the mini
keeps the real model's split of compute between backbone and head (head ≈ 11 % of the backbone's
multiply-adds per token); a shallow mini would overstate the head's share, and with it the cost of
every step that runs the head.
On the same batch it times (median of repeats) and measures peak memory of:

- the backbone baseline: `f = backbone(z, labels)`, `f.square().mean().backward()`;
- one stage-1 step (GTS loss with m draws, backward, optimiser step);
- one guidance step (generator sample without grad, FCS loss, backward, step);
- one generator step (generator with grad, teacher probabilities with CFG, closed-form score,
  guidance head, CSD loss, backward, step).
Targets: generator step ≤ 2.5×, guidance step ≤ 1.6× the backbone baseline.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _measure import mib, peak_memory, time_runs  # noqa: E402


def build(config: str, device: str):
    from dd2_var.config import VARConfig, VQVAEConfig
    from dd2_var.teacher import new_teacher

    if config == "d16":
        from dd2_var.config import vae_config, var_config

        var_cfg, vae_cfg = var_config(16), vae_config()
        top_k = 900
    else:
        pn = (1, 2, 3, 4, 5, 6, 8, 10)
        var_cfg = VARConfig(depth=16, width=256, num_heads=4, num_classes=10, vocab_size=512, z_channels=16,
                            patch_nums=pn)
        vae_cfg = VQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2), patch_nums=pn)
        top_k = 112
    from dd2cli.teachers import SamplingSettings

    target = SamplingSettings(cfg=2.0, top_k=top_k, top_p=0.95)
    teacher = new_teacher(var_cfg, vae_cfg, stage1=target, target=target, evaluation=target)
    return teacher.to(device).eval().requires_grad_(False), target


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="mini", choices=["mini", "d16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--draws", type=int, default=4, help="noise draws per position (stage 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: CUDA autocast")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json-out", default=None)
    return ap


def run(args) -> dict:
    """Times and peak memory of the four steps; returns {"rows": {name: {...}}, "shape": {...}}."""
    from dd2cli.engine.runtime import autocast, check_precision
    from dd2cli.heads import MLPHead
    from dd2cli.losses import TimestepSpec, csd_loss, fcs_loss, gts_loss
    from dd2cli.networks import ARDiffusion, Generator

    check_precision(args.precision, args.device)
    torch.manual_seed(0)
    dev = args.device
    teacher, target = build(args.config, dev)
    spec = teacher.spec
    backbone = teacher.new_backbone().to(dev)
    head = MLPHead(spec.latent_dim, backbone.feature_dim, width=backbone.feature_dim, depth=3).to(dev)
    psi = ARDiffusion(backbone, head).eval()
    gen = Generator(copy.deepcopy(psi)).eval()
    B, N, d = args.batch, spec.num_tokens, spec.latent_dim
    g = torch.Generator(device=dev).manual_seed(0)
    labels = torch.randint(0, spec.num_classes, (B,), generator=g, device=dev)
    z = torch.randn(B, N, d, generator=g, device=dev)
    with autocast(args.precision, dev):
        tokens = teacher.sample(labels, target, generator=g)
    ts = TimestepSpec()
    opt_psi = torch.optim.Adam(psi.parameters(), lr=1e-5, betas=(0.9, 0.95))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-5, betas=(0.9, 0.95))

    def baseline():
        backbone.zero_grad(set_to_none=True)
        with autocast(args.precision, dev):
            out = backbone(z, labels).float().square().mean()
        out.backward()

    def stage1():
        with autocast(args.precision, dev):
            loss = gts_loss(psi, teacher, tokens, labels, target_settings=target, draws=args.draws, timesteps=ts,
                            generator=g)
        opt_psi.zero_grad(set_to_none=True)
        loss.backward()
        opt_psi.step()

    def guidance():
        with autocast(args.precision, dev):
            with torch.no_grad():
                q = gen(z, labels)
            loss = fcs_loss(psi, q, labels, draws=1, timesteps=ts, generator=g)
        opt_psi.zero_grad(set_to_none=True)
        loss.backward()
        opt_psi.step()

    def generator():
        psi.requires_grad_(False)
        with autocast(args.precision, dev):
            out = csd_loss(gen, psi, teacher, z, labels, target_settings=target, alpha=1.0, timesteps=ts,
                           generator=g)
        opt_g.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_g.step()
        psi.requires_grad_(True)

    steps = (("backbone fwd+bwd", baseline), ("stage-1 step (GTS)", stage1), ("guidance step (FCS)", guidance),
             ("generator step (CSD)", generator))
    for _, fn in steps:
        fn()  # warm-up (also allocates optimiser state)
    # interleaved: repeat r of every step runs before repeat r + 1 of any, so that a slow spell of a
    # shared machine lands on all steps alike instead of on whichever step it happened to hit
    times = {name: [] for name, _ in steps}
    for _ in range(args.repeats):
        for name, fn in steps:
            times[name] += time_runs(fn, 1, dev)
    rows = {name: {"seconds": statistics.median(t), "min_seconds": min(t)} for name, t in times.items()}
    # peaks after all timings: on CPU the measurement changes malloc's tuning for the rest of the process
    for name, fn in steps:
        with peak_memory(dev, return_to_os=True) as mem:
            fn()
        rows[name]["peak"] = mem["peak"]
    base = rows["backbone fwd+bwd"]
    for r in rows.values():
        r["ratio"] = r["seconds"] / base["seconds"]
        r["tokens_per_s"] = B * N / r["seconds"]
    return {"rows": rows, "shape": {"config": args.config, "batch": B, "tokens": N, "vocab": spec.vocab_size,
                                    "latent_dim": d, "width": backbone.feature_dim, "precision": args.precision}}


def print_table(result: dict, device: str) -> None:
    sh = result["shape"]
    print(f"DD2 step costs, VAR-shaped '{sh['config']}' teacher (n={sh['tokens']}, V={sh['vocab']}, "
          f"d={sh['latent_dim']}, width={sh['width']}), batch {sh['batch']}, device {device}, {sh['precision']}")
    print(f"{'':<24}{'time':>10}{'ratio':>9}{'peak mem':>12}{'tokens/s':>12}")
    for name, r in result["rows"].items():
        print(f"{name:<24}{r['seconds']:>9.3f}s{r['ratio']:>8.2f}x{mib(r['peak']):>12}{r['tokens_per_s']:>12.0f}")
    print("targets: generator step <= 2.5x, guidance step <= 1.6x")


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4, 2
    result = run(args)
    print_table(result, args.device)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
