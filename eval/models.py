"""The model interface the evaluation runner talks to, and how ``--model NAME_OR_PATH`` becomes a model.

Any object with a ``generate`` method of this shape can be evaluated (a zoo model, a wrapper around another
library, a test double)::

    def generate(self, images: list[PIL.Image.Image | None], prompts: list[str], max_new_tokens: int = 16,
                 **gen) -> list[str]

``prompts[i]`` is the user-turn text for ``images[i]`` (no image placeholder, no conversation template: the model
applies its own). ``gen`` carries the task's other generation settings (``do_sample=False``, ``temperature``...).
It returns one decoded answer per prompt, without the prompt.

Optional, for the efficiency columns:

* ``num_parameters() -> {"total": int, "active": int}``: active = parameters used per token (for a top-k MoE:
  the non-expert parameters plus k experts per MoE layer). Without it the runner counts ``nn.Module`` parameters and
  reports ``active = total`` with ``"active_reported": false``.
* ``last_generation_stats``: after each ``generate`` call, a :class:`GenerationStats` (or a dict with its fields)
  for that call. Without it only wall-clock throughput is reported.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

__all__ = ["GenerativeModel", "GenerationStats", "resolve_model", "count_parameters", "read_generation_stats"]


@dataclass(frozen=True, kw_only=True)
class GenerationStats:
    """Timing of one batched ``generate`` call, as measured inside the model.

    Attributes:
        prefill_seconds: time to process the prompts (images + text) up to the first generated token.
        decode_seconds: time spent in the token-by-token decode steps after that.
        prompt_tokens: prompt tokens over the batch (image tokens included).
        generated_tokens: new tokens over the batch (not counting padding after a sequence ended).
        decode_steps: number of decode forward passes (the longest sequence's new tokens, minus the prefill one).
    """

    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int
    generated_tokens: int
    decode_steps: int


@runtime_checkable
class GenerativeModel(Protocol):
    def generate(
        self, images: list[Image.Image | None], prompts: list[str], max_new_tokens: int = 16, **gen: Any
    ) -> list[str]: ...


def resolve_model(model: Any) -> tuple[Any, str]:
    """A model object, a registered weights name or a checkpoint directory -> (model, display name)."""
    if isinstance(model, str | os.PathLike):
        import zoo

        name = str(model)
        obj = zoo.load(name)
    else:
        obj, name = model, getattr(model, "name", None) or type(model).__name__
    if not isinstance(obj, GenerativeModel):
        raise TypeError(
            f"model {name!r} ({type(obj).__name__}) has no generate(images, prompts, max_new_tokens, **gen); "
            "eval tasks of output_type generate_until need one (see eval/models.py)"
        )
    return obj, name


def count_parameters(model: Any) -> dict[str, Any]:
    """``{"total", "active", "active_reported"}`` from ``model.num_parameters()`` or by counting module params."""
    fn = getattr(model, "num_parameters", None)
    if callable(fn):
        try:
            counts = fn()
        except TypeError:
            counts = None
        if isinstance(counts, Mapping) and "total" in counts:
            return {"total": int(counts["total"]), "active": int(counts.get("active", counts["total"])),
                    "active_reported": "active" in counts}  # fmt: skip
    params = getattr(model, "parameters", None)
    if callable(params):
        total = sum(p.numel() for p in params())
        return {"total": int(total), "active": int(total), "active_reported": False}
    return {"total": None, "active": None, "active_reported": False}


def read_generation_stats(model: Any) -> GenerationStats | None:
    """The model's ``last_generation_stats`` as a :class:`GenerationStats`, or None if it reports none."""
    stats = getattr(model, "last_generation_stats", None)
    if stats is None or isinstance(stats, GenerationStats):
        return stats
    if isinstance(stats, Mapping):
        names = {f.name for f in dataclasses.fields(GenerationStats)}
        missing = names - set(stats)
        if missing:
            raise ValueError(f"{type(model).__name__}.last_generation_stats lacks {sorted(missing)}")
        return GenerationStats(**{k: stats[k] for k in names})
    raise TypeError(f"{type(model).__name__}.last_generation_stats should be GenerationStats or a dict")
