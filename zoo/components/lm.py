"""A causal-LM wrapper that owns the decoder-layer loop.

The Hugging Face causal LM is held by composition. We embed through its input embeddings, build its rotary
embeddings and attention masks through the public ``masking_utils`` functions, call its decoder layers ourselves
(with a ``DynamicCache`` for incremental decoding), then apply its final norm and ``lm_head``. Owning the loop lets
a method act between layers (drop visual tokens, read the residual stream, capture attention) without patching
transformers.

Per-layer lengths: a hook may shorten the sequence after any layer (``CausalLMWrapper.drop_tokens``). The layers
after it then run on, and cache, only the kept tokens; the ``LMCache`` remembers each layer's padding and each row's
next RoPE position, so decode steps (``llm(input_ids=next_ids[:, None], cache=cache)``, no attention mask) build
every layer's mask from that layer's own cache. A drop may also ask the loop to run the layers after it on
sub-batches grouped by length (``drop_tokens(..., group_min_saving=...)``), so rows that became short stop paying for
the padding of the rows that did not; the sub-batches' caches are joined back into one left-padded cache per layer at
the end of the forward, and decoding runs on the whole batch as before.

Written against transformers 5.x, where decoder layers take ``cache=`` and return a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

__all__ = ["LMState", "LMCache", "LMOutput", "CausalLMWrapper", "LayerHook", "build_causal_lm", "positions_from_mask"]

# Where each architecture keeps the parts our loop needs, keyed by ``config.model_type`` (the config says what the
# model is). Everything not listed uses the common layout: ``<base>.norm`` and no embedding dropout.
_FINAL_NORM = {"phi": "final_layernorm"}
_EMBED_DROPOUT = {"phi": "embed_dropout"}

_MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


@dataclass
class LMState:
    """What flows from one decoder layer to the next.

    A hook (run after layer ``state.layer``) may read every field. To drop tokens it calls
    ``CausalLMWrapper.drop_tokens(state, keep)``, which replaces ``hidden``, ``position_ids``, ``padding_mask``,
    ``attention_mask``, ``masks`` and ``position_embeddings`` together; it must not edit those fields one by one.
    """

    hidden: torch.Tensor  # [B, T, D]
    position_ids: torch.Tensor  # [B, T] RoPE positions (the original ones, also after tokens were dropped)
    padding_mask: torch.Tensor  # [B, T] 1 = real token, 0 = left padding, for the tokens in ``hidden``
    attention_mask: torch.Tensor  # [B, past + T] padding over the keys of the next layer (its cache + ``hidden``)
    cache: LMCache | None
    masks: dict[str, Any] = field(default_factory=dict)  # layer type -> mask in the backend's format
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    layer: int = -1  # the decoder layer that ran last (-1: none yet)
    # Per decoder layer that ran, the real (non-padding) tokens each row held: ``[B]`` long tensors. FLOPs are counted
    # from these, so a method that shortens sequences is credited exactly.
    layer_lengths: list[torch.Tensor] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # free slot for methods (captured maps, router inputs)
    # Extra keyword arguments for every decoder layer; transformers passes them on to the attention function, so a
    # registered attention implementation (AttentionInterface) can receive e.g. image-token spans.
    layer_kwargs: dict[str, Any] = field(default_factory=dict)
    # The cached-key padding ``masks`` were built for; the loop rebuilds them when the next layer's differs.
    mask_past: torch.Tensor | None = field(default=None, repr=False)
    # The rows of the forward's batch this state holds (``[b]`` long), or None for all of them. After a
    # ``drop_tokens(..., group_min_saving=...)`` the loop may run the next layers on sub-batches grouped by length;
    # a hook that keeps per-row records indexes them with ``rows``.
    rows: torch.Tensor | None = None
    # Set by ``drop_tokens(..., group_min_saving=s)``: after the hooks the loop splits this state into length groups
    # if that saves at least the share ``s`` of the padded token-slots.
    regroup: float | None = field(default=None, repr=False)
    # With ``regroup``: the tokens to keep (``[B, T]`` bool), applied by the loop together with the split, so a
    # grouped drop copies each kept token once (straight into its sub-batch) instead of compacting, then splitting.
    pending_keep: torch.Tensor | None = field(default=None, repr=False)


class LMCache:
    """The wrapper's KV cache: a transformers ``DynamicCache`` plus what per-layer lengths need.

    After a hook dropped tokens, the layers after it cache fewer tokens than the layers before it. To decode from
    such a cache each layer needs the padding of the tokens *it* holds, and every row needs its next RoPE position
    (the original positions continue, whatever was dropped). Layers that hold the same tokens share one padding
    tensor (the same object), so the layer loop rebuilds masks only where the object changes between consecutive
    layers: never on the plain path, once more per call after a drop.

    Attributes:
        kv: the transformers cache the decoder layers write to.
        padding: per layer, ``[B, L_i]`` (1 = real token) over the ``L_i`` tokens that layer caches, or None before
            the first forward.
        next_position: ``[B]`` the RoPE position of each row's next token, or None before the first forward.
    """

    def __init__(self, kv: DynamicCache, num_layers: int) -> None:
        self.kv = kv
        self.padding: list[torch.Tensor | None] = [None] * num_layers
        self.next_position: torch.Tensor | None = None

    def get_seq_length(self, layer: int = 0) -> int:
        return self.kv.get_seq_length(layer)

    def uniform(self) -> bool:
        """True when every layer caches the same tokens (nothing was dropped)."""
        return len({self.kv.get_seq_length(i) for i in range(len(self.padding))}) == 1

    def past_padding(self, layer: int, batch_size: int, device: torch.device) -> torch.Tensor:
        """``[B, L_layer]`` padding of the tokens ``layer`` caches (all real if the cache came without a record)."""
        pad = self.padding[layer]
        if pad is None:
            # A cache filled outside the wrapper (or empty): assume no padding, and share the tensor among layers.
            pad = torch.ones(batch_size, self.kv.get_seq_length(layer), dtype=torch.long, device=device)
            for i in range(len(self.padding)):
                if self.padding[i] is None and self.kv.get_seq_length(i) == pad.shape[1]:
                    self.padding[i] = pad
        return pad


@dataclass
class LMOutput:
    logits: torch.Tensor
    hidden: torch.Tensor  # final hidden states after the final norm
    cache: LMCache | None
    state: LMState


# A hook runs after decoder layer ``i``; it may return a new state (or None to keep the given one).
LayerHook = Callable[[int, LMState], "LMState | None"]


def positions_from_mask(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Position ids of the last ``query_len`` columns of a (left-)padded ``[B, S]`` mask: pads do not count."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.clamp(min=0)
    return pos[:, -query_len:]


def build_causal_lm(
    config: dict[str, Any] | PretrainedConfig, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """Build a causal LM from a config (dict with ``model_type`` or a config object); random weights, no download."""
    if isinstance(config, dict):
        if "model_type" not in config:
            raise ValueError(f"LM config dict needs a 'model_type' field (got keys {sorted(config)[:10]})")
        args = {k: v for k, v in config.items() if k != "model_type"}
        config = AutoConfig.for_model(config["model_type"], **args)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


class CausalLMWrapper(nn.Module):
    """Run a Hugging Face causal LM layer by layer.

    Args:
        lm: a transformers ``*ForCausalLM`` (Phi, LLaMA, Qwen2, StableLM, ... with ``<base>.layers``).
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm
        base = lm.base_model
        if not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
            raise TypeError(
                f"{type(lm).__name__}: the LM wrapper needs a decoder with `.layers` and `.rotary_emb` "
                "(LLaMA-style transformers models)"
            )
        model_type = lm.config.model_type
        norm_name = _FINAL_NORM.get(model_type, "norm")
        if not hasattr(base, norm_name):
            raise TypeError(
                f"{type(lm).__name__} (model_type={model_type!r}) has no final norm `{norm_name}`"
            )
        self._norm_name = norm_name
        self._embed_dropout_name = _EMBED_DROPOUT.get(model_type)

    # -- parts -------------------------------------------------------------------------------------------------
    @property
    def config(self) -> PretrainedConfig:
        return self.lm.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.base_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self.lm.base_model, self._norm_name)

    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    def new_cache(self) -> LMCache:
        return LMCache(DynamicCache(config=self.lm.config), len(self.layers))

    def layer_types(self) -> list[str]:
        types = getattr(self.lm.config, "layer_types", None)
        return list(types) if types is not None else ["full_attention"] * len(self.layers)

    # -- masks and positions -----------------------------------------------------------------------------------
    def build_masks(self, state: LMState, layer: int | None = None) -> dict[str, Any]:
        """(Re)build the attention masks for ``state``: its ``attention_mask`` over the keys of decoder ``layer``.

        ``layer`` sizes the mask against that layer's cache (transformers' ``layer_idx``); None uses the first layer
        of each type, which is right whenever all layers cache the same tokens.
        """
        masks = {}
        for kind in sorted(set(self.layer_types())):
            if kind not in _MASK_BUILDERS:
                raise ValueError(
                    f"layer type {kind!r} of {self.lm.config.model_type} is not supported by the wrapper"
                )
            masks[kind] = _MASK_BUILDERS[kind](
                config=self.lm.config,
                inputs_embeds=state.hidden,
                attention_mask=state.attention_mask,
                cache=state.cache.kv if state.cache is not None else None,
                position_ids=state.position_ids,
                layer_idx=layer if kind == "full_attention" else None,
            )
        return masks

    def prepare(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: LMCache | None = None,
    ) -> LMState:
        """Positions, masks and rotary embeddings for a forward over ``inputs_embeds`` (after ``cache``'s tokens).

        ``attention_mask`` covers cached + new tokens, as in transformers; it may be left out when decoding from an
        ``LMCache``, which keeps each layer's padding and each row's next position (required once tokens were
        dropped, because the layers then cache different lengths).
        """
        bsz, q_len = inputs_embeds.shape[:2]
        dev = inputs_embeds.device
        past = cache.get_seq_length(0) if cache is not None else 0
        if attention_mask is not None:
            if cache is not None and not cache.uniform():
                raise ValueError(
                    "the cache holds different lengths per layer (a hook dropped tokens); decode without "
                    "attention_mask: the cache keeps each layer's padding"
                )
            if attention_mask.shape != (bsz, past + q_len):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + new) = "
                    f"({bsz}, {past + q_len})"
                )
            padding = attention_mask[:, past:]
            if cache is not None:
                # The caller's mask states the padding of the cached tokens; every layer caches the same ones.
                cache.padding = [attention_mask[:, :past]] * len(self.layers)
        else:
            padding = torch.ones(bsz, q_len, dtype=torch.long, device=dev)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, q_len)
            else:
                start = (
                    cache.next_position[:, None]
                    if cache is not None and cache.next_position is not None
                    else torch.full((bsz, 1), past, dtype=torch.long, device=dev)
                )
                position_ids = start + torch.arange(q_len, device=dev)
        hidden = inputs_embeds
        if self._embed_dropout_name is not None:
            hidden = getattr(self.lm.base_model, self._embed_dropout_name)(hidden)
        mask_past = cache.past_padding(0, bsz, dev) if cache is not None else None
        state = LMState(
            hidden=hidden,
            position_ids=position_ids,
            padding_mask=padding,
            attention_mask=padding if mask_past is None else torch.cat([mask_past, padding], dim=1),
            cache=cache,
            mask_past=mask_past,
        )
        state.masks = self.build_masks(state)
        state.position_embeddings = self.lm.base_model.rotary_emb(hidden, position_ids)
        return state

    def _sync_masks(self, state: LMState, layer: int) -> None:
        """Rebuild the masks when ``layer`` caches other tokens than the layer the masks were built for."""
        if state.cache is None:
            if not state.masks:  # deferred by ``drop_tokens(..., group_min_saving=...)``
                state.attention_mask = state.padding_mask
                state.masks = self.build_masks(state)
            return
        past = state.cache.past_padding(layer, state.hidden.shape[0], state.hidden.device)
        if past is not state.mask_past or not state.masks:
            state.attention_mask = torch.cat([past, state.padding_mask], dim=1)
            state.masks = self.build_masks(state, layer)
            state.mask_past = past

    def drop_tokens(self, state: LMState, keep: torch.Tensor, group_min_saving: float | None = None) -> LMState:
        """Keep only the tokens where ``keep`` (``[B, T]`` bool) is True, for the layers after ``state.layer``.

        Rows may keep different numbers of tokens. The result is left-padded to the longest kept row, the layout of
        the prompt batch: every row's newest token stays in the last column, so ``logits[:, -1]`` and the decode
        steps that append on the right need no per-row bookkeeping. Kept tokens keep their original RoPE positions;
        the padding mask, the attention masks (sized against the next layer's cache) and the rotary embeddings are
        rebuilt for the shortened sequence. The next layers then cache only the kept tokens, while the layers that
        already ran keep the full sequence; ``LMCache`` records both for decoding.

        ``group_min_saving=s`` lets the loop run the later layers of this prefill on sub-batches grouped by kept
        length (``_regroup``, over the rows of all current sub-batches, at most two) instead of one tensor padded to
        the longest row, when that saves at least the share ``s`` of the padded token-slots (each sub-batch costs one
        more call per layer; 0 splits whenever anything is saved). That is what makes a batch cheaper when only some
        rows dropped tokens. The groups' caches are merged back (left-padded per layer) at the end of the forward, so
        decoding is unchanged. Hooks running after such a drop must index per-row records with
        ``state.rows``.
        """
        if any(kind != "full_attention" for kind in self.layer_types()):
            raise ValueError(
                f"dropping tokens needs full-attention layers only; {self.lm.config.model_type} has "
                f"{sorted(set(self.layer_types()))} (a sliding window counts cache slots, not positions)"
            )
        if keep.shape != state.padding_mask.shape:
            raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {tuple(state.padding_mask.shape)}")
        keep = keep.bool() & state.padding_mask.bool()
        if group_min_saving is not None:
            # The loop applies ``keep`` when it regroups, right after the hooks of this layer (``_regroup``).
            state.pending_keep, state.regroup = keep, group_min_saving
            return state
        state.pending_keep = keep
        self._compact(state)  # the copy a grouped drop gets in ``_regroup``; then the masks for the next layer
        bsz, padding = state.hidden.shape[0], state.padding_mask
        nxt = state.layer + 1
        if state.cache is not None and nxt < len(self.layers):
            state.mask_past = state.cache.past_padding(nxt, bsz, padding.device)
            state.attention_mask = torch.cat([state.mask_past, padding], dim=1)
            state.masks = self.build_masks(state, nxt)
        else:
            state.mask_past = None
            state.attention_mask = padding
            state.masks = self.build_masks(state)
        return state

    def _regroup(self, states: list[LMState]) -> list[LMState]:
        """Apply the pending drops of ``states`` (one prefill's sub-batches, all after the same layer) and re-partition
        all their rows into at most two left-padded sub-batches by kept length, when that saves padded token-slots.

        Called after a ``drop_tokens(..., group_min_saving=s)``. Sorting all rows by kept length, the cut that
        minimises ``sum(rows_g * longest_g)`` is taken if it saves at least the share ``s`` of the slots of one batch
        padded to the longest row; otherwise all rows run as one batch. Rows that dropped tokens after different
        layers but are as long run together (one call per layer, not one per drop layer). Each kept token is copied
        once, straight to its place in its sub-batch (``_gather_rows``), with its position and rotary embedding bit
        for bit. A group that holds all rows of one state reuses that state and its cache; a new group caches its
        rows in a fresh ``LMCache`` that ``_merge_groups`` joins back. Splitting needs empty caches for the layers
        still to run (prefill) and no ``layer_kwargs`` (they may hold per-row tensors); otherwise every state is only
        compacted.
        """
        savings = [s.regroup for s in states if s.regroup is not None]
        for s in states:
            s.regroup = None
        nxt = states[0].layer + 1
        splittable = (
            bool(savings)
            and nxt < len(self.layers)
            and not any(s.layer_kwargs for s in states)
            and not any(
                s.cache is not None and any(s.cache.get_seq_length(j) for j in range(nxt, len(self.layers)))
                for s in states
            )
        )
        if not splittable:
            return [self._compact(s) if s.pending_keep is not None else s for s in states]
        min_saving = min(savings)
        dev = states[0].hidden.device
        keeps = [s.pending_keep if s.pending_keep is not None else s.padding_mask.bool() for s in states]
        # every row of the batch: its state, its index there, its kept length, its row of the forward's batch
        source = torch.cat([torch.full((k.shape[0],), j, dtype=torch.long) for j, k in enumerate(keeps)])
        local = torch.cat([torch.arange(k.shape[0]) for k in keeps])
        lengths = torch.cat([k.sum(1).cpu() for k in keeps])
        batch_rows = torch.cat([
            (s.rows.cpu() if s.rows is not None else torch.arange(s.hidden.shape[0])) for s in states
        ])
        order = lengths.argsort(stable=True)
        sorted_len = lengths[order].tolist()
        bsz, longest = len(sorted_len), sorted_len[-1]
        # cut c: rows order[:c] padded to sorted_len[c - 1], the rest to the longest
        best_cut, best_cost = 0, bsz * longest
        for c in range(1, bsz):
            if sorted_len[c - 1] == 0:
                continue  # rows without tokens stay with the others: a layer never runs on an empty sequence
            cost = c * sorted_len[c - 1] + (bsz - c) * longest
            if cost < best_cost:
                best_cut, best_cost = c, cost
        if best_cut == 0 or best_cost > (1 - min_saving) * bsz * longest:
            parts = [(order, longest)]
        else:
            parts = [(order[:best_cut], sorted_len[best_cut - 1]), (order[best_cut:], longest)]
        groups = []
        for members, width in parts:
            members = members[batch_rows[members].argsort()]  # a group's rows in batch order
            srcs = source[members]
            whole = states[int(srcs[0])]
            if bool((srcs == srcs[0]).all()) and members.numel() == whole.hidden.shape[0]:
                # all rows of one state: that state (and its cache) goes on, compacted if it dropped tokens
                groups.append(self._compact(whole) if whole.pending_keep is not None else whole)
                continue
            pieces = []
            for j in srcs.unique().tolist():
                at = (srcs == j).nonzero(as_tuple=True)[0]
                pieces.append((at.to(dev), states[j], keeps[j], local[members[at]].to(dev)))
            hidden, positions, rope, padding = self._gather_rows(members.numel(), width, pieces)
            groups.append(
                LMState(
                    hidden=hidden,
                    position_ids=positions,
                    padding_mask=padding,
                    attention_mask=padding,
                    cache=self.new_cache() if states[0].cache is not None else None,
                    position_embeddings=rope,
                    layer=states[0].layer,
                    extras=states[0].extras,
                    rows=batch_rows[members].to(dev),
                )  # masks: built by ``_sync_masks`` before the next layer (``masks`` empty)
            )
        return groups

    def _compact(self, state: LMState) -> LMState:
        """Apply ``state.pending_keep`` in place: the kept tokens, left-padded to the longest kept row."""
        keep, state.pending_keep = state.pending_keep, None
        n, dev = keep.shape[0], keep.device
        width = int(keep.sum(1).max()) if n else 0
        everything = torch.arange(n, device=dev)
        state.hidden, state.position_ids, state.position_embeddings, state.padding_mask = self._gather_rows(
            n, width, [(everything, state, keep, everything)]
        )
        state.masks, state.mask_past, state.attention_mask = {}, None, state.padding_mask  # ``_sync_masks`` builds
        return state

    @staticmethod
    def _gather_rows(
        n: int, width: int, pieces: list[tuple[torch.Tensor, LMState, torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None, torch.Tensor]:
        """Hidden states, positions, rotary embeddings and padding of a new ``[n, width]`` left-padded sub-batch.

        Each piece ``(at, state, keep, idx)`` puts rows ``idx`` of ``state`` (their tokens where ``keep``) at rows
        ``at`` of the sub-batch, right-aligned. One ``index_select`` per tensor and piece: the source columns of every
        row are found once, on small integer tensors (kept columns sorted behind -1 for the padding slots).
        """
        outs: dict[str, torch.Tensor] = {}
        padding = None
        for at, state, keep, idx in pieces:
            seq = keep.shape[1]
            key = torch.where(keep[idx], torch.arange(seq, device=keep.device), -1).sort(dim=1).values
            cols = key[:, seq - width:] if width <= seq else torch.cat([key.new_full((len(idx), width - seq), -1), key], 1)
            pad = cols < 0
            flat = (idx[:, None] * seq + cols.clamp(min=0)).reshape(-1)
            tensors = {"hidden": state.hidden, "positions": state.position_ids.expand(keep.shape[0], -1)}
            if state.position_embeddings is not None:
                tensors.update({f"rope{j}": t for j, t in enumerate(state.position_embeddings)})
            for name, t in tensors.items():
                vals = t.reshape(keep.shape[0] * seq, *t.shape[2:]).index_select(0, flat)
                vals = vals.reshape(len(idx), width, *t.shape[2:])
                vals = vals.masked_fill(pad.view(*pad.shape, *([1] * (t.dim() - 2))), 0)
                if len(pieces) == 1:
                    outs[name] = vals  # ``at`` is 0..n-1 here: pieces cover the sub-batch
                else:
                    if name not in outs:
                        outs[name] = vals.new_zeros(n, *vals.shape[1:])
                    outs[name].index_copy_(0, at, vals)
            piece_padding = (~pad).long()
            if len(pieces) == 1:
                padding = piece_padding
            else:
                if padding is None:
                    padding = piece_padding.new_zeros(n, width)
                padding.index_copy_(0, at, piece_padding)
        rope = None
        if "rope0" in outs:
            rope = tuple(outs[f"rope{j}"] for j in range(sum(k.startswith("rope") for k in outs)))
        return outs["hidden"], outs["positions"], rope, padding

    @staticmethod
    def _scatter_rows(bsz: int, parts: list[tuple[torch.Tensor, torch.Tensor]], dim: int = 1) -> torch.Tensor:
        """Join per-group tensors (``rows``, ``[b_g, L_g, ...]`` with length on ``dim``) into ``[B, max L, ...]``,
        each right-aligned (left padding with zeros), the layout of the whole batch."""
        width = max(t.shape[dim] for _, t in parts)
        ref = parts[0][1]
        shape = list(ref.shape)
        shape[0], shape[dim] = bsz, width
        out = ref.new_zeros(shape)
        for rows, t in parts:
            out.narrow(dim, width - t.shape[dim], t.shape[dim]).index_copy_(0, rows, t)
        return out

    def _merge_groups(
        self, bsz: int, states: list[LMState], grouped: dict[int, list[LMState]], cache: LMCache | None
    ) -> LMState:
        """After a grouped prefill: the groups' caches into ``cache`` (per layer, left-padded like the batch) and
        one state over the whole batch (hidden, positions, padding and per-row lengths) for the head and the method."""
        if cache is not None:
            for i, group in grouped.items():
                keys = self._scatter_rows(bsz, [(g.rows, g.cache.kv.layers[i].keys) for g in group], dim=2)
                values = self._scatter_rows(bsz, [(g.rows, g.cache.kv.layers[i].values) for g in group], dim=2)
                cache.kv.update(keys, values, i)  # the layer is empty: the split needs an empty cache after it
        padding = self._scatter_rows(bsz, [(s.rows, s.padding_mask) for s in states])
        return LMState(
            hidden=self._scatter_rows(bsz, [(s.rows, s.hidden) for s in states]),
            position_ids=self._scatter_rows(bsz, [(s.rows, s.position_ids) for s in states]),
            padding_mask=padding,
            attention_mask=padding,
            cache=cache,
            layer=states[0].layer,
            extras=states[0].extras,
        )

    @staticmethod
    def _commit(
        cache: LMCache, used: list[torch.Tensor], positions: torch.Tensor, padding: torch.Tensor
    ) -> None:
        """After a forward: append to each layer's padding record the tokens it cached; advance next positions."""
        grown: dict[tuple[int, int], torch.Tensor] = {}
        for i, new in enumerate(used):
            old = cache.padding[i]
            key = (id(old), id(new))
            if key not in grown:  # layers that held the same tokens keep sharing one tensor
                grown[key] = new if old is None else torch.cat([old, new], dim=1)
            cache.padding[i] = grown[key]
        nxt = positions.expand(padding.shape[0], -1).masked_fill(~padding.bool(), -1).amax(1) + 1
        cache.next_position = nxt if cache.next_position is None else torch.maximum(nxt, cache.next_position)

    # -- the loop ----------------------------------------------------------------------------------------------
    def run_layer(self, i: int, state: LMState) -> LMState:
        layer = self.layers[i]
        out = layer(
            state.hidden,
            attention_mask=state.masks[self.layer_types()[i]],
            position_ids=state.position_ids,
            cache=state.cache.kv if state.cache is not None else None,
            use_cache=state.cache is not None,
            position_embeddings=state.position_embeddings,
            **state.layer_kwargs,
        )
        state.hidden = out[0] if isinstance(out, tuple) else out
        state.layer = i
        return state

    def head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm and ``lm_head``: returns (normed hidden, logits)."""
        hidden = self.final_norm(hidden)
        return hidden, self.lm.get_output_embeddings()(hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: LMCache | DynamicCache | None = None,
        use_cache: bool = False,
        hooks: Sequence[LayerHook] = (),
        logits_to_keep: int = 0,
        layer_kwargs: dict[str, Any] | None = None,
    ) -> LMOutput:
        """Logits for ``input_ids`` or ``inputs_embeds``.

        ``attention_mask`` covers cached + new tokens; when decoding from an ``LMCache`` it may be left out (see
        ``prepare``). ``hooks`` run after every decoder layer (a hook may drop tokens with ``drop_tokens``);
        ``layer_kwargs`` reach every layer's attention function. ``logits_to_keep=k`` > 0 computes logits only
        for the last ``k`` positions (as transformers does).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        if isinstance(cache, DynamicCache):
            cache = LMCache(cache, len(self.layers))
        if use_cache and cache is None:
            cache = self.new_cache()
        state = self.prepare(inputs_embeds, attention_mask, position_ids, cache)
        state.layer_kwargs = dict(layer_kwargs or {})
        first_positions, first_padding = state.position_ids, state.padding_mask
        bsz = first_padding.shape[0]
        used: list[torch.Tensor] = []
        layer_lengths = state.layer_lengths
        lengths_of: tuple[torch.Tensor, torch.Tensor] | None = None
        states = [state]  # more than one after a grouped drop: sub-batches of rows (``LMState.rows``)
        grouped: dict[int, list[LMState]] = {}  # layer -> the sub-batches that ran it, whose caches get merged
        joined_parts: list[torch.Tensor] = []  # the groups' paddings that ``joined`` was built from
        joined = first_padding
        for i in range(len(self.layers)):
            if len(states) == 1 and states[0].rows is None:
                padding = states[0].padding_mask
            else:
                grouped[i] = list(states)
                parts = [s.padding_mask for s in states]
                if len(parts) != len(joined_parts) or any(a is not b for a, b in zip(parts, joined_parts)):
                    # the same groups over several layers share one joined padding (one mask rebuild when decoding)
                    joined_parts, joined = parts, self._scatter_rows(bsz, [(s.rows, s.padding_mask) for s in states])
                padding = joined
            used.append(padding)
            if lengths_of is None or lengths_of[0] is not padding:
                lengths_of = (padding, padding.sum(1))
            layer_lengths.append(lengths_of[1])
            after = []
            for state in states:
                self._sync_masks(state, i)
                state.layer_lengths = layer_lengths
                state = self.run_layer(i, state)
                for hook in hooks:
                    if state.pending_keep is not None:
                        state = self._compact(state)  # a later hook sees the drop of an earlier one
                    new = hook(i, state)
                    if new is not None:
                        state = new
                after.append(state)
            states = self._regroup(after) if any(s.regroup is not None for s in after) else after
        if len(states) == 1 and states[0].rows is None:
            state = states[0]
        else:
            state = self._merge_groups(bsz, states, grouped, cache)
        state.layer_lengths = layer_lengths
        if cache is not None:
            self._commit(cache, used, first_positions, first_padding)
        hidden = state.hidden if logits_to_keep <= 0 else state.hidden[:, -logits_to_keep:]
        hidden, logits = self.head(hidden)
        return LMOutput(logits=logits, hidden=hidden, cache=cache, state=state)
