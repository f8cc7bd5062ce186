"""Building blocks shared by model families: vision towers, projectors, the causal-LM layer-loop wrapper, the
generation engine and attention functions for methods."""

from zoo.components.attention import CAPTURE_ATTENTION, AttentionCapture, media_key_positions, use_attention
from zoo.components.generation import (
    GenerationStats,
    MultimodalGenerationMixin,
    decoder_prefill_flops,
)
from zoo.components.lm import (
    CausalLMWrapper,
    LMCache,
    LMOutput,
    LMState,
    build_causal_lm,
    positions_from_mask,
)
from zoo.components.projector import PROJECTOR_TYPES, build_projector
from zoo.components.vision import VisionTower, VisionTowerConfig, build_vision_tower

__all__ = [
    "AttentionCapture",
    "CAPTURE_ATTENTION",
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
    "VisionTowerConfig",
    "build_vision_tower",
]
