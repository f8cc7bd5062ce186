"""CLIP contrastive configs: the recipe's ``model:`` / ``data:`` / ``eval:`` sections of ``type: clip_contrastive`` (see ``zoo.stages.clip``). Kept apart
from the stage module and free of torch so that validating a recipe stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ClipModelConfig", "ClipDataConfig", "ClipEvalConfig", "TRAIN_TEMPLATES", "DEFAULT_TEMPLATES"]

# Class-name prompts that may stand in for part of the training captions (data.prompt_prob > 0).
TRAIN_TEMPLATES = ("a {}.", "a photo of a {}.", "a {} shape.")
# World captions always name the size ("a large red circle."), so a text tower trained on them embeds a size-free
# "a red circle." poorly, and averaging the "large" and "small" embeddings mixes two distant directions. The default
# zero-shot classifier therefore keeps one prototype per size template and scores a class by its best match.
DEFAULT_TEMPLATES = ("a large {}.", "a small {}.")


@dataclass(kw_only=True)
class ClipModelConfig:
    architecture: str = field(default="clip_vit_tiny", metadata={"help": "a registered CLIP architecture"})
    context_length: int | None = field(default=None, metadata={"min": 4, "help": "None: the config's"})


@dataclass(kw_only=True)
class ClipDataConfig:
    """The synthetic world the captions come from (see data.shapes.WorldConfig) and how many training scenes."""

    image_size: int = field(default=64, metadata={"min": 32, "max": 336})
    world_seed: int = 0
    min_objects: int = field(default=1, metadata={"min": 1})
    max_objects: int = field(default=1, metadata={"min": 1})
    background: Literal["plain", "noise", "gradient"] = "plain"
    clutter: int = field(default=0, metadata={"min": 0})
    skew: float = field(default=0.0, metadata={"min": 0.0, "help": "Zipf skew of colour x shape frequencies"})
    num_train: int = field(default=4096, metadata={"min": 1, "help": "distinct training scenes (cycled)"})
    prompt_prob: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "share of class prompts"})
    prompt_templates: list[str] = field(default_factory=lambda: list(TRAIN_TEMPLATES))
    hard_negatives: int = field(default=0, metadata={"min": 0, "help": "shape-swapped captions per image"})
    patch_loss: float = field(
        default=0.0,
        metadata={"min": 0.0, "help": "weight of the dense auxiliary loss (penultimate-block patch tokens covered "
                                      "by an object classify its shape and size)"},
    )


@dataclass(kw_only=True)
class ClipEvalConfig:
    split: Literal["val", "test"] = "test"
    num_samples: int = field(default=600, metadata={"min": 1})
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    aggregate: Literal["mean_embedding", "max_score"] = field(
        default="max_score",
        metadata={"help": "mean_embedding: open_clip's prompt ensemble (one averaged text embedding per class); "
                          "max_score: a class scores its best-matching template (one prototype per template)"},
    )
    batch_size: int = field(default=200, metadata={"min": 1})
    max_objects: int | None = field(
        default=None, metadata={"min": 1, "help": "score a world of 1..max_objects objects (None: the training world)"}
    )
