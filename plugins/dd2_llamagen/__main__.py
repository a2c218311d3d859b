"""`python -m dd2_llamagen --teacher llamagen-digits`: data-free continuous input adaptation, with its report."""

from __future__ import annotations

import torch

from . import FAMILY
from .adapt import adapt_teacher


def main(argv: list[str] | None = None) -> None:
    """`python -m dd2_llamagen --teacher llamagen-digits`: adapt and print the report."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Data-free continuous input adaptation of a LlamaGen teacher.")
    ap.add_argument("--teacher", default="llamagen-digits", choices=[v.name for v in FAMILY.variants])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--noise-std", type=float, default=0.05)
    ap.add_argument("--train-model", action="store_true", help="also fine-tune the GPT (a copy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    teacher = {v.name: v for v in FAMILY.variants}[args.teacher].load(device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    report = adapt_teacher(teacher, args.steps, args.batch_size, args.learning_rate, generator=gen,
                           train_model=args.train_model, noise_std=args.noise_std)
    print(json.dumps(report.as_dict(), indent=2))


if __name__ == "__main__":
    main()
