"""Pre-encoded latents (e.g. ImageNet through the SD VAE, ``recipes/dit_moe/encode_imagenet_latents.py``) in
webdataset shards, as a map-style dataset with random access."""

from __future__ import annotations

import io
import logging
import os
import tarfile
from glob import glob

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["LatentShards"]

log = logging.getLogger(__name__)


class LatentShards(Dataset):
    """Map-style view of webdataset shards holding ``<key>.latent.npy`` (C, h, w) and ``<key>.cls`` (class id).

    An index of (tar file, byte offset, size) per member is built once, so item ``i`` is a deterministic random
    access, as the runner's resumable sampler needs.
    """

    def __init__(self, pattern: str) -> None:
        expanded = os.path.expandvars(pattern)
        if "$" in expanded:
            raise ValueError(f"latents: data.shards {pattern!r} uses an unset environment variable")
        files = sorted(glob(expanded))
        if not files:
            raise FileNotFoundError(f"latents: no shards match {expanded!r} (data.shards {pattern!r})")
        self.items: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
        skipped = 0
        for path in files:
            members: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = (m.offset_data, m.size)
            for parts in members.values():
                if "latent.npy" in parts and "cls" in parts:
                    self.items.append((path, parts["latent.npy"], parts["cls"]))
                else:
                    skipped += 1
        if skipped:
            log.warning("latents: skipped %d records without both latent.npy and cls in %s", skipped, pattern)
        if not self.items:
            raise ValueError(f"latents: shards {pattern!r} hold no record with latent.npy and cls")
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def _read(path: str, where: tuple[int, int]) -> bytes:
        with open(path, "rb") as f:
            f.seek(where[0])
            return f.read(where[1])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path, lat, cls = self.items[i]
        x = torch.from_numpy(np.load(io.BytesIO(self._read(path, lat))).astype(np.float32))
        try:
            y = int(self._read(path, cls).decode().strip())
        except ValueError as e:
            raise ValueError(f"{path}: record {i}: field cls is not an integer class id") from e
        return x, torch.tensor(y)
