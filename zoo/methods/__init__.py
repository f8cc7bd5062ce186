"""Methods that act on a LLaVA-like model inside one call: token exit, attention redistribution, grounding heads.

A method is a small object that, for one ``generate`` (or forward) call, contributes three things to the
decoder-layer loop that ``zoo.components.CausalLMWrapper`` owns (``MethodPlan``):

* ``hooks``: ``LayerHook`` callables ``hook(i, state) -> LMState | None`` run after decoder layer ``i``. A hook may
  read every field of ``LMState`` and may replace ``hidden``, ``position_ids`` and ``attention_mask`` *together* to
  drop tokens (then it calls ``CausalLMWrapper.drop_tokens``, which rebuilds masks and rotary embeddings for the
  shortened sequence and keeps the original RoPE positions); it may write to ``state.extras`` (its own key) to
  collect what it measured. It must not touch the cache of layers ``<= i`` nor the weights.
* ``layer_kwargs``: keyword arguments handed to every decoder layer; transformers passes them on to the attention
  function, so a registered attention implementation receives e.g. the image-token spans.
* ``attn_implementation``: the name of an attention function registered with transformers'
  ``AttentionInterface``; the engine switches the LM to it for the call with
  ``zoo.components.attention.use_attention`` (a context manager that sets it and restores the previous one, also on
  error), so the model is unchanged after the call.

Cost is counted from what actually ran: the LM wrapper records, per layer, how many non-padding tokens each row held
(``LMState.layer_lengths``); the generation engine puts them in ``GenerationStats.prefill_layer_tokens`` and
``zoo.components.generation`` turns them into prefill FLOPs, so a method that shortens sequences is credited
exactly. Anything else a method measures (a mean exit layer, a share of attention moved) goes in
``GenerationStats.extra`` under ``"<method>/<name>"`` through ``Method.finish``.

Methods are registered by name (``@register_method("name")``) and built from a spec string, the form the command
line takes (``zoo eval --method var:p=0.6,rho=0.5``): ``build_method("var:p=0.6,rho=0.5")``. Option values are parsed
as YAML scalars and checked against the constructor's signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "Method",
    "MethodPlan",
    "MethodContext",
    "register_method",
    "build_method",
    "list_methods",
    "parse_method_spec",
]


@dataclass
class MethodContext:
    """What a method may look at before the call: the model and the prompt batch (left-padded).

    Attributes:
        model: the LLaVA-like model (has ``llm``, a ``CausalLMWrapper``).
        input_ids: ``[B, T]`` prompt ids with media placeholders expanded.
        attention_mask: ``[B, T]`` padding mask (1 = real token).
        media_mask: ``[B, T]`` bool, True where a position holds media features (image, video, audio tokens).
    """

    model: Any
    input_ids: Any
    attention_mask: Any
    media_mask: Any


@dataclass
class MethodPlan:
    """What a method contributes to one call (see the module docstring)."""

    hooks: list[Callable[..., Any]] = field(default_factory=list)
    layer_kwargs: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str | None = None


class Method:
    """Base class: a method with no effect. Subclasses override ``plan`` (and ``finish`` to report numbers)."""

    name: ClassVar[str] = "none"

    def plan(self, ctx: MethodContext) -> MethodPlan:
        return MethodPlan()

    def finish(self, state: Any) -> dict[str, float]:
        """Called with the final prefill ``LMState``; returns numbers for ``GenerationStats.extra``."""
        return {}

    def spec(self) -> str:
        """The spec string that rebuilds this method (shown in results tables)."""
        opts = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) if opts else "")


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


register_method("none")(Method)


def list_methods() -> list[str]:
    return sorted(_METHODS)


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,k2=v2"`` -> ``("name", {"k": v, "k2": v2})``; values parsed as YAML scalars."""
    import yaml

    name, _, rest = spec.strip().partition(":")
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method spec {spec!r}: option {part!r} is not key=value")
        options[key.strip()] = yaml.safe_load(value)
    return name, options


def build_method(spec: str | Method | None) -> Method:
    """A ``Method`` from a spec string (``None`` or ``"none"``: the method that changes nothing)."""
    if isinstance(spec, Method):
        return spec
    name, options = parse_method_spec(spec or "none")
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(list_methods())}")
    cls = _METHODS[name]
    # object.__init__'s signature is (*args, **kwargs), but a method without its own __init__ takes no options.
    params = {} if cls.__init__ is object.__init__ else inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown and not accepts_any:
        known = sorted(set(params) - {"self", "args", "kwargs"})
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options: {known or 'none'}")
    return cls(**options)
