"""VAR, visual attention redistribution (Kang et al., ICLR 2025): training-free, in image-centric heads.

Visual sink tokens draw attention through the language model's massive-activation dimensions but carry little
meaning. In heads that look at the image, VAR takes part of the attention the sinks draw and gives it to the other
visual tokens, in proportion to what they already get. Facts and the official code's quirks:
shared/reference/dyvte_var_flmm.md, section 2. What this module does, per call:

1. **Sinks** (prefill only, cached for the decode steps): token ``j`` is a sink at layer ``l`` when
   ``phi(x_j) > tau`` for the residual state entering layer ``l`` (``zoo.methods.sinks.sink_score``), for every
   token of the row, text or visual; never at layers 0 and 1. Detected per sample at every prefill.
2. **Queries**: in prefill the text tokens after the row's last image token; in decode every generated token.
3. **Layers**: ``2 .. L-2`` (the official config's intent; ``edit_last_layer=true`` also edits ``L-1`` as the
   released code does). A row whose layer has no *visual* sink is left untouched.
4. **Image-centric rows**, per (layer, head, query): visual mass ``S = sum_{j visual} a_j >= summ``, and
   ``rule=official`` (the released code): visual sink share ``1 - r <= rho`` with
   ``r = sum_{visual non-sink} a_j / (S + 1e-6 * n_visual)``; ``rule=paper``: ``r >= rho`` with ``r`` over ``S``.
5. **Edit** (post-softmax, before the value product): every sink weight in a chosen row (text and visual) is scaled
   by the kept fraction and the freed mass goes to the visual non-sinks in proportion to their weights; text
   non-sinks are unchanged and the row still sums to 1. ``p`` is the fraction KEPT (the released code, default 0.6);
   ``p_moves=true`` reads ``p`` as the fraction moved (the paper's notation).

The edit lives in the attention function ``zoo_var`` (eager math, registered with transformers'
``AttentionInterface`` and ``eager_mask`` in ``AttentionMaskInterface``), which reads a ``VARState`` from the layer
keyword ``var_state``. Without one it is eager attention. On our models the method's plan supplies the state and a
wrapper hook that scores sinks from each layer's output; on a transformers ``LlavaForConditionalGeneration`` use
``var_on_transformers`` around ``forward`` / ``generate``, which does the same with forward pre-hooks on the
decoder layers (PyTorch's public hook API; no model code is replaced).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import eager_mask

from zoo.components.attention import use_attention
from zoo.methods import Method, MethodContext, MethodPlan, register_method
from zoo.methods.sinks import find_sink_dims, resolve_sink_dims, sink_score

__all__ = [
    "VAR_ATTENTION",
    "VARSettings",
    "VARState",
    "VAR",
    "select_image_centric",
    "redistribute",
    "var_attention_forward",
    "var_on_transformers",
]

VAR_ATTENTION = "zoo_var"
SELECTION_EPS = 1e-6  # the released code adds it once per image key to the visual-mass denominator


@dataclass(frozen=True)
class VARSettings:
    """VAR's hyperparameters (defaults: the official config).

    Attributes:
        p: fraction of sink attention KEPT (official); with ``p_moves`` the fraction moved (paper notation).
        rho: head-selection threshold (see ``rule``).
        tau: sink threshold on phi (strict ``>``, as the code).
        summ: minimum visual attention mass of a row.
        rule: ``"official"`` (sink share ``<= rho``) or ``"paper"`` (non-sink share ``>= rho``).
        p_moves: read ``p`` as the fraction moved.
        first_layer: the first layer VAR may act in (sinks are not detected before it).
        edit_last_layer: also edit the last layer (the released code's behaviour).
    """

    p: float = 0.6
    rho: float = 0.5
    tau: float = 20.0
    summ: float = 0.2
    rule: str = "official"
    p_moves: bool = False
    first_layer: int = 2
    edit_last_layer: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"VAR p must lie in [0, 1], got {self.p}")
        if self.rule not in ("official", "paper"):
            raise ValueError(f"VAR rule must be 'official' or 'paper', got {self.rule!r}")

    @property
    def kept(self) -> float:
        return 1.0 - self.p if self.p_moves else self.p

    def acts_in(self, layer: int, num_layers: int) -> bool:
        last = num_layers - 1 if self.edit_last_layer else num_layers - 2
        return self.first_layer <= layer <= last


def select_image_centric(
    probs: torch.Tensor, visual: torch.Tensor, sinks: torch.Tensor, settings: VARSettings
) -> torch.Tensor:
    """``[B, H, Q, S]`` attention, ``[B, S]`` visual and sink key masks -> ``[B, H, Q]`` image-centric rows."""
    vis = visual[:, None, None, :].to(probs.dtype)
    non_sink = (visual & ~sinks)[:, None, None, :].to(probs.dtype)
    mass = (probs * vis).sum(-1)
    kept_visual = (probs * non_sink).sum(-1)
    if settings.rule == "official":
        n_visual = visual.sum(-1).to(probs.dtype)[:, None, None]
        share = kept_visual / (mass + SELECTION_EPS * n_visual)
        chosen = (1.0 - share) <= settings.rho
    else:
        share = kept_visual / mass.clamp_min(torch.finfo(probs.dtype).tiny)
        chosen = share >= settings.rho
    return chosen & (mass >= settings.summ)


def redistribute(
    probs: torch.Tensor, visual: torch.Tensor, sinks: torch.Tensor, rows: torch.Tensor, kept: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit the ``[B, H, Q]`` ``rows`` of ``probs``: sinks keep ``kept`` of their weight, the rest goes to visual
    non-sinks in proportion to their weights. Returns ``(new probs, moved mass per row [B, H, Q])``."""
    sink = sinks[:, None, None, :]
    target = (visual & ~sinks)[:, None, None, :]
    sink_mass = probs.masked_fill(~sink, 0).sum(-1, keepdim=True)
    target_mass = probs.masked_fill(~target, 0).sum(-1, keepdim=True)
    budget = (1.0 - kept) * sink_mass
    # rows without visual non-sink weight get no budget (they are never image-centric, see select_image_centric)
    gain = torch.where(target_mass > 0, budget / target_mass.clamp_min(torch.finfo(probs.dtype).tiny), 0.0)
    edited = torch.where(sink, probs * kept, torch.where(target, probs * (1.0 + gain), probs))
    rows = rows & (target_mass[..., 0] > 0)
    return torch.where(rows[..., None], edited, probs), torch.where(rows, budget[..., 0], 0.0)


@dataclass
class VARState:
    """One call's VAR bookkeeping, shared by the sink detector and the attention function.

    Attributes:
        settings: the hyperparameters.
        dims: the sink dimensions.
        num_layers: decoder layers of the LM.
        visual: ``[B, T]`` prompt positions holding image tokens.
        queries: ``[B, T]`` prompt positions VAR edits in prefill (text after the row's last image token).
        padding: ``[B, T]`` real prompt tokens.
        sinks: per layer, ``[B, T]`` sink positions of the prompt (from the prefill).
        record: if True, the prefill keeps per layer (edited or not), in ``maps[layer]``, the attention of every
            query before the edit (``"before"``, ``[B, H, T, T]``), the last query's after it (``"after"``,
            ``[B, H, T]``), the image-centric rows by the selection rule (``"centric"``, ``[B, H, T]``, whether or
            not VAR acts in the layer) and the rows it edited (``"chosen"``): for pictures and checks on small
            inputs. With ``record``, ``phi`` keeps each layer's ``[B, T]`` sink scores too.
        rows / chosen / moved: counted over the edited layers: query rows x heads seen, chosen, mass moved.
    """

    settings: VARSettings
    dims: tuple[int, ...]
    num_layers: int
    visual: torch.Tensor
    queries: torch.Tensor
    padding: torch.Tensor
    sinks: dict[int, torch.Tensor] = field(default_factory=dict)
    record: bool = False
    maps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    phi: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: float = 0.0
    chosen: float = 0.0
    moved: float = 0.0
    prefill_rows: float = 0.0
    prefill_chosen: float = 0.0
    prefill_moved: float = 0.0

    @classmethod
    def for_prompt(
        cls, settings: VARSettings, dims: tuple[int, ...], num_layers: int, visual: torch.Tensor,
        padding: torch.Tensor, record: bool = False,
    ) -> VARState:  # fmt: skip
        t = visual.shape[1]
        pos = torch.arange(t, device=visual.device).expand_as(visual)
        last_visual = torch.where(visual, pos, -1).amax(1, keepdim=True)
        queries = (pos > last_visual) & padding.bool() & (last_visual >= 0)
        return cls(settings, dims, num_layers, visual.bool(), queries, padding.bool(), record=record)

    @property
    def prompt_len(self) -> int:
        return self.visual.shape[1]

    def detect(self, layer: int, hidden: torch.Tensor) -> None:
        """Score the prompt's residual states entering ``layer`` (prefill only) and keep its sinks."""
        if layer < self.settings.first_layer or layer >= self.num_layers:
            return
        phi = sink_score(hidden, self.dims)
        self.sinks[layer] = (phi > self.settings.tau) & self.padding
        if self.record:
            self.phi[layer] = phi.detach().cpu()

    def keys_for(self, mask: torch.Tensor, kv_len: int) -> torch.Tensor:
        """A ``[B, T]`` prompt mask over ``kv_len`` keys: generated tokens (after the prompt) are False."""
        if kv_len < self.prompt_len:
            raise ValueError(f"VAR: {kv_len} keys but a {self.prompt_len}-token prompt (tokens were dropped?)")
        return nn.functional.pad(mask, (0, kv_len - self.prompt_len), value=False)

    def edit(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        """Apply VAR to a layer's ``[B, H, Q, S]`` fp32 attention; returns the edited tensor."""
        q_len, kv_len = probs.shape[-2:]
        prefill = q_len == self.prompt_len and kv_len == self.prompt_len
        acts = self.settings.acts_in(layer, self.num_layers) and layer in self.sinks
        if not acts and not (prefill and self.record):
            return probs
        visual = self.keys_for(self.visual, kv_len)
        sinks = self.keys_for(self.sinks[layer], kv_len) if layer in self.sinks else torch.zeros_like(visual)
        queries = self.queries if prefill else torch.ones(probs.shape[0], q_len, dtype=torch.bool, device=probs.device)
        centric = select_image_centric(probs, visual, sinks, self.settings) & queries[:, None, :]
        edited, chosen = probs, torch.zeros_like(centric)
        if acts:
            has_visual_sink = (sinks & visual).any(-1)
            chosen = centric & has_visual_sink[:, None, None]
            edited, moved = redistribute(probs, visual, sinks, chosen, self.settings.kept)
            n_rows = float(queries.sum()) * probs.shape[1]
            n_chosen, n_moved = float(chosen.sum()), float(moved.sum())
            self.rows, self.chosen, self.moved = self.rows + n_rows, self.chosen + n_chosen, self.moved + n_moved
            if prefill:
                self.prefill_rows += n_rows
                self.prefill_chosen += n_chosen
                self.prefill_moved += n_moved
        if prefill and self.record:
            self.maps[layer] = {
                "before": probs.detach().cpu(),
                "after": edited[:, :, -1].detach().cpu(),
                "centric": centric.detach().cpu(),
                "chosen": chosen.detach().cpu(),
            }
        return edited

    def summary(self) -> dict[str, float]:
        """Shares over the edited layers: query rows x heads chosen, and attention mass moved per row."""
        visual_sinks = [float((s & self.visual).sum(-1).float().mean()) for s in self.sinks.values()]
        return {
            "heads_selected": self.chosen / self.rows if self.rows else 0.0,
            "attention_moved": self.moved / self.rows if self.rows else 0.0,
            "prefill_heads_selected": self.prefill_chosen / self.prefill_rows if self.prefill_rows else 0.0,
            "prefill_attention_moved": self.prefill_moved / self.prefill_rows if self.prefill_rows else 0.0,
            "visual_sinks_per_layer": sum(visual_sinks) / len(visual_sinks) if visual_sinks else 0.0,
        }


def var_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    var_state: VARState | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with VAR's post-softmax edit (before dropout and the value product) when ``var_state``
    is given; without it, transformers' eager attention."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
    if var_state is not None:
        probs = var_state.edit(int(module.layer_idx), probs)
    probs = nn.functional.dropout(probs.to(query.dtype), p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register(VAR_ATTENTION, var_attention_forward)
# The function adds a float mask, as eager attention does (a registered name without a builder gets no mask at all).
AttentionMaskInterface.register(VAR_ATTENTION, eager_mask)


@register_method("var")
class VAR(Method):
    """Visual attention redistribution (see the module docstring); options are ``VARSettings``' plus ``dims``:
    ``auto`` (found on the model with ``find_sink_dims``, once per model), a ``PUBLISHED_SINK_DIMS`` key, or
    dimensions joined by ``+``; ``record=true`` keeps the attention maps for pictures."""

    def __init__(
        self,
        p: float = 0.6,
        rho: float = 0.5,
        tau: float = 20.0,
        summ: float = 0.2,
        rule: str = "official",
        p_moves: bool = False,
        edit_last_layer: bool = False,
        dims: str | int | None = "auto",
        record: bool = False,
    ) -> None:
        self.p, self.rho, self.tau, self.summ, self.rule = p, rho, tau, summ, rule
        self.p_moves, self.edit_last_layer, self.dims, self.record = p_moves, edit_last_layer, dims, record
        self._settings = VARSettings(
            p=p, rho=rho, tau=tau, summ=summ, rule=rule, p_moves=p_moves, edit_last_layer=edit_last_layer
        )
        self._fixed_dims = resolve_sink_dims(dims)
        self._found: dict[int, tuple[int, ...]] = {}
        self._state: VARState | None = None

    def sink_dims(self, model: Any) -> tuple[int, ...]:
        """The sink dimensions for ``model``: the fixed ones, or found once from a few text-only prompts."""
        if self._fixed_dims is not None:
            return self._fixed_dims
        if id(model) not in self._found:
            self._found[id(model)] = find_sink_dims(model.llm, *probe_prompts(model)).dims
        return self._found[id(model)]

    def plan(self, ctx: MethodContext) -> MethodPlan:
        llm = ctx.model.llm
        state = VARState.for_prompt(
            self._settings, self.sink_dims(ctx.model), len(llm.layers), ctx.media_mask, ctx.attention_mask,
            record=self.record,
        )  # fmt: skip
        self._state = state

        def detect(i: int, lm_state: Any) -> None:
            # the output of layer i is the residual stream entering layer i + 1; decode steps reuse the prefill's
            if lm_state.hidden.shape[1] == state.prompt_len:
                state.detect(i + 1, lm_state.hidden)

        return MethodPlan(hooks=[detect], layer_kwargs={"var_state": state}, attn_implementation=VAR_ATTENTION)

    def finish(self, state: Any) -> dict[str, float]:
        return self._state.summary() if self._state is not None else {}

    @property
    def last_state(self) -> VARState | None:
        """The ``VARState`` of the latest call (its sinks, counts and, with ``record``, its maps)."""
        return self._state


PROBE_PROMPTS = (
    "What is in the image?",
    "Describe the scene briefly.",
    "How many objects are there?",
    "Is there a red circle?",
)


def probe_prompts(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-only prompts in ``model``'s template (left-padded ids and mask) to look for sink dimensions with."""
    batch = model.build_generation_inputs([None] * len(PROBE_PROMPTS), list(PROBE_PROMPTS), True)
    dev = next(model.parameters()).device
    return batch["input_ids"].to(dev), batch["attention_mask"].to(dev)


@contextmanager
def var_on_transformers(
    model: Any,
    method: VAR,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    dims: tuple[int, ...] | None = None,
) -> Iterator[VARState]:
    """Run a transformers ``LlavaForConditionalGeneration`` with VAR inside the block (forward or generate).

    ``input_ids`` is the (left-padded) prompt batch the block runs; image positions are its ``image_token_id``
    entries. Sink dimensions: ``dims``, else the method's fixed ones (``auto`` needs text prompts to probe, which a
    token batch does not give: find them once with ``find_sink_dims(model, text_ids)`` and pass them). Forward pre-hooks on the decoder layers score sinks on the residual stream in prefill and hand
    every layer the ``VARState``; the attention implementation switches to ``zoo_var`` for the block only.
    """
    dims = dims or method._fixed_dims
    if dims is None:
        raise ValueError(
            "var_on_transformers needs sink dims: pass dims= (a published set, or find_sink_dims(model, text_ids).dims)"
            " or build VAR with dims=..."
        )
    layers = model.model.language_model.layers
    visual = input_ids == model.config.image_token_id
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    state = VARState.for_prompt(method._settings, tuple(dims), len(layers), visual, mask, record=method.record)
    method._state = state

    def pre_hook(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == state.prompt_len:
            state.detect(layer.self_attn.layer_idx, hidden)
        return args, {**kwargs, "var_state": state}

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    try:
        with use_attention(model, VAR_ATTENTION):
            yield state
    finally:
        for handle in handles:
            handle.remove()
