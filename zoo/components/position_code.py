"""A fixed sine-cosine code of a token's place on a grid (rows x cols, or frames x rows x cols), for media tokens.

A small LM trained from scratch does not learn to read where an object is from its image tokens: the tower's tokens
of an object say what it is, not where (a linear probe of a 1-object scene's object tokens, projected, tells left
from right at chance), and the raster order tells rows apart only coarsely. Adding this code to each projected
token puts its grid position in the token itself, in the LM's space, where one attention head that finds the object
also reads its place (``recipes/moe_llava/README.md``, "Where the object is").

Each axis gets an equal share of the width: sines and cosines of the index at frequencies from 1 rad per step down
to 1/``base`` rad per step (geometric), so neighbours differ and the whole axis stays unambiguous. The code is
centred over the grid (no constant offset shared by all tokens) and scaled so that a token's code has the given
mean norm: the scale, not the width, sets how loudly the position speaks next to the features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["grid_position_code"]


def grid_position_code(grid: Sequence[int], dim: int, norm: float, base: float = 10.0) -> torch.Tensor:
    """``[prod(grid), dim]`` code in raster order (last axis fastest) whose rows have mean L2 norm ``norm``.

    ``grid``: the axis sizes, e.g. ``(8, 8)`` for an 8x8 patch grid or ``(frames, 4, 4)`` for video; ``dim`` must be
    divisible by ``2 * len(grid)``; widths left over by that split stay zero.
    """
    grid = tuple(int(g) for g in grid)
    if not grid or min(grid) < 1:
        raise ValueError(f"grid_position_code: grid must be non-empty positive sizes, got {grid}")
    pairs = dim // (2 * len(grid))
    if pairs < 1:
        raise ValueError(f"grid_position_code: dim {dim} is too small for a {len(grid)}-axis grid (needs >= {2 * len(grid)})")
    if norm <= 0 or not math.isfinite(norm):
        raise ValueError(f"grid_position_code: norm must be a positive number, got {norm}")
    omega = base ** (-torch.arange(pairs, dtype=torch.float64) / max(pairs - 1, 1))
    index = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij")
    parts = []
    for axis in index:
        angle = axis.reshape(-1, 1) * omega
        parts += [angle.sin(), angle.cos()]
    code = torch.cat(parts, dim=1)
    code = code - code.mean(dim=0)
    scale = code.norm(dim=1).mean()
    if scale == 0:  # a grid of one position has nothing to tell apart
        code = torch.zeros_like(code)
    else:
        code = code * (norm / scale)
    out = torch.zeros(code.shape[0], dim, dtype=torch.float64)
    out[:, : code.shape[1]] = code
    return out.float()
