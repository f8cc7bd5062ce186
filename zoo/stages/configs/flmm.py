"""F-LMM grounding configs: the recipe's ``model:`` / ``data:`` / ``eval:`` sections of ``type: flmm`` (see ``zoo.stages.flmm``). Kept apart
from the stage module and free of torch so that validating a recipe stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from data.shapes import WorldConfig

__all__ = ["FLMMModelConfig", "FLMMDataConfig", "FLMMEvalConfig"]


@dataclass(kw_only=True)
class FLMMModelConfig:
    base: str = field(default="moe_llava_tiny.shapes", metadata={"help": "the frozen LMM: weights name or zoo directory"})
    instruction: str = field(default="Please give me a description of the image.",
                             metadata={"help": "user turn before the forced expression"})  # fmt: skip
    merge: Literal["mean", "max"] = "mean"
    map_size: int = field(default=64, metadata={"min": 8, "help": "side of the up-sampled attention maps"})
    unet_channels: int = field(default=32, metadata={"min": 4})
    unet_depth: int = field(default=3, metadata={"min": 1})
    sam: dict[str, Any] | None = field(default=None, metadata={"help": "SamConfig kwargs (None: zoo.models.flmm.TINY_SAM)"})
    sam_weights: str | None = field(default=None, metadata={"help": "transformers SamModel dir for the refiner, or the name of one under zoo/weights/"})
    use_mask_prompt: bool = True
    use_box_prompt: bool = True
    use_text_prompt: bool = True
    coord_channels: bool = field(default=False, metadata={"help": "x, y channels for the U-Net (CoordConv)"})
    word_slots: int = field(default=0, metadata={"min": 0, "help": "also the maps of the first N words, apart"})
    word_slot_channels: int = field(default=4, metadata={"min": 1, "help": "channels each word's maps reduce to"})
    text_film: int = field(default=0, metadata={"min": 0, "help": "FiLM the U-Net on the expression (width; 0 = off)"})
    image_channels: bool = field(default=False, metadata={"help": "the image's RGB (SAM's input) as U-Net channels"})
    pixel_refine: int = field(default=0, metadata={"min": 0, "help": "width of a pixel-level correction of the refined "
                              "mask from the image (0 = off)"})  # fmt: skip
    sim_maps: int = field(default=0, metadata={"min": 0,
                          "help": "learned expression-to-image-token similarity maps per layer (0 = off)"})  # fmt: skip
    sim_dim: int = field(default=16, metadata={"min": 1})
    cpu_threads: int | None = field(
        default=None,
        metadata={"min": 1, "help": "torch intra-op threads when training on CPU (null: torch's default); pin it "
                  "to repeat a run's numbers, since the thread count changes the order of float sums"},
    )


@dataclass(kw_only=True)
class FLMMDataConfig:
    sources: list[Literal["shapes", "refcoco", "png"]] = field(default_factory=lambda: ["shapes"])
    world: WorldConfig = field(default_factory=WorldConfig, metadata={"help": "the synthetic world (shapes)"})
    num_scenes: int = field(default=3000, metadata={"min": 1, "help": "shapes: train scenes"})
    repeat_kinds: dict[str, int] = field(default_factory=dict,
                                         metadata={"help": "shapes: times each sample of a kind is listed, e.g. "
                                                   "{relation: 3}; unlisted kinds once"})  # fmt: skip
    refcoco_root: str | None = field(default=None, metadata={"help": "refcoco: folder holding <dataset>/refs(*).p"})
    refcoco_images: str | None = field(default=None, metadata={"help": "refcoco: the COCO train2014 folder"})
    refcoco_datasets: list[str] = field(default_factory=lambda: ["refcoco", "refcoco+", "refcocog"])
    png_narratives: str | None = None
    png_panoptic_json: str | None = None
    png_panoptic_dir: str | None = None
    png_images: str | None = None


@dataclass(kw_only=True)
class FLMMEvalConfig:
    tasks: list[str] = field(default_factory=list, metadata={"help": "eval.run task / group names"})
    limit: int | None = field(default=None, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1})
    baseline: bool = field(default=False, metadata={"help": "also score the union-of-objects baseline (refseg tasks)"})
