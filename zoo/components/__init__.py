"""Building blocks shared by model families: vision towers, projectors and the causal-LM layer-loop wrapper."""

from zoo.components.lm import CausalLMWrapper, LMOutput, LMState, build_causal_lm, positions_from_mask
from zoo.components.projector import PROJECTOR_TYPES, build_projector
from zoo.components.vision import VisionTower, VisionTowerConfig, build_vision_tower

__all__ = [
    "CausalLMWrapper",
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
