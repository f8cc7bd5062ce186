"""Building blocks shared by model families: vision towers, projectors, the causal-LM layer-loop wrapper, the
generation engine and attention functions for methods."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zoo.components.attention import (
        CAPTURE_ATTENTION,
        AttentionCapture,
        media_key_positions,
        use_attention,
    )
    from zoo.components.generation import GenerationStats, MultimodalGenerationMixin, decoder_prefill_flops
    from zoo.components.lm import (
        CausalLMWrapper,
        LMCache,
        LMOutput,
        LMState,
        build_causal_lm,
        positions_from_mask,
    )
    from zoo.components.projector import PROJECTOR_TYPES, build_projector
    from zoo.components.vision import VisionTower, build_vision_tower
    from zoo.components.vision_config import VisionTowerConfig

# Name -> the submodule that defines it, imported on first access (PEP 562), so that importing a light
# submodule (the recipe validator imports zoo.components.vision_config) does not load torch.
_LAZY = {
    "CAPTURE_ATTENTION": "zoo.components.attention",
    "AttentionCapture": "zoo.components.attention",
    "media_key_positions": "zoo.components.attention",
    "use_attention": "zoo.components.attention",
    "GenerationStats": "zoo.components.generation",
    "MultimodalGenerationMixin": "zoo.components.generation",
    "decoder_prefill_flops": "zoo.components.generation",
    "CausalLMWrapper": "zoo.components.lm",
    "LMCache": "zoo.components.lm",
    "LMOutput": "zoo.components.lm",
    "LMState": "zoo.components.lm",
    "build_causal_lm": "zoo.components.lm",
    "positions_from_mask": "zoo.components.lm",
    "PROJECTOR_TYPES": "zoo.components.projector",
    "build_projector": "zoo.components.projector",
    "VisionTower": "zoo.components.vision",
    "build_vision_tower": "zoo.components.vision",
    "VisionTowerConfig": "zoo.components.vision_config",
}

__all__ = [
    "CAPTURE_ATTENTION",
    "AttentionCapture",
    "media_key_positions",
    "use_attention",
    "GenerationStats",
    "MultimodalGenerationMixin",
    "decoder_prefill_flops",
    "CausalLMWrapper",
    "LMCache",
    "LMOutput",
    "LMState",
    "build_causal_lm",
    "positions_from_mask",
    "PROJECTOR_TYPES",
    "build_projector",
    "VisionTower",
    "build_vision_tower",
    "VisionTowerConfig",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
