"""Train the bundled `raster-digits` teacher (≈1–2 minutes on one CPU thread).

    python examples/dd2-raster-digits/train.py [--steps 1500] [--out PATH]

Cross-entropy on the 80 % training split of scikit-learn's 8×8 digits, each pixel one of 17 grey
levels, in raster order; 10 % of the labels are replaced by the null class so the same network
gives the unconditional logits that classifier-free guidance needs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dd2_raster_digits.model import DEFAULT_CONFIG, NULL_CLASS, RasterModel, images_to_levels
from dd2cli import load_digits_dataset, save_safetensors

DEFAULT_OUT = Path(__file__).parent / "src" / "dd2_raster_digits" / "weights" / "raster_digits.safetensors"


def nll(model: RasterModel, ids_BN: torch.Tensor, labels_B: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids_BN, labels_B)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids_BN.reshape(-1)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--class-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    torch.set_num_threads(1)  # a tiny model: one thread is faster than contended cores
    torch.manual_seed(args.seed)
    images, labels = load_digits_dataset(8, "train")
    held_images, held_labels = load_digits_dataset(8, "heldout")
    ids, held_ids = images_to_levels(images), images_to_levels(held_images)

    model = RasterModel(**DEFAULT_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # cosine decay with a short warm-up: stable start, low final noise
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))
    start = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, ids.shape[0], (args.batch_size,))
        x_BN, y_B = ids[idx], labels[idx].clone()
        y_B[torch.rand(args.batch_size) < args.class_dropout] = NULL_CLASS
        logits = model(x_BN, y_B)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x_BN.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)

    model.eval()
    held_nll = nll(model, held_ids, held_labels)
    held_nll_uncond = nll(model, held_ids, torch.full_like(held_labels, NULL_CLASS))
    print(f"held-out NLL/token: conditional {held_nll:.4f}, unconditional {held_nll_uncond:.4f} "
          f"(uniform {math.log(17):.4f})")
    meta = {"config": json.dumps(DEFAULT_CONFIG), "steps": str(args.steps), "seed": str(args.seed),
            "heldout_nll": f"{held_nll:.4f}", "heldout_nll_uncond": f"{held_nll_uncond:.4f}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(args.out, model.state_dict(), meta)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
