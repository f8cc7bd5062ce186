"""A memo of a frozen encoder's outputs, keyed by the content of each input item.

LLaVA-style stages after the first keep the vision tower frozen, yet every step runs it again on images the run has
seen before (a VQA stage shows each scene in several conversations, and each conversation in several epochs). The
tower's output for an image is then a pure function of its pixels, so it can be computed once and reused.

Keys are a hash of each item's bytes, shape and dtype: two items with the same pixels share an entry, whatever the
dataset index or file they came from, so the cache needs nothing from the data pipeline. It is only correct while
the encoder's weights do not change and it has no randomness (no active dropout); callers use it only then.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["FrozenFeatureCache"]


def _item_key(item: Tensor) -> bytes:
    data = item.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(data.shape), str(data.dtype))).encode())
    # As raw bytes: numpy has no bfloat16, and the bytes are what identity means here anyway.
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


class FrozenFeatureCache:
    """``cache(encode, batch)``: ``encode(batch)``, computing only the items not seen before (least recently used
    entries go first once ``max_items`` are held; None: no limit). ``hits`` / ``misses`` count items."""

    def __init__(self, max_items: int | None = None) -> None:
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
        self.max_items = max_items
        self._store: OrderedDict[bytes, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def __call__(self, encode: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
        keys = [_item_key(x) for x in batch]
        # Unseen items (each distinct one once, even when a batch repeats an image) are encoded in one call.
        new: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self._store and k not in new:
                new[k] = i
        fresh: dict[bytes, Tensor] = {}
        if new:
            with torch.no_grad():
                out = encode(batch[list(new.values())])
            fresh = {k: out[j].detach().clone() for j, k in enumerate(new)}
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        rows = []
        for k in keys:
            if k in fresh:
                rows.append(fresh[k])
            else:
                rows.append(self._store[k])
                self._store.move_to_end(k)
        for k, v in fresh.items():
            self._store[k] = v
        while self.max_items is not None and len(self._store) > self.max_items:
            self._store.popitem(last=False)
        return torch.stack(rows).to(batch.device)
