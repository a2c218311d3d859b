"""Images: tensors in [0, 1] → uint8, PNG files and sample grids (written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import Tensor

from .files import atomic_write_bytes


def to_uint8(images_B3HW: Tensor) -> Tensor:
    """`(B, 3, H, W)` in [0, 1] → `(B, H, W, 3)` uint8 (round to nearest)."""
    return (images_B3HW.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def make_grid(images_B3HW: Tensor, ncol: int, pad: int = 1, upscale: int = 1) -> Tensor:
    """Tile images row-major into one `(H', W', 3)` uint8 image with a white border."""
    imgs = to_uint8(images_B3HW)
    if upscale > 1:
        imgs = imgs.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    B, H, W, _ = imgs.shape
    nrow = (B + ncol - 1) // ncol
    grid = torch.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y:y + H, x:x + W] = imgs[i]
    return grid


def save_png(path: str | Path, image_HW3: Tensor) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_HW3.numpy()).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_grid(path: str | Path, images_B3HW: Tensor, ncol: int) -> None:
    """Grid PNG; small images are upscaled (nearest) so a 16-px digit is visible."""
    size = images_B3HW.shape[-1]
    upscale = max(1, 64 // size)
    save_png(path, make_grid(images_B3HW, ncol, upscale=upscale))
