"""Sample grids as PNG (used by ``zoo sample`` and the generation eval tasks)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from zoo.registry import atomic_write

__all__ = ["save_sample_grid", "to_uint8"]


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] -> uint8 [0, 255] with DiT's rounding (``clamp(127.5 x + 128)``, then truncation)."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)


def save_sample_grid(
    images: Tensor,
    labels: Tensor | list[int] | None,
    path: str | os.PathLike,
    nrow: int = 10,
    *,
    scale: int | None = None,
    padding: int = 2,
    annotate: bool = True,
) -> Path:
    """Write ``images`` (N, C, H, W) in [-1, 1] as one PNG grid with ``nrow`` images per row.

    ``labels`` (the conditioning classes, length N) are drawn in each tile's top-left corner when ``annotate``.
    ``scale`` enlarges each image by an integer factor with nearest-neighbour (default: enough for tiles of at
    least 64 px, so 16x16 digits stay visible and the labels fit). Returns the written path.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W); got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if labels is not None:
        labels = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} images")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    scale = scale or max(1, -(-64 // min(h, w)))
    x = images.detach().cpu().float()
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(
        to_uint8(x), nrow=nrow, padding=padding, pad_value=255
    )  # (3, H', W'); grey input -> 3 copies
    img = Image.fromarray(grid.permute(1, 2, 0).numpy(), mode="RGB")
    if annotate and labels is not None:
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default()
        th, tw = h * scale + padding, w * scale + padding
        for i, lab in enumerate(labels):
            r, c = divmod(i, nrow)
            xy = (c * tw + padding + 2, r * th + padding + 1)
            # a dark box behind the label keeps it readable on any sample (white strokes, noise)
            x0, y0, x1, y1 = draw.textbbox(xy, str(lab), font=font)
            draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), fill=(20, 20, 20))
            draw.text(xy, str(lab), fill=(255, 170, 40), font=font)
    path = Path(path)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path
