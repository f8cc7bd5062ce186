"""Projectors from vision features to the LM's embedding space (LLaVA's ``mm_projector``)."""

from __future__ import annotations

from torch import nn

__all__ = ["PROJECTOR_TYPES", "build_projector"]


def _linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, out_dim))


def _mlp(depth: int):
    def build(in_dim: int, out_dim: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)

    return build


# Names as in LLaVA / MoE-LLaVA's ``mm_projector_type``. All are nn.Sequential so that parameter names are
# ``<i>.weight`` like the official ``mm_projector(.image_spatial_proj).<i>.weight`` keys.
PROJECTOR_TYPES = {"linear": _linear, "mlp2x_gelu": _mlp(2), "mlp3x_gelu": _mlp(3)}


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind not in PROJECTOR_TYPES:
        raise ValueError(f"projector type {kind!r} unknown; use one of {sorted(PROJECTOR_TYPES)}")
    return PROJECTOR_TYPES[kind](in_dim, out_dim)
