"""DiT diffusion configs: the recipe's ``model:`` / ``data:`` / ``eval:`` sections of ``type: dit_diffusion`` (see ``zoo.stages.dit``). Kept apart
from the stage module and free of torch so that validating a recipe stays fast."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Literal

from zoo.models.dit_config import DiTConfig

__all__ = ["DiTModelConfig", "DiTDataConfig", "DiTEvalConfig"]


# Every DiTConfig field, optional: null keeps the registered architecture's value. Derived, so a field added to
# DiTConfig is a recipe key at once (with DiTConfig's type checked by the recipe validator).
_ArchitectureOverrides = make_dataclass(
    "_ArchitectureOverrides",
    [(f.name, typing.get_type_hints(DiTConfig)[f.name] | None, field(default=None)) for f in fields(DiTConfig)],
    kw_only=True,
)


@dataclass(kw_only=True)
class DiTModelConfig(_ArchitectureOverrides):
    """``arch`` (a registered DiT / DiT-MoE name), overrides of its ``DiTConfig`` fields (null = keep) and the
    training-only settings (EMA, CPU threads)."""

    arch: str = field(default="dit_tiny", metadata={"help": "registered architecture, e.g. dit_moe_s_2_8e2a"})
    ema_decay: float = field(default=0.9999, metadata={"min": 0.0, "max": 1.0, "help": "0 disables the EMA"})
    ema_warmup: bool = field(default=False, metadata={"help": "decay min(ema_decay, (1+s)/(10+s)) for short runs"})
    cpu_threads: int | None = field(
        default=None,
        metadata={"min": 1, "help": "torch intra-op threads when training on CPU (null: torch's default). Tiny models "
                  "run several times faster with 1: thread synchronisation costs more than their small matmuls gain"},
    )

    def model_args(self) -> dict[str, Any]:
        """The ``DiTConfig`` overrides that are set (the registered architecture's kwargs)."""
        return {f.name: getattr(self, f.name) for f in fields(DiTConfig) if getattr(self, f.name) is not None}


@dataclass(kw_only=True)
class DiTDataConfig:
    source: Literal["sklearn", "mnist5k", "latents"] = "sklearn"
    image_size: int = 16
    channels: int = 1
    split: Literal["train", "heldout", "all"] = "train"
    shards: str | None = field(default=None, metadata={"help": "latents: glob of webdataset .tar shards"})
    hflip: bool = field(default=False, metadata={"help": "random horizontal flip (ImageNet; never for digits)"})


@dataclass(kw_only=True)
class DiTEvalConfig:
    samples_per_class: int = field(default=50, metadata={"min": 0})
    num_steps: int = field(default=50, metadata={"min": 1})
    cfg_scale: float = 1.5
    sampler: Literal["ddpm", "ddim", "euler"] | None = None
    guidance_channels: int | None = None
    seed: int = 0
    batch_size: int = field(default=250, metadata={"min": 1})
    metrics: bool = field(default=True, metadata={"help": "FID-digits and class accuracy via eval/generation"})
    reference_split: Literal["train", "heldout", "all"] = "all"
    val_batches: int = field(default=4, metadata={"min": 0, "help": "held-out denoising-loss batches"})
