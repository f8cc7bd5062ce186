"""Per-row prefill cost of a call from what actually ran: FLOPs and KV-cache bytes from each layer's real tokens.

Token-dropping methods (``dyvte``, ``fastv``) report these from ``Method.finish`` so the eval results JSON holds them
per task (``efficiency.<task>.method_metrics``); ``dyvte:threshold=1.01`` (never exits) gives the plain model's cost
under the same counting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zoo.components.generation import decoder_prefill_flops

__all__ = ["prefill_accounting", "kv_cache_bytes"]


def kv_cache_bytes(llm: Any, layer_lengths: Sequence[torch.Tensor]) -> int:
    """Bytes the prefill left in the KV cache: per layer and row, its real tokens x (K + V) x kv heads x head dim."""
    cfg = llm.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    itemsize = next(llm.parameters()).element_size()
    tokens = sum(int(t.sum()) for t in layer_lengths)
    return tokens * 2 * kv_heads * head_dim * itemsize


def prefill_accounting(llm: Any, layer_lengths: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean per row: prefill GFLOPs of the decoder layers (``decoder_prefill_flops``) and KV-cache kilobytes."""
    rows = int(layer_lengths[0].numel()) if layer_lengths else 0
    if rows == 0:
        return {}
    return {
        "prefill_gflops_per_row": decoder_prefill_flops(llm, layer_lengths) / rows / 1e9,
        "kv_cache_kb_per_row": kv_cache_bytes(llm, layer_lengths) / rows / 1024,
    }
