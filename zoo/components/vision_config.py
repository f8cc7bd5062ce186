"""``VisionTowerConfig``: what a vision tower is, in a module of its own that imports no torch, so that recipes are
validated against it (``zoo train --check``) without loading torch or transformers. ``zoo.components.vision``
builds towers from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["VISION_TOWER_KINDS", "VisionTowerConfig"]

# The tower kinds ``zoo.components.vision.build_vision_tower`` has a builder for (a test checks that the two agree).
VISION_TOWER_KINDS = ("hf", "open_clip", "timm", "zoo")


@dataclass(frozen=True, kw_only=True)
class VisionTowerConfig:
    """What a tower is. JSON-able, so it rides in a checkpoint's ``model_args``.

    ``kind``: ``"hf"`` (``config`` is a transformers vision config dict with ``model_type`` ``clip_vision_model`` or
    ``siglip_vision_model``), ``"open_clip"`` (``model_name`` is an open_clip config name, ``config`` extra kwargs for
    ``open_clip.create_model``), ``"timm"`` (``model_name`` a timm ViT name, ``config`` kwargs for
    ``timm.create_model``), ``"zoo"`` (``model_name`` a registered mmzoo architecture whose model has an open_clip
    ``.visual``, ``config`` its model_args; the model family builds it and passes the tower to
    ``build_vision_tower``).
    """

    kind: str
    model_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    select_layer: int = -2
    select_feature: str = "patch"
    drop_first_token: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in VISION_TOWER_KINDS:
            raise ValueError(f"vision tower kind {self.kind!r} unknown; use one of {sorted(VISION_TOWER_KINDS)}")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("mean", "std"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | VisionTowerConfig) -> VisionTowerConfig:
        if isinstance(d, VisionTowerConfig):
            return d
        d = dict(d)
        for k in ("mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)
