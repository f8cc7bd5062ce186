"""DyVTE router configs: the recipe's ``model:`` / ``data:`` / ``eval:`` sections of ``type: dyvte_routers`` (see ``zoo.stages.dyvte``). Kept apart
from the stage module and free of torch so that validating a recipe stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DyVTEModelConfig", "DyVTEEvalConfig"]


@dataclass(kw_only=True)
class DyVTEModelConfig:
    base: str | None = field(
        default=None, metadata={"help": "the LLaVA-like model the routers serve: weights name or directory "
                                        "(None: the stage's init_from)"}
    )  # fmt: skip
    router_hidden: int = field(default=2048, metadata={"min": 1, "help": "router MLP width (official: 2048)"})
    agree_above: float = field(default=0.99, metadata={"help": "label 1 needs answer agreement > this"})
    loss_ratio_below: float = field(default=1.03, metadata={"help": "label 1 needs loss_exit < this x loss_full"})


@dataclass(kw_only=True)
class DyVTEEvalConfig:
    tasks: list[str] = field(default_factory=list, metadata={"help": "eval.run task / group names"})
    limit: int | None = field(default=None, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1})
    thresholds: list[float] = field(default_factory=lambda: [0.5], metadata={"help": "p(exit) thresholds to evaluate"})
