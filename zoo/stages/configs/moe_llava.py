"""MoE-LLaVA configs: the recipe's ``model:`` / ``data:`` / ``eval:`` sections of ``type: moe_llava`` (see ``zoo.stages.moe_llava``). Kept apart
from the stage module and free of torch so that validating a recipe stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from data.shapes import WorldConfig
from zoo.components.vision_config import VisionTowerConfig
from zoo.moe.settings import MoESettings

__all__ = ["MoELLaVAModelConfig", "MoELLaVADataConfig", "MoELLaVAEvalConfig"]


@dataclass(kw_only=True)
class MoELLaVAModelConfig:
    """Which MoE-LLaVA to build; keys other than these are the architecture's own ``model_args``."""

    architecture: str = field(default="moe_llava_tiny", metadata={"help": "a registered moe_llava_* architecture"})
    vision: VisionTowerConfig | None = field(default=None, metadata={"help": "the vision tower (None: the architecture's)"})
    lm: dict[str, Any] | None = field(default=None, metadata={"help": "transformers causal-LM config dict"})
    projector: str = "mlp2x_gelu"
    template: str = field(default="phi", metadata={"help": "conversation template used by generate"})
    tokenizer: Literal["shapes_words", "architecture", "pretrained"] = field(
        default="shapes_words",
        metadata={"help": "shapes_words: the synthetic world's word-level vocabulary; architecture: its default; "
                          "pretrained: a local Hugging Face tokenizer at pretrained_lm"},
    )
    vocab_world: WorldConfig = field(default_factory=WorldConfig, metadata={"help": "the world the vocabulary is read from"})
    vocab_scenes: int = field(default=300, metadata={"min": 1, "help": "train scenes scanned for vocabulary"})
    moe: MoESettings | None = field(
        default=None, metadata={"help": "MoE-tuning settings (stage III); a dense init_from checkpoint is upcycled"}
    )
    image_token_id: int | None = field(default=None, metadata={"help": "None: the tokenizer's <image> (official: -200)"})
    image_pos_embed: bool = field(
        default=False, metadata={"help": "learned per-position embedding added to the image tokens (train it too)"}
    )
    image_newline: bool = field(
        default=False,
        metadata={"help": "LLaVA-NeXT's learned row marker after each row of image tokens (train it too)"},
    )
    image_pos_code: float = field(
        default=0.0,
        metadata={"min": 0.0, "help": "mean norm of a fixed 2-D sine-cosine code of each image token's grid position, "
                                      "added to the projected features (0: off, as in MoE-LLaVA)"},
    )
    cache_tower_features: bool = field(
        default=True,
        metadata={"help": "while the tower is frozen, compute its features once per distinct image and reuse them "
                          "(exact: the same function of the same pixels; about 7% of a stage-II step on the tiny recipe)"},
    )
    image_pos_code_dims: int = field(
        default=0,
        metadata={"min": 0, "help": "how many of the LM's dimensions the position code occupies (0: all; a few "
                                    "leave the rest of the width to the features)"},
    )
    pretrained_lm: str | None = field(
        default=None, metadata={"help": "local Hugging Face causal-LM dir loaded into the LLM (stage I of real recipes)"}
    )
    pretrained_vision: str | None = field(
        default=None, metadata={"help": "local Hugging Face CLIP/SigLIP dir loaded into an hf vision tower"}
    )


@dataclass(kw_only=True)
class MoELLaVADataConfig:
    # the stage reports each record's token count, so a recipe may set the stage's group_by_length
    reports_sample_lengths: ClassVar[bool] = True

    source: Literal["shapes", "llava_json", "webdataset"] = "shapes"
    kind: Literal["caption", "vqa"] = field(default="vqa", metadata={"help": "shapes export: caption or vqa"})
    world: WorldConfig = field(default_factory=WorldConfig, metadata={"help": "the synthetic world (source=shapes)"})
    num_scenes: int = field(default=2000, metadata={"min": 1})
    answer_prompt: bool = field(default=True, metadata={"help": "append LLaVA-1.5's short-answer instruction"})
    answer_prompt_turns: Literal["all", "first"] = field(
        default="all",
        metadata={"help": "shapes vqa: the instruction after every question, or after a conversation's first only "
                          "(the benchmark's single-turn prompts; later turns are then about 10 tokens shorter)"},
    )
    turns_per_conversation: int = field(
        default=3, metadata={"min": 1, "help": "shapes vqa: questions per conversation (a scene gives several)"}
    )
    pope_probes: int = field(
        default=2, metadata={"min": 0, "help": "shapes vqa: POPE probes per scene added as questions"}
    )
    questions_per_kind: dict[Literal["color", "shape", "count", "position", "exist"], int] = field(
        default_factory=dict,
        metadata={"help": "shapes vqa: questions per scene of each kind (color, shape, count, position, exist), "
                          "drawn from fresh draws of the scene's question generator; empty: the scene's own list"},
    )
    extra_spatial: int = field(
        default=0,
        metadata={"min": 0, "help": "shapes vqa: up to this many more questions per scene about where things are "
                                    "(side of the image, relations, colour / shape of an object named by its place; "
                                    "ShapesWorld.spatial_questions)"},
    )
    json_paths: list[str] = field(default_factory=list, metadata={"help": "LLaVA JSON files ($VARS expanded)"})
    image_folder: str | None = field(default=None, metadata={"help": "image root (default: each JSON's folder)"})
    shards: list[str] = field(default_factory=list, metadata={"help": "webdataset .tar shards ($VARS expanded)"})
    template: str | None = field(default=None, metadata={"help": "None: the model's template (stage I: plain)"})
    max_length: int = field(default=2048, metadata={"min": 8})
    truncate: bool = True
    on_error: Literal["raise", "skip"] = field(
        default="raise",
        metadata={"help": "bad records (malformed, bad image, over-long, truncated shard): raise before step 1, or "
                          "skip them and count them (printed at the end of the stage and recorded as summary.json's skipped)"},
    )
    check_images: bool = field(
        default=True,
        metadata={"help": "decode every image before step 1 (about 1 ms each on one core); off: bad images "
                          "surface during training instead (an error, or with on_error=skip dropped and counted)"},
    )


@dataclass(kw_only=True)
class MoELLaVAEvalConfig:
    tasks: list[str] = field(default_factory=list, metadata={"help": "eval.run task / group names"})
    limit: int | None = field(default=None, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1})
