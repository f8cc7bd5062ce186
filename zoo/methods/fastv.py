"""FastV-style visual-token pruning (Chen et al., 2024): after one fixed layer, keep the visual tokens that the last
prompt token attends to most; the baseline on DyVTE's accuracy / compute curve.

At decoder layer ``layer`` the ``zoo_capture`` attention records the last prompt token's post-softmax attention to each
row's media tokens (mean over heads); after that layer every row keeps the top ``ceil(keep * n_media)`` of its media
tokens and drops the rest with ``CausalLMWrapper.drop_tokens`` (original RoPE positions kept, per-layer caches), so the
later layers and all decode steps run on the shorter sequence. Every row must hold the same number of media tokens
(one image per prompt), as the capture needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from zoo.components.attention import CAPTURE_ATTENTION, AttentionCapture, media_key_positions
from zoo.methods import Method, MethodContext, MethodPlan, register_method
from zoo.methods.accounting import prefill_accounting

__all__ = ["FastV"]


@register_method("fastv")
class FastV(Method):
    """Keep the fraction ``keep`` of visual tokens, ranked by the attention they receive at ``layer``."""

    def __init__(self, layer: int = 2, keep: float = 0.5) -> None:
        if not 0.0 <= float(keep) <= 1.0:
            raise ValueError(f"fastv keep must be in [0, 1], got {keep}")
        if int(layer) < 0:
            raise ValueError(f"fastv layer must be >= 0, got {layer}")
        self.layer, self.keep = int(layer), float(keep)
        self._llm: Any = None

    def plan(self, ctx: MethodContext) -> MethodPlan:
        llm = ctx.model.llm
        if self.layer >= len(llm.layers) - 1:
            raise ValueError(f"fastv layer {self.layer}: pruning needs a later layer; the LM has {len(llm.layers)}")
        self._llm = llm
        media = ctx.media_mask.bool() & ctx.attention_mask.bool()
        keys = media_key_positions(media)
        capture = AttentionCapture(layers=[self.layer], keys=keys, queries="last")
        n_keep = math.ceil(self.keep * keys.shape[1])
        prefill = {"pending": True}

        def hook(i: int, state: Any) -> Any:
            if i != self.layer or not prefill["pending"]:
                return None
            prefill["pending"] = False
            scores = capture.maps[self.layer][0].mean(1)[:, 0]  # [B, K]: heads averaged, the last query
            top = scores.topk(n_keep, dim=-1).indices
            keep = state.padding_mask.bool() & ~media
            keep[torch.arange(keys.shape[0], device=keys.device)[:, None], keys.gather(1, top)] = True
            return llm.drop_tokens(state, keep)

        return MethodPlan(
            hooks=[hook], layer_kwargs={"attention_capture": capture}, attn_implementation=CAPTURE_ATTENTION
        )

    def finish(self, state: Any) -> dict[str, float]:
        return prefill_accounting(self._llm, state.layer_lengths) if self._llm is not None else {}
