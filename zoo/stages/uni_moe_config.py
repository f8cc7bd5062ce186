"""The ``uni_moe`` stage type's recipe sections (``model:``, ``data:``, ``eval:``) as plain dataclasses.

Kept free of torch, transformers and lightning so that a recipe validates in well under a second; the stage module
(``zoo.stages.uni_moe``) imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["AVWorldSettings", "UniMoEModelConfig", "UniMoEDataConfig", "UniMoEEvalConfig"]

Modality = Literal["image", "video", "audio", "speech"]


@dataclass(frozen=True, kw_only=True)
class AVWorldSettings:
    """The synthetic worlds (``data.shapes_av.AVWorlds``); the defaults are those of the shapes_av eval tasks."""

    image_size: int = field(default=64, metadata={"min": 32, "help": "scene and video frame size (px)"})
    num_frames: int = field(default=8, metadata={"min": 3, "help": "frames per video (model.video_frames must match)"})
    seed: int = 0
    snr_db: float = field(default=10.0, metadata={"help": "noise level of the sound clips"})


@dataclass(kw_only=True)
class UniMoEModelConfig:
    """Which Uni-MoE to build. The stage a recipe entry is follows from these settings (zoo/stages/uni_moe.py):
    ``uni_moe: null`` builds the dense model (stages 1 and 2); ``uni_moe`` + ``lora`` the LoRA-expert model
    (stage 3), whose experts start from the FFNs of the stages named in ``expert_sources``."""

    architecture: str = field(default="uni_moe_tiny", metadata={"help": "a registered uni_moe_* architecture"})
    vision: dict[str, Any] | None = field(default=None, metadata={"help": "vision tower dict (None: the architecture's)"})
    lm: dict[str, Any] | None = field(default=None, metadata={"help": "transformers causal-LM config dict"})
    speech: dict[str, Any] | None = field(
        default=None, metadata={"help": "Whisper speech path (WhisperSpeechConfig dict; None: the architecture's)"}
    )
    audio: dict[str, Any] | None = field(
        default=None, metadata={"help": "BEATs + Q-Former path (AudioSettings dict; None: the architecture's)"}
    )
    video_frames: int | None = field(default=None, metadata={"min": 1, "help": "frames per video item"})
    video_pooling: Literal["mean", "frames"] | None = field(
        default=None, metadata={"help": "mean: the paper's mean over frames (order lost); frames: frames kept in "
                                        "order, each pooled video_frame_pool x video_frame_pool (None: mean)"})
    video_frame_pool: int | None = field(default=None, metadata={"min": 1, "help": "with video_pooling: frames"})
    image_pos_code: float | None = field(
        default=None, metadata={"min": 0.0, "help": "mean norm of a fixed 2-D code of each image token's grid place "
                                                    "added to the projected features, video frames too (None / 0: off)"})
    video_time_code: float | None = field(
        default=None, metadata={"min": 0.0, "help": "with video_pooling: frames, mean norm of a fixed code of the "
                                                    "frame index added to that frame's tokens (None / 0: off)"})
    template: str | None = field(default=None, metadata={"help": "conversation template (None: the architecture's)"})
    tokenizer: Literal["av_words", "architecture", "pretrained"] = field(
        default="av_words",
        metadata={"help": "av_words: word-level vocabulary of the synthetic worlds (vocab_world, vocab_items); "
                          "architecture: its default; pretrained: the Hugging Face tokenizer at pretrained_lm"},
    )
    vocab_world: AVWorldSettings = field(default_factory=AVWorldSettings)
    vocab_items: int = field(default=300, metadata={"min": 1, "help": "train scenes / clips scanned for words"})
    uni_moe: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "MoE layers (UniMoESettings: num_experts, top_k, layers, router, expert_lora_rank...); "
                          "null: the dense model of stages 1 and 2"},
    )
    lora: dict[str, Any] | None = field(
        default=None, metadata={"help": "LoRA on the attention projections (LoRASettings: rank, alpha, dropout, targets)"}
    )
    expert_sources: list[str] = field(
        default_factory=list,
        metadata={"help": "earlier stages (one per expert, in expert order) whose fine-tuned FFNs become the experts; "
                          "empty: every expert copies init_from's FFN"},
    )
    init_other: Literal["vision", "vision_lm"] = field(
        default="vision",
        metadata={"help": "what an init_from of another architecture (a LLaVA-like model) gives: its vision tower, "
                          "or also its projector and LM (model.lm must describe the same LM; token rows matched by "
                          "word between the vocabularies; an MoE layer's experts averaged into the dense FFN)"},
    )
    widen_ffn: int = field(
        default=1, metadata={"min": 1, "help": "dense baseline: the LM's FFNs are this many times as wide as "
                                               "init_from's (2 with top-2 experts: the MoE model's activated size)"}
    )
    pretrained_lm: str | None = field(
        default=None, metadata={"help": "local Hugging Face causal-LM dir loaded into the LLM (first stage only)"}
    )
    pretrained_vision: str | None = field(
        default=None, metadata={"help": "local Hugging Face CLIP dir loaded into an hf vision tower (first stage only)"}
    )
    pretrained_whisper: str | None = field(
        default=None, metadata={"help": "local Hugging Face Whisper dir loaded into the speech path (first stage only)"}
    )

    def __post_init__(self) -> None:
        if self.expert_sources:
            if self.uni_moe is None:
                raise ValueError("expert_sources needs uni_moe (the MoE layers the experts go into)")
            experts = int(self.uni_moe.get("num_experts", 4))
            if len(self.expert_sources) != experts:
                raise ValueError(f"expert_sources names {len(self.expert_sources)} stages for {experts} experts "
                                 "(uni_moe.num_experts); name one stage per expert")
        if self.widen_ffn > 1 and self.uni_moe is not None:
            raise ValueError("widen_ffn builds a dense baseline; it needs uni_moe: null")
        if self.tokenizer == "pretrained" and self.pretrained_lm is None:
            raise ValueError("tokenizer: pretrained reads the tokenizer at pretrained_lm; set pretrained_lm")

    def earlier_stage_refs(self) -> list[tuple[str, str]]:
        """``(key path, stage name)`` of every other stage this one reads besides ``init_from`` (the recipe
        validator checks that each names an earlier stage)."""
        return [(f"model.expert_sources[{k}]", name) for k, name in enumerate(self.expert_sources)]


@dataclass(kw_only=True)
class UniMoEDataConfig:
    source: Literal["shapes_av", "unimoe_json"] = field(
        default="shapes_av", metadata={"help": "the synthetic worlds, or Uni-MoE JSON files (data.unimoe)"}
    )
    kind: Literal["caption", "instruction"] = field(
        default="instruction", metadata={"help": "shapes_av: caption (stage 1) or instruction (stages 2, 3) samples"}
    )
    modalities: list[Modality] = field(
        default_factory=lambda: ["image", "video", "audio", "speech"],
        metadata={"help": "shapes_av: the modalities mixed, one sample of each in turn"},
    )
    items_per_modality: int = field(default=2000, metadata={"min": 1, "help": "shapes_av: samples per modality"})
    world: AVWorldSettings = field(default_factory=AVWorldSettings)
    json_paths: list[str] = field(default_factory=list, metadata={"help": "Uni-MoE JSON files ($VARS expanded)"})
    media_root: str | None = field(default=None, metadata={"help": "media root (default: each JSON's folder)"})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "bad records: raise before step 1, or skip and count them"}
    )
    max_length: int = field(default=512, metadata={"min": 8, "help": "longer samples are an error (media cannot be cut)"})


@dataclass(kw_only=True)
class UniMoEEvalConfig:
    tasks: list[str] = field(default_factory=list, metadata={"help": "eval.run task / group names"})
    limit: int | None = field(default=None, metadata={"min": 1})
    batch_size: int = field(default=32, metadata={"min": 1})
    routing_samples: int = field(
        default=0,
        metadata={"min": 0, "help": "MoE models: instruction samples per modality whose routing is recorded "
                                    "(routing.json and routing.png, experts used per modality)"},
    )
