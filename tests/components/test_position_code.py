"""The fixed grid position code: its norm, centring, axis order and input checks."""

import math

import pytest
import torch

from zoo.components.position_code import grid_position_code


def test_code_rows_have_the_asked_mean_norm_and_are_centred():
    code = grid_position_code((8, 8), 128, norm=6.0)
    assert code.shape == (64, 128) and code.dtype == torch.float32
    assert code.norm(dim=1).mean().item() == pytest.approx(6.0, rel=1e-5)
    torch.testing.assert_close(code.mean(dim=0), torch.zeros(128), atol=1e-5, rtol=0)
    # every position has its own code, and the nearest other one is clearly apart
    dist = torch.cdist(code, code) + torch.eye(64) * 1e9
    assert dist.min().item() > 0.5


def test_raster_order_and_axis_split():
    rows, cols, dim = 3, 5, 16  # 2 axes x 4 sin/cos pairs
    code = grid_position_code((rows, cols), dim, norm=1.0).reshape(rows, cols, dim)
    # the first half of the width codes the row: equal along a row; the second half the column: equal down a column
    assert torch.allclose(code[:, :1, :8].expand(rows, cols, 8), code[..., :8], atol=1e-6)
    assert torch.allclose(code[:1, :, 8:].expand(rows, cols, 8), code[..., 8:], atol=1e-6)
    # sin(1 rad * index) at the fastest frequency, before centring and scaling: compare differences
    raw = torch.tensor([math.sin(c) for c in range(cols)])
    got = code[0, :, 8]
    ratio = (got[1:] - got[:-1]) / (raw[1:] - raw[:-1])
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)


def test_three_axes_and_leftover_width():
    code = grid_position_code((2, 4, 4), 20, norm=2.0)  # 20 // 6 = 3 pairs per axis; 2 widths stay zero
    assert code.shape == (32, 20)
    assert torch.equal(code[:, 18:], torch.zeros(32, 2))
    frames = code.reshape(2, 16, 20)[..., :6]  # the frame axis: the same within a frame, different across
    assert torch.allclose(frames[0], frames[0, :1].expand(16, 6)) and not torch.allclose(frames[0], frames[1])


def test_single_position_is_zero_and_bad_input_is_refused():
    assert torch.equal(grid_position_code((1, 1), 8, norm=3.0), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="too small"):
        grid_position_code((8, 8), 3, norm=1.0)
    with pytest.raises(ValueError, match="positive"):
        grid_position_code((8, 8), 16, norm=0.0)
    with pytest.raises(ValueError, match="grid"):
        grid_position_code((0, 8), 16, norm=1.0)
