"""Real digits for the classifier and the FID-digits reference set, in the DiT digits recipes' pixel format.

The pixels and the held-out split come from ``data.digits`` (the loader the DiT digits recipes train on), so the
classifier, the FID reference and the generators all see the same images: scikit-learn's 1797 digits resized
bilinearly to 16x16, in [-1, 1] with ink = +1, and a stratified 20 % held out with seed 0.
"""

from __future__ import annotations

import torch

from data.digits import HELDOUT_FRACTION, SPLIT_SEED, load_digits_tensors, stratified_split

__all__ = ["DEFAULT_IMAGE_SIZE", "SPLIT_SEED", "HELDOUT_FRACTION", "load_real_digits", "heldout_split"]

DEFAULT_IMAGE_SIZE = 16  # the DiT digits recipes' resolution (``dit_tiny`` input_size)


def load_real_digits(
    image_size: int = DEFAULT_IMAGE_SIZE, split: str = "all"
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as (N, 1, S, S) float32 in [-1, 1] and int64 labels; ``split``: all | train | heldout."""
    x, y = load_digits_tensors("sklearn", image_size, 1)
    if split == "all":
        return x, y
    if split not in ("train", "heldout"):
        raise ValueError(f"digits split must be 'all', 'train' or 'heldout', got {split!r}")
    train, held = stratified_split(y)
    idx = train if split == "train" else held
    return x[idx], y[idx]


def heldout_split(
    labels: torch.Tensor, fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train, held-out) indices: the same ``fraction`` of each class held out, fixed by ``seed``."""
    return stratified_split(labels, fraction, seed)
