"""Real digits for the classifier and the FID-digits reference set, in the DiT digits recipes' pixel format."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_IMAGE_SIZE", "SPLIT_SEED", "HELDOUT_FRACTION", "load_real_digits", "heldout_split"]

DEFAULT_IMAGE_SIZE = 16
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2


def load_real_digits(image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as (N, 1, S, S) float32 in [-1, 1] (ink = +1) and int64 labels."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.from_numpy(ds.images.astype(np.float32) / 16.0)[:, None]  # 17 grey levels 0..16
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.from_numpy(ds.target.astype(np.int64))


def heldout_split(
    labels: torch.Tensor, fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train, held-out) indices: the same ``fraction`` of each class held out, fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(len(idx) * fraction)
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
