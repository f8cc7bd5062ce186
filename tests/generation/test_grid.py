"""save_sample_grid writes a PNG of the expected size, with the pixels of the images it was given."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval.generation.grid import save_sample_grid, to_uint8


def test_grid_shape_and_pixels(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(23, 1, 16, 16, generator=g) * 2 - 1
    path = save_sample_grid(images, torch.arange(23) % 10, tmp_path / "grid.png", nrow=10, scale=4, padding=2)
    img = Image.open(path)
    assert img.mode == "RGB"
    # 10 columns, ceil(23 / 10) = 3 rows of 64 px tiles with 2 px padding around every tile
    assert img.size == (10 * (64 + 2) + 2, 3 * (64 + 2) + 2)
    arr = np.asarray(img)
    # tile (row 1, col 2) = image 12, upscaled 4x nearest; compare away from the label in its top-left corner
    tile = arr[2 + 66 : 2 + 66 + 64, 2 + 2 * 66 : 2 + 2 * 66 + 64, 0]
    expected = to_uint8(images[12, 0]).numpy().repeat(4, 0).repeat(4, 1)
    np.testing.assert_array_equal(tile[32:, :], expected[32:, :])


def test_grid_default_scale_and_rgb_without_labels(tmp_path) -> None:
    images = torch.zeros(4, 3, 8, 8)
    path = save_sample_grid(images, None, tmp_path / "sub" / "g.png", nrow=2)
    assert Image.open(path).size == (2 * (64 + 2) + 2, 2 * (64 + 2) + 2)  # 8 px scaled 8x to 64 px tiles


def test_grid_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        save_sample_grid(torch.zeros(4, 1, 8, 8), [0, 1, 2], tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"\(N, 1\|3, H, W\)"):
        save_sample_grid(torch.zeros(4, 8, 8), None, tmp_path / "g.png")
