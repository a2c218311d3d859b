"""Sampling speed: one-step generator vs the teacher's AR sampler (and k-step), and the sample-set I/O.

    python benchmarks/bench_sampling_speed.py --teacher var-digits             # bundled, batch 1 and 64
    python benchmarks/bench_sampling_speed.py --var-depth 16 --batch-sizes 1 4  # VAR-d16 size, random weights
    python benchmarks/bench_sampling_speed.py --io 256 --io-count 512            # PNG + ADM npz writing

The generator is an untrained one of the architecture `dd2 distill` builds (speed does not depend
on the weights); every row ends in pixels (decode included). `--io` times what `dd2 sample` does
per image besides the network: PNG encoding + atomic write on a thread pool, then the ADM `.npz`
built back from the PNGs, and reading the PNGs as `dd2 eval` does.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


#: random-weight architectures `build_subject` knows besides the registered (bundled) variants
RANDOM_SUBJECTS = ("var-d16", "var-d20", "var-d24", "var-d30", "llamagen-b", "llamagen-l", "llamagen-xl")


def build_subject(name: str, device: str):
    """(teacher, untrained one-step generator, description) for a variant or a random-weight architecture.

    `var-dNN` / `llamagen-{b,l,xl}`: the released architecture (transformer and tokenizer) with
    random weights, sampled with the paper's evaluation settings; anything else is a registered
    variant whose weights are present (e.g. the bundled `var-digits`, `llamagen-digits`).
    """
    from dd2cli.engine.speed import untrained_generator

    if name.startswith("var-d") and name[5:].isdigit():
        from dd2_var import EVALUATION
        from dd2_var.config import vae_config, var_config
        from dd2_var.teacher import new_teacher

        cfg = var_config(int(name[5:]))
        teacher = new_teacher(cfg, vae_config(cfg.patch_nums), seed=0, variant_name=f"{name}-random",
                              lively=False, evaluation=EVALUATION).to(device).eval().requires_grad_(False)
        return teacher, untrained_generator(teacher), f"{name} (random weights)"
    if name in ("llamagen-b", "llamagen-l", "llamagen-xl"):
        from bench_llamagen_teacher import build_teacher

        teacher = build_teacher(name.split("-")[1].upper(), 256, device, real_tokenizer=True)
        return teacher, untrained_generator(teacher), f"{name} (random weights)"
    from dd2cli import plugins  # the bundled teachers load through their entry points

    variant = plugins.get_variant(name)
    teacher = variant.load(device=device).eval().requires_grad_(False)
    return teacher, untrained_generator(teacher, variant.distill_defaults), variant.name


def _speed(args) -> None:
    from dd2cli.engine.speed import time_sampling

    device = args.device
    teacher, gen, name = build_subject(f"var-d{args.var_depth}" if args.var_depth else args.teacher, device)
    rows = time_sampling(teacher, gen, device, args.batch_sizes, args.k_steps, args.warmup, args.repeats)
    spec = teacher.spec
    print(f"{name}: {spec.num_tokens} tokens in {spec.num_steps} AR steps, {spec.image_size} px; device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.startswith('cuda') else ''}; "
          f"median of {args.repeats} after {args.warmup} warm-up; torch {torch.__version__}, {platform.machine()}")
    print(f"{'mode':<22}{'batch':>6}{'latency ms':>12}{'images/s':>11}{'vs teacher':>12}")
    for r in rows:
        print(f"{r.mode:<22}{r.batch_size:>6}{r.latency_ms:>12.2f}{r.images_per_s:>11.1f}{r.speedup:>11.1f}x")


def _io(args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from dd2cli.engine.adm_npz import write_adm_npz
    from dd2cli.engine.sample_sets import _read_pngs, _Writer, open_images

    size, n = args.io, args.io_count
    # smooth random images compress like real samples better than white noise does
    rng = np.random.default_rng(0)
    low = torch.from_numpy(rng.random((n, 3, size // 16, size // 16), dtype=np.float32))
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        writer = _Writer(out)
        t0 = time.perf_counter()
        for s in range(0, n, 64):
            writer.write(range(s, min(s + 64, n)), images[s:s + 64])
        writer.close()
        t_png = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            batches = (_read_pngs(out, range(s, min(s + 256, n)), pool) for s in range(0, n, 256))
            write_adm_npz(out / "samples.npz", batches, n, size, size, np.zeros(n, dtype=np.int64))
        t_npz = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in open_images(out).batches(100):
            pass
        t_read = time.perf_counter() - t0
        png_mb = sum(p.stat().st_size for p in out.glob("*.png")) / 2**20
    print(f"{n} images {size}x{size}: PNG write {n / t_png:.0f} images/s ({png_mb:.0f} MiB), npz from PNGs "
          f"{n / t_npz:.0f} images/s, folder read (eval) {n / t_read:.0f} images/s; 50k images ≈ "
          f"{50000 / (n / t_png) / 60:.1f} + {50000 / (n / t_npz) / 60:.1f} min of I/O")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="var-digits", help="a registered variant whose weights are present")
    parser.add_argument("--var-depth", type=int, default=0, help="time a random VAR of this depth instead")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--k-steps", type=int, nargs="*", default=[2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--io", type=int, default=0, help="also time PNG/npz I/O at this resolution")
    parser.add_argument("--io-count", type=int, default=512)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _speed(args)
    if args.io:
        _io(args)


if __name__ == "__main__":
    main()
