"""The model interface the evaluation runner talks to, and how ``--model NAME_OR_PATH`` becomes a model.

Any object with a ``generate`` method of this shape can be evaluated (a zoo model, a wrapper around another
library, a test double)::

    def generate(self, images: list[PIL.Image.Image | list[PIL.Image.Image] | None], prompts: list[str],
                 max_new_tokens: int = 16, *, media: dict[str, list] | None = None, method: str | None = None,
                 **gen) -> list[str]

``prompts[i]`` is the user-turn text for ``images[i]`` (no media placeholder, no conversation template: the model
applies its own). ``gen`` carries the task's other generation settings (``do_sample=False``, ``temperature``...).
It returns one decoded answer per prompt, without the prompt.

Media of other kinds (video, audio, speech) come in ``media``, keyed by modality name, one entry per prompt (an
item, a list of items, or None), exactly like ``images``; the runner passes ``media=`` only for batches that hold
such media, so an image-only model needs no ``media`` parameter. ``method`` (``zoo eval --method``) is a
``zoo.methods`` spec string such as ``"none"`` or ``"var:p=0.6"``; it is passed only when a method was asked for,
and a model whose ``generate`` takes no ``method`` is then refused before any document runs.

Optional, for the efficiency columns:

* ``num_parameters() -> {"total": int, "active": int}``: active = parameters used per token (for a top-k MoE:
  the non-expert parameters plus k experts per MoE layer). Without it the runner counts ``nn.Module`` parameters and
  reports ``active = total`` with ``"active_reported": false``.
* ``last_generation_stats``: after each ``generate`` call, a ``zoo.components.generation.GenerationStats`` for
  that call. Without it only wall-clock throughput is reported; anything else there (a dict) is ignored with a
  warning.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from zoo.components.generation import GenerationStats

log = logging.getLogger(__name__)

__all__ = [
    "GenerativeModel",
    "GenerationStats",
    "resolve_model",
    "check_generative",
    "NotGenerativeError",
    "count_parameters",
    "read_generation_stats",
    "accepts_keyword",
]


@runtime_checkable
class GenerativeModel(Protocol):
    def generate(
        self, images: list[Image.Image | None], prompts: list[str], max_new_tokens: int = 16, **gen: Any
    ) -> list[str]: ...


def resolve_model(model: Any, **load_kwargs: Any) -> tuple[Any, str]:
    """A model object, a weights name, a checkpoint directory or an architecture name -> (model, display name).

    ``load_kwargs`` (``device=``, ``dtype=``) go to ``zoo.load`` and move a randomly initialised model the same way.

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
        if load_kwargs.get("device") is not None or load_kwargs.get("dtype") is not None:
            from zoo.registry import parse_dtype

            built.to(device=load_kwargs.get("device"), dtype=parse_dtype(load_kwargs.get("dtype")))
        return built, f"{name} (random init)"
    return zoo.load(name, **load_kwargs), name


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


_warned_stats_types: set[tuple[str, str]] = set()


def read_generation_stats(model: Any) -> GenerationStats | None:
    """The model's ``last_generation_stats`` if it is a :class:`GenerationStats`, else None (efficiency columns are
    then left empty and, once per model class, a warning says why; the evaluation goes on)."""
    stats = getattr(model, "last_generation_stats", None)
    if stats is None or isinstance(stats, GenerationStats):
        return stats
    key = (type(model).__name__, type(stats).__name__)
    if key not in _warned_stats_types:
        _warned_stats_types.add(key)
        log.warning(
            "%s.last_generation_stats is a %s, not zoo.components.generation.GenerationStats; no latency columns",
            *key,
        )
    return None


def accepts_keyword(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes the keyword ``name`` (as a parameter or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
