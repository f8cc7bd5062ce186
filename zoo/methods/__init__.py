"""Methods that act on a LLaVA-like model inside one call: token exit, attention redistribution, grounding heads.

A method is a small object that, for one ``generate`` (or forward) call, contributes three things to the
decoder-layer loop that ``zoo.components.CausalLMWrapper`` owns (``MethodPlan``); the generation engine
(``zoo.components.generation.MultimodalGenerationMixin``) builds the plan from a ``MethodContext`` and applies it to
the prefill *and* every decode step:

* ``hooks``: ``LayerHook`` callables ``hook(i, state) -> LMState | None`` run after decoder layer ``i``. A hook may
  read every field of ``LMState`` (hidden states, RoPE positions, the padding mask of the current tokens, the
  ``LMCache``, which layer ran, the per-layer token counts so far). It may change ``hidden`` (same shape), and it
  drops tokens only through ``model.llm.drop_tokens(state, keep)``, which replaces the hidden states, positions
  (the original RoPE positions are kept), padding, masks and rotary embeddings together; the later layers then cache
  only the kept tokens and decoding continues from that per-layer cache without further help. It may write to
  ``state.extras`` under its own key. It must not touch the cache of layers ``<= i`` nor the weights. A hook tells
  prefill from a decode step by the length of ``state.hidden`` (one token per row when decoding).
* ``layer_kwargs``: keyword arguments handed to every decoder layer; transformers passes them on to the attention
  function (e.g. ``{"attention_capture": AttentionCapture(...)}`` for ``zoo_capture``).
* ``attn_implementation``: the name of an attention function. A method registers it once, at import, with
  transformers' public registries: ``AttentionInterface.register(name, fn)`` and a mask builder under the same name
  (``AttentionMaskInterface.register(name, sdpa_mask)``), as ``zoo.components.attention`` does for
  ``zoo_capture``. The engine switches the language model to it for the call with
  ``zoo.components.attention.use_attention`` (a context manager that sets it and restores the previous one, also on
  error), so the model is unchanged after the call.

Cost is counted from what actually ran: the LM wrapper records, per layer, how many real (non-padding) tokens each
row held (``LMState.layer_lengths``); the engine puts their batch sums in ``GenerationStats.prefill_layer_tokens``
and ``zoo.components.generation.decoder_prefill_flops(llm, state.layer_lengths)`` turns them into prefill FLOPs
(projections, FFN with MoE layers at ``top_k`` experts, attention scores per row), so a method that shortens
sequences is credited exactly. Anything else a method measures (a mean exit layer, a share of attention moved) it
returns from ``Method.finish(prefill_state)`` as ``{name: value}``; the engine stores it in
``GenerationStats.extra`` as ``"<method>/<name>"``, and ``GenerationStats.method`` holds ``Method.spec()``.

Methods are registered by name (``@register_method("name")``) and built from a spec string, the form the command
line takes (``zoo eval --method var:p=0.6,rho=0.5``): ``build_method("var:p=0.6,rho=0.5")``. Option values are parsed
as YAML scalars and checked against the constructor's signature; ``"none"`` is the method that changes nothing.
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
        """Called with the final prefill ``LMState``; returns ``{name: value}`` for ``GenerationStats.extra``."""
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


def _import_method_modules() -> None:
    """Import every module of this package, so the methods they register are known by name (``dyvte``, ``var``...)."""
    # Lazy: these modules import this package (and zoo.components, which imports it back): a top-level import here
    # would close an import cycle.
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def list_methods() -> list[str]:
    _import_method_modules()
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
        _import_method_modules()
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

