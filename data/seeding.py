"""Seeds derived from integers, shared by the data code and the training loop (no heavy imports)."""

from __future__ import annotations

__all__ = ["mix_seed"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; distinct tuples give unrelated streams (splitmix64 finaliser)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
