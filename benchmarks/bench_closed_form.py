"""Closed-form denoiser at VAR scale: dense vs chunked + support-restricted, side by side.

    python benchmarks/bench_closed_form.py [--device cpu|cuda] [--batch 32] [--quick]

Default shape: B=32, n=680, V=4096, d=32, teacher top-k 900 (VAR-d16 distillation target). Each
path runs in a fresh subprocess so peak-memory readings do not interfere; the peak is the memory
allocated beyond the inputs (`x`, `t`, dense `p`). Prints time, peak memory, their ratios and the
max abs difference of the outputs (forward) and of the gradients w.r.t. x (forward + backward).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _inputs(B, n, V, d, k, device):
    import torch

    g = torch.Generator().manual_seed(0)
    C = torch.randn(V, d, generator=g)
    logits = torch.randn(B, n, V, generator=g) * 3
    vals, ids = logits.topk(k, dim=-1)  # exactly k kept entries per row, even with ties
    logits = torch.full_like(logits, -math.inf).scatter_(-1, ids, vals)
    p = torch.softmax(logits, -1)
    del logits, vals, ids
    # realistic inputs: x_t = (1−t)·c_q + t·ε with q drawn from p (what training feeds the denoiser)
    q = torch.multinomial(p.reshape(-1, V), 1, generator=g).reshape(B, n)
    t = torch.rand(B, n, generator=g) * 0.99 + 0.01
    x = (1 - t[..., None]) * C[q] + t[..., None] * torch.randn(B, n, d, generator=g)
    return x.to(device), t.to(device), p.to(device), C.to(device)


MODES = (("forward", ("dense", "chunked", "chunked+top-k")),
         ("grad", ("dense-autograd", "chunked", "chunked+top-k")))


def _child(args) -> None:
    import torch
    from _measure import peak_memory, timeit

    from dd2cli import flow

    torch.manual_seed(0)
    x, t, p, C = _inputs(args.batch, args.n, args.V, args.d, args.k, args.device)
    sparse = flow.SparseProbs.from_dense(p, args.k) if args.path == "chunked+top-k" else None
    if sparse is not None:
        del p  # the top-k path never holds (B, n, V)

    def run(xx):
        if args.path == "dense":
            return flow.denoise(xx, t, p, C, chunk_size=None)
        if args.path == "dense-autograd":
            return flow.denoise_reference(xx, t, p, C)
        if args.path == "chunked":
            return flow.denoise(xx, t, p, C, chunk_size=args.chunk)
        return flow.denoise(xx, t, sparse, C, chunk_size=args.chunk)

    def step():
        if args.mode == "grad":
            xg = x.clone().requires_grad_(True)
            D = run(xg)
            (D * w).sum().backward()
            return D.detach(), xg.grad
        with torch.no_grad():
            return run(x), None

    w = torch.randn_like(x)
    with peak_memory(args.device) as mem:
        D, gx = step()
    seconds = timeit(lambda: step(), repeats=args.repeats, warmup=0, device=args.device)
    out = Path(args.dump)
    torch.save({"D": D.cpu(), "grad": gx.cpu() if gx is not None else None}, out)
    print(json.dumps({"seconds": seconds, "peak": mem["peak"]}))


def _float64_reference(args, w_seed: int = 0) -> dict:
    """D and ∇_x⟨w, D⟩ of the plain dense formula in float64, row chunk by row chunk (rows are independent)."""
    import torch

    from dd2cli import flow

    torch.manual_seed(0)
    x, t, p, C = _inputs(args.batch, args.n, args.V, args.d, args.k, "cpu")
    w = torch.randn_like(x)  # the children draw the same w: same seed, same preceding draws
    d, V = x.shape[-1], p.shape[-1]
    x_Rd, t_R, p_RV, w_Rd = x.reshape(-1, d), t.reshape(-1), p.reshape(-1, V), w.reshape(-1, d)
    D, grad = torch.empty_like(x_Rd, dtype=torch.float64), torch.empty_like(x_Rd, dtype=torch.float64)
    for s in range(0, x_Rd.shape[0], 2048):
        xr = x_Rd[s:s + 2048].double().requires_grad_(True)
        Dr = flow.denoise_reference(xr, t_R[s:s + 2048].double(), p_RV[s:s + 2048].double(), C.double())
        (Dr * w_Rd[s:s + 2048].double()).sum().backward()
        D[s:s + 2048], grad[s:s + 2048] = Dr.detach(), xr.grad
    return {"D": D.reshape(x.shape), "grad": grad.reshape(x.shape)}


def run(args) -> dict:
    """Every (pass, path) in its own subprocess; returns {"pass/path": {seconds, peak, diffs...}}.

    Differences are max-abs against the first path of the pass (fp32 dense), and for the gradient
    also against a float64 reference (`*_vs_f64`, absolute and relative to max|grad|): fp32 itself
    is ~1e-5 away from exact at t = 0.01, so only the float64 column says how close each path is.
    """
    import tempfile

    import torch

    results = {}
    # the children draw w from the default generator of their device: the same draws as here on CPU only
    ref64 = _float64_reference(args) if args.device == "cpu" else None
    with tempfile.TemporaryDirectory() as tmp:
        for mode, paths in MODES:
            outs = {}
            for path in paths:
                dump = Path(tmp) / f"{mode}-{path}.pt"
                cmd = [sys.executable, __file__, "--path", path, "--mode", mode, "--dump", str(dump)]
                for key in ("device", "batch", "n", "V", "d", "k", "chunk", "repeats"):
                    cmd += [f"--{key}", str(getattr(args, key))]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{path} ({mode}) failed:\n{proc.stderr}")
                results[f"{mode}/{path}"] = json.loads(proc.stdout.strip().splitlines()[-1])
                outs[path] = torch.load(dump)
            ref = outs[paths[0]]
            for path in paths:
                r = results[f"{mode}/{path}"]
                r["max_abs_diff"] = (outs[path]["D"] - ref["D"]).abs().max().item()
                if ref["grad"] is not None:
                    r["grad_max_abs_diff"] = (outs[path]["grad"] - ref["grad"]).abs().max().item()
                if ref64 is not None and outs[path]["grad"] is not None:
                    err = (outs[path]["grad"].double() - ref64["grad"]).abs().max().item()
                    r["grad_max_abs_diff_vs_f64"] = err
                    r["grad_rel_diff_vs_f64"] = err / ref64["grad"].abs().max().item()
        if ref64 is not None:
            results["float64"] = {"max_abs_grad": ref64["grad"].abs().max().item()}
    return results


def print_table(results: dict, args) -> None:
    from _measure import mib

    print(f"closed-form denoiser, B={args.batch} n={args.n} V={args.V} d={args.d} top-k={args.k} "
          f"chunk={args.chunk} rows, device={args.device}")
    print(f"{'pass':<9}{'path':<16}{'time':>9}{'peak mem':>12}{'time ratio':>12}{'mem ratio':>11}"
          f"{'max|ΔD|':>10}{'max|Δgrad|':>12}{'vs f64':>10}{'rel f64':>10}")
    for mode, paths in MODES:
        ref = results[f"{mode}/{paths[0]}"]
        for p in paths:
            r = results[f"{mode}/{p}"]
            f64 = (f"{r['grad_max_abs_diff_vs_f64']:>10.1e}{r['grad_rel_diff_vs_f64']:>10.1e}"
                   if "grad_rel_diff_vs_f64" in r else "")
            print(f"{mode:<9}{p:<16}{r['seconds']:>8.3f}s{mib(r['peak']):>12}"
                  f"{r['seconds'] / ref['seconds']:>11.2f}x{r['peak'] / max(ref['peak'], 1):>10.3f}x"
                  f"{r.get('max_abs_diff', 0):>10.1e}{r.get('grad_max_abs_diff', 0):>12.1e}{f64}")
    if "float64" in results:
        print(f"(max |grad| of the float64 reference: {results['float64']['max_abs_grad']:.1f})")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=680)
    ap.add_argument("--V", type=int, default=4096)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=900)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="B=4 (for CI: keeps the code alive)")
    ap.add_argument("--json-out", default=None, help="also write the results here")
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="forward", help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4, 1
    if args.path:
        _child(args)
        return
    results = run(args)
    print_table(results, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
