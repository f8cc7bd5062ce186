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
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

log = logging.getLogger(__name__)

__all__ = [
    "GenerativeModel",
    "GenerationStats",
    "resolve_model",
    "check_generative",
    "NotGenerativeError",
    "count_parameters",
    "read_generation_stats",
]


@dataclass(frozen=True, kw_only=True)
class GenerationStats:
    """Timing of one batched ``generate`` call, as measured inside the model.

    Attributes:
        prefill_seconds: time to process the prompts (images + text) up to the first generated token.
        decode_seconds: time spent in the token-by-token decode steps after that.
        generated_tokens: new tokens over the batch (not counting padding after a sequence ended).
        prompt_tokens: prompt tokens (image tokens included), as the model counts them.
        decode_steps: decode forward passes; if None, decode latency per step is estimated as
            ``decode_seconds * batch_size / generated_tokens`` (exact when all sequences have the same length).
        batch_size: prompts in the call.
    """

    prefill_seconds: float
    decode_seconds: float
    generated_tokens: int
    prompt_tokens: int | None = None
    decode_steps: int | None = None
    batch_size: int | None = None


# Other spellings accepted in a ``last_generation_stats`` dict (the zoo MoE-LLaVA model reports these).
_STATS_ALIASES = {
    "prefill_s": "prefill_seconds",
    "decode_s": "decode_seconds",
    "new_tokens": "generated_tokens",
}


@runtime_checkable
class GenerativeModel(Protocol):
    def generate(
        self, images: list[Image.Image | None], prompts: list[str], max_new_tokens: int = 16, **gen: Any
    ) -> list[str]: ...


def resolve_model(model: Any) -> tuple[Any, str]:
    """A model object, a weights name, a checkpoint directory or an architecture name -> (model, display name).

    A bare architecture name (``zoo list``) builds the model with random weights, for smoke runs before any weights
    exist; the display name then says so.
    """
    if not isinstance(model, str | os.PathLike):
        return model, getattr(model, "name", None) or type(model).__name__
    import zoo
    from zoo.registry import list_models, list_pretrained

    name = str(model)
    if not os.path.exists(name) and name not in list_pretrained() and name in list_models():
        log.warning("%s is an architecture without weights: evaluating a randomly initialised model", name)
        built = zoo.create_model(name)
        built.eval()
        return built, f"{name} (random init)"
    return zoo.load(name), name


class NotGenerativeError(TypeError):
    """The model cannot answer text prompts (no ``generate``)."""


def check_generative(model: Any, name: str) -> None:
    """Raise unless ``model`` implements :class:`GenerativeModel` (needed by ``generate_until`` tasks)."""
    if not isinstance(model, GenerativeModel):
        raise NotGenerativeError(
            f"model {name!r} ({type(model).__name__}) has no generate(images, prompts, max_new_tokens, **gen); "
            "eval tasks of output_type generate_until need one (see eval/models.py)"
        )


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
    """The model's ``last_generation_stats`` as a :class:`GenerationStats`, or None if it reports none (or an
    unusable dict: efficiency columns are then left empty and a warning is logged, the evaluation goes on)."""
    stats = getattr(model, "last_generation_stats", None)
    if not stats or isinstance(stats, GenerationStats):
        return stats or None
    if dataclasses.is_dataclass(stats):  # zoo.components.generation.GenerationStats (its fields are a superset)
        stats = dataclasses.asdict(stats)
    if not isinstance(stats, Mapping):
        log.warning("%s.last_generation_stats is a %s; expected GenerationStats or a dict", type(model).__name__,
                    type(stats).__name__)  # fmt: skip
        return None
    names = {f.name for f in dataclasses.fields(GenerationStats)}
    values = {_STATS_ALIASES.get(k, k): v for k, v in stats.items()}
    values = {k: v for k, v in values.items() if k in names}
    missing = {"prefill_seconds", "decode_seconds", "generated_tokens"} - set(values)
    if missing:
        log.warning(
            "%s.last_generation_stats lacks %s; no latency columns", type(model).__name__, sorted(missing)
        )
        return None
    ints = ("generated_tokens", "prompt_tokens", "decode_steps", "batch_size")
    return GenerationStats(**{k: (int(v) if k in ints and v is not None else v) for k, v in values.items()})
