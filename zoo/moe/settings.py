"""``MoESettings``: the JSON form of ``upcycle_causal_lm``'s arguments, in a module of its own that imports no torch,
so that recipes are validated against it (``zoo train --check``) without loading torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["MoESettings", "LayerSettingsDict"]


class LayerSettingsDict:
    """``from_dict`` / ``to_dict`` for a settings dataclass whose ``layers`` is a mode name or a tuple of layer indices
    (JSON holds the tuple as a list)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | Any) -> Any:
        if isinstance(d, cls):
            return d
        d = dict(d)
        if "layers" in d and not isinstance(d["layers"], str):
            d["layers"] = tuple(int(i) for i in d["layers"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not isinstance(d["layers"], str):
            d["layers"] = list(d["layers"])
        return d


@dataclass(frozen=True, kw_only=True)
class MoESettings(LayerSettingsDict):
    """MoE-tuning settings of a causal LM, the JSON form of ``upcycle_causal_lm``'s arguments (MoE-LLaVA's
    ``config.moe``; defaults are its stage-III scripts). Light to import, so recipes are validated against it."""

    num_experts: int = 4
    top_k: int = 2
    layers: str | tuple[int, ...] = "sparse"  # "sparse" = 0, 2, 4, ...; "dense", "first_half", "second_half"
    capacity_factor: float = 1.5
    eval_capacity_factor: float = 2.0
    min_capacity: int = 0
    aux_loss_coef: float = 0.01
    second_choice_noise: bool = False

