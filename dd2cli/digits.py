"""The bundled demo domain: scikit-learn's `load_digits` (8×8, 10 classes, ships in its wheel).

- `load_digits_dataset(resolution, split)`: images in `[0, 1]`, grey replicated to RGB, upsampled
  bilinearly; a fixed seeded 80/20 train / held-out split (1,438 / 359 images).
- `DigitsClassifier`: a small CNN trained by the project (`train_digits_classifier`, reproduced by
  `python examples/train_digits_classifier.py`) and shipped in `dd2cli/data/`. Its penultimate
  features are the feature space of digits-FID, precision/recall and class-consistency.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DD2Error
from .files import load_safetensors

NUM_CLASSES = 10
SPLIT_SEED = 20251027
HELDOUT_FRACTION = 0.2
#: every image is resized to this grid before classification (the classifier's native input)
CLASSIFIER_RESOLUTION = 16
CLASSIFIER_PATH = Path(__file__).parent / "data" / "digits_classifier.safetensors"


def _raw_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - a dependency, but say so clearly
        raise DD2Error("The digits domain needs scikit-learn; run: pip install scikit-learn.") from exc
    bunch = load_digits()
    images_B88 = torch.tensor(bunch.images, dtype=torch.float32) / 16.0  # pixel values 0..16
    labels_B = torch.tensor(bunch.target, dtype=torch.long)
    return images_B88, labels_B


def split_indices(n: int) -> tuple[Tensor, Tensor]:
    """The fixed (train, held-out) index split used everywhere in dd2."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_held = int(round(n * HELDOUT_FRACTION))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def load_digits_dataset(resolution: int = 16, split: str = "train") -> tuple[Tensor, Tensor]:
    """`(images_B3HW float32 in [0,1], labels_B int64)` for split `train`, `heldout` or `all`."""
    if split not in ("train", "heldout", "all"):
        raise DD2Error(f"Unknown digits split '{split}'; use train, heldout or all.")
    if resolution < 8:
        raise DD2Error(f"Digits resolution {resolution} is below the native 8 pixels; use 8 or more.")
    images_B88, labels_B = _raw_digits()
    if split != "all":
        train_idx, held_idx = split_indices(len(labels_B))
        idx = train_idx if split == "train" else held_idx
        images_B88, labels_B = images_B88[idx], labels_B[idx]
    x_B1HW = images_B88[:, None]
    if resolution != 8:
        x_B1HW = F.interpolate(x_B1HW, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x_B1HW.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), labels_B


def to_classifier_input(images_B3HW: Tensor) -> Tensor:
    """Any-size RGB (or grey) images in [0,1] → `(B, 1, 16, 16)` grey, as the classifier was trained."""
    x = images_B3HW.float()
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    elif x.shape[1] != 1:
        raise DD2Error(f"Expected images with 1 or 3 channels, got {x.shape[1]}.")
    if x.shape[-1] != CLASSIFIER_RESOLUTION or x.shape[-2] != CLASSIFIER_RESOLUTION:
        # area for downsizing keeps strokes; bilinear for upsizing
        mode = "area" if x.shape[-1] > CLASSIFIER_RESOLUTION else "bilinear"
        kwargs = {} if mode == "area" else {"align_corners": False}
        x = F.interpolate(x, size=(CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION), mode=mode, **kwargs)
    return x


class DigitsClassifier(nn.Module):
    """Small CNN: 16×16 grey → 10 classes; `features()` is the 128-d penultimate layer."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.out = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, images_B3HW: Tensor) -> Tensor:
        x = to_classifier_input(images_B3HW) * 2 - 1
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8×8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4×4
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, images_B3HW: Tensor) -> Tensor:
        """Logits `(B, 10)`."""
        return self.out(self.features(images_B3HW))

    @torch.no_grad()
    def predict(self, images_B3HW: Tensor) -> Tensor:
        return self(images_B3HW).argmax(-1)


def load_digits_classifier(path: str | Path | None = None, device: str = "cpu") -> DigitsClassifier:
    """The shipped classifier (eval mode, no grads)."""
    path = Path(path) if path is not None else CLASSIFIER_PATH
    if not path.is_file():
        raise DD2Error(
            f"The digits classifier weights {path} are missing; reinstall dd2 or run "
            f"'python examples/train_digits_classifier.py'."
        )
    tensors, _ = load_safetensors(path)
    model = DigitsClassifier()
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval().requires_grad_(False)


def _augment(x_B1HW: Tensor, gen: torch.Generator) -> Tensor:
    """Small random shifts/scales so the classifier tolerates generated digits' variations."""
    B = x_B1HW.shape[0]
    scale = 1 + (torch.rand(B, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(B, 2, generator=gen) - 0.5) * 0.25
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x_B1HW.shape), align_corners=False)
    return F.grid_sample(x_B1HW, grid, align_corners=False, padding_mode="zeros")


def train_digits_classifier(epochs: int = 40, seed: int = 0, log=print) -> tuple[DigitsClassifier, float]:
    """Train on the train split (at several resolutions), return (model, held-out accuracy)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for res in (8, 16, 32):  # the classifier sees digits rendered at every demo resolution
        x, y = load_digits_dataset(res, "train")
        xs.append(to_classifier_input(x))
        ys.append(y)
    x_train, y_train = torch.cat(xs), torch.cat(ys)
    x_held, y_held = load_digits_dataset(16, "heldout")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        for s in range(0, len(perm), 128):
            idx = perm[s : s + 128]
            xb = _augment(x_train[idx], gen)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % 10 == 0:
            model.eval()
            acc = (model.predict(x_held) == y_held).float().mean().item()
            log(f"epoch {epoch + 1}: loss {loss.item():.4f} held-out accuracy {acc:.4f}")
    model.eval()
    acc = (model.predict(x_held) == y_held).float().mean().item()
    return model, acc
