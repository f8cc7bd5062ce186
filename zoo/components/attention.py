"""Attention functions for methods: switching the implementation for one call, and capturing attention to media.

Transformers' attention layers call whatever function is registered under ``config._attn_implementation`` in its
``AttentionInterface``, with the layer's keyword arguments passed through. So a method never patches a model: it
registers a function (``AttentionInterface.register(name, fn)`` plus a mask builder under the same name in
``AttentionMaskInterface``) and switches to it for one call with ``use_attention``.

``zoo_capture`` is such a function. For the layers an ``AttentionCapture`` (passed as the layer keyword
``attention_capture``) names, it records the post-softmax attention of the chosen query positions to the chosen key
positions (the media tokens), all heads; every layer, captured or not, computes its output with transformers' sdpa
path, so the model's outputs are those of ``sdpa`` bit for bit. Only the chosen query rows of the chosen layers are
scored a second time: no full ``[T, S]`` map is ever materialised.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

__all__ = ["AttentionCapture", "CAPTURE_ATTENTION", "use_attention", "media_key_positions"]

CAPTURE_ATTENTION = "zoo_capture"


def _hf_model(target: Any) -> PreTrainedModel:
    """The transformers model behind a zoo model (``.llm``), an LM wrapper (``.lm``) or a transformers model."""
    for _ in range(3):
        if isinstance(target, PreTrainedModel):
            return target
        inner = getattr(target, "llm", None)
        target = inner if inner is not None else getattr(target, "lm", None)
    raise TypeError("use_attention needs a transformers model, a CausalLMWrapper or a model with an `llm`")


@contextmanager
def use_attention(target: Any, name: str | None) -> Iterator[None]:
    """Run the language model of ``target`` with attention implementation ``name`` inside the block, then restore it.

    ``target`` is a zoo model with an ``llm``, a ``CausalLMWrapper`` or a transformers model; a multimodal
    transformers model (one with a ``text_config``, e.g. ``LlavaForConditionalGeneration``) switches only its
    language model, so the vision tower keeps its own. ``None`` changes nothing. The previous implementation comes
    back also when the block raises.
    """
    if name is None:
        yield
        return
    model = _hf_model(target)
    text = getattr(model.config, "text_config", None)
    previous = (text or model.config)._attn_implementation
    model.set_attn_implementation({"text_config": name} if text is not None else name)
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": previous} if text is not None else previous)


def media_key_positions(media_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool media mask -> ``[B, K]`` column indices of each row's media tokens (same count per row)."""
    counts = media_mask.sum(1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError(
            f"rows hold different numbers of media tokens {counts.tolist()}; capture them separately"
        )
    return media_mask.nonzero(as_tuple=True)[1].view(media_mask.shape[0], -1)


@dataclass
class AttentionCapture:
    """What ``zoo_capture`` records, and where it puts it.

    Attributes:
        layers: decoder layer indices to capture; the others run plain sdpa.
        keys: ``[B, K]`` key columns to keep per row (e.g. ``media_key_positions(media_mask)``). Columns index the
            layer's keys: cached tokens first, so prompt columns stay valid in later decode calls (as long as no
            token before them was dropped at that layer).
        queries: ``"last"`` (each call's last query: the next-token position, also in decode steps), ``"all"``, or
            a ``[Q]`` index tensor of prompt positions (captured in the prefill call; decode steps, one query
            each, are skipped).
        maps: filled per layer, one ``[B, H, Q, K]`` float tensor per forward call through that layer.
    """

    layers: Sequence[int]
    keys: torch.Tensor
    queries: str | torch.Tensor = "last"
    maps: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def query_index(self, q_len: int, device: torch.device) -> torch.Tensor | None:
        if isinstance(self.queries, str):
            if self.queries == "last":
                return torch.tensor([q_len - 1], device=device)
            if self.queries == "all":
                return torch.arange(q_len, device=device)
            raise ValueError(f"queries must be 'last', 'all' or an index tensor, got {self.queries!r}")
        idx = self.queries.to(device)
        if q_len == 1:  # a decode step: prompt positions are not among its queries
            return None
        if int(idx.max()) >= q_len:
            raise IndexError(f"capture queries {idx.tolist()} reach past the {q_len} positions of this call")
        return idx


def _selected_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    q_idx: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention of the query rows ``q_idx`` over all keys: ``[B, H, Q, S]`` (fp32)."""
    groups = query.shape[1] // key.shape[1]
    key = repeat_kv(key, groups)
    scores = (query[:, :, q_idx].float() @ key.float().transpose(-1, -2)) * scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        # sdpa's causal shortcut: queries are the last q_len of the kv_len positions (bottom-right aligned)
        allowed = torch.arange(kv_len, device=query.device) <= (kv_len - q_len + q_idx)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[:, :, q_idx, :kv_len], float("-inf"))
    else:
        scores = scores + mask[:, :, q_idx, :kv_len].float()
    return scores.softmax(-1)


def capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    attention_capture: AttentionCapture | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa attention that also records ``attention_capture``'s maps for its layers (see the module docstring)."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    layer = getattr(module, "layer_idx", None)
    if attention_capture is not None and layer in attention_capture.layers:
        q_idx = attention_capture.query_index(query.shape[2], query.device)
        if q_idx is not None:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            probs = _selected_probs(query, key, attention_mask, q_idx, scale)
            cols = attention_capture.keys.to(query.device)
            picked = probs.gather(-1, cols[:, None, None, :].expand(*probs.shape[:3], cols.shape[-1]))
            attention_capture.maps.setdefault(layer, []).append(picked)
    return out


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention_forward)
# The function takes sdpa's masks (boolean, or None for the plain causal case it handles itself).
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)
