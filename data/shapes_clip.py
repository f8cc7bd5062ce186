"""The shapes world as CLIP training pairs: scenes with their captions, shape-swapped hard negatives and per-patch
object labels (``zoo.stages.clip`` trains on them)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from data.seeding import mix_seed

__all__ = ["WorldCaptions", "shape_swapped_captions", "patch_labels"]


def shape_swapped_captions(scene: Any, shapes: list[str] | tuple[str, ...], k: int, seed: int) -> list[str]:
    """``k`` captions of ``scene`` with one object's shape replaced by a shape that object does not have.

    Each object appears in the caption as "<size> <colour> <shape>"; the swap targets that phrase, so the other
    objects, the relations and the word order stay as they are. Seeded, so a sample always gets the same negatives.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(k):
        obj = scene.objects[rng.randrange(len(scene.objects))]
        phrase = f"{obj.size} {obj.color} {obj.shape}"
        if phrase not in scene.caption:
            raise ValueError(f"scene {scene.id}: caption {scene.caption!r} does not name {phrase!r}")
        other = rng.choice([sh for sh in shapes if sh != obj.shape])
        out.append(scene.caption.replace(phrase, f"{obj.size} {obj.color} {other}", 1))
    return out


def patch_labels(scene: Any, grid: int, shapes: Sequence[str], sizes: Sequence[str], min_cover: float = 0.3) -> Tensor:
    """``[grid * grid]`` long (row-major patches): 0 for background, else ``1 + shape * len(sizes) + size`` of the
    object covering the largest share of the patch (at least ``min_cover`` of its pixels)."""
    h = scene.objects[0].mask.shape[0]
    if h % grid:
        raise ValueError(f"image size {h} is not a multiple of the patch grid {grid}")
    p = h // grid
    cover = torch.stack([
        torch.from_numpy(o.mask).float().reshape(grid, p, grid, p).mean(dim=(1, 3)).flatten() for o in scene.objects
    ])  # fmt: skip
    best, which = cover.max(dim=0)
    ids = torch.tensor([1 + shapes.index(o.shape) * len(sizes) + sizes.index(o.size) for o in scene.objects])
    return torch.where(best >= min_cover, ids[which], torch.zeros_like(which))


class WorldCaptions(Dataset):
    """Scenes ``0..n-1`` of a split as ``(image tensor, caption, label, index, hard negatives, patch labels)``;
    rendered once, then kept in memory. ``hard_negatives`` shape-swapped captions per scene (seeded by ``seed`` and
    the index); patch labels (``patch_labels``) when ``patch_grid`` is set, else None."""

    def __init__(self, world: Any, split: str, n: int, transform: Any, hard_negatives: int = 0, seed: int = 0,
                 patch_grid: int | None = None):
        self.world, self.split, self.n, self.transform = world, split, n, transform
        self.hard_negatives, self.seed, self.patch_grid = hard_negatives, seed, patch_grid
        self._cache: dict[int, tuple[Tensor, str, int, int, list[str], Tensor | None]] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, str, int, int, list[str], Tensor | None]:
        if i not in self._cache:
            scene = self.world.scene(int(i), self.split)
            cfg = self.world.config
            negatives = shape_swapped_captions(scene, cfg.shapes, self.hard_negatives, mix_seed(self.seed, int(i)))
            patches = None if self.patch_grid is None else patch_labels(scene, self.patch_grid, cfg.shapes, cfg.sizes)
            self._cache[i] = (self.transform(scene.image), scene.caption, scene.label, int(i), negatives, patches)
        return self._cache[i]
