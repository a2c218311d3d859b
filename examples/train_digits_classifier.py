"""Reproduce the shipped digits classifier (dd2cli/data/digits_classifier.safetensors).

    python examples/train_digits_classifier.py [--epochs 40] [--seed 0] [--out PATH]

Trains a small CNN on the fixed train split of scikit-learn's digits (rendered at 8, 16 and 32 px)
and prints the held-out accuracy; about a minute on a 2-core CPU.
"""

import argparse
import json

import torch

from dd2cli.digits import CLASSIFIER_PATH, train_digits_classifier
from dd2cli.files import save_safetensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(CLASSIFIER_PATH))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, acc = train_digits_classifier(epochs=args.epochs, seed=args.seed)
    save_safetensors(args.out, model.state_dict(), {"heldout_accuracy": f"{acc:.4f}",
                                                    "recipe": json.dumps(vars(args))})
    print(f"held-out accuracy {acc:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
