"""A causal-LM wrapper that owns the decoder-layer loop.

The Hugging Face causal LM is held by composition. We embed through its input embeddings, build its rotary
embeddings and attention masks through the public ``masking_utils`` functions, call its decoder layers ourselves
(with a ``DynamicCache`` for incremental decoding), then apply its final norm and ``lm_head``. Owning the loop lets
a method act between layers (drop visual tokens, read the residual stream, capture attention) without patching
transformers.

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

__all__ = ["LMState", "LMOutput", "CausalLMWrapper", "LayerHook", "build_causal_lm", "positions_from_mask"]

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
    """What flows from one decoder layer to the next. Hooks may replace fields (e.g. drop tokens)."""

    hidden: torch.Tensor  # [B, T, D]
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, past + T] padding mask (1 = keep), or None
    cache: DynamicCache | None
    masks: dict[str, Any] = field(default_factory=dict)  # layer type -> mask in the backend's format
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    extras: dict[str, Any] = field(
        default_factory=dict
    )  # free slot for methods (captured maps, router inputs)
    # Extra keyword arguments for every decoder layer; transformers passes them on to the attention function, so a
    # registered attention implementation (AttentionInterface) can receive e.g. image-token spans.
    layer_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LMOutput:
    logits: torch.Tensor
    hidden: torch.Tensor  # final hidden states after the final norm
    cache: DynamicCache | None
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

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.lm.config)

    def layer_types(self) -> list[str]:
        types = getattr(self.lm.config, "layer_types", None)
        return list(types) if types is not None else ["full_attention"] * len(self.layers)

    # -- the loop ----------------------------------------------------------------------------------------------
    def build_masks(self, state: LMState) -> dict[str, Any]:
        """(Re)build the attention masks for ``state`` (call after changing its length or padding)."""
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
                cache=state.cache,
                position_ids=state.position_ids,
            )
        return masks

    def prepare(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> LMState:
        """Positions, masks and rotary embeddings for a forward over ``inputs_embeds`` (after ``cache``'s tokens)."""
        bsz, q_len = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (bsz, past + q_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + new) = "
                f"({bsz}, {past + q_len})"
            )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, q_len)
            else:
                position_ids = (
                    (torch.arange(q_len, device=inputs_embeds.device) + past).unsqueeze(0).expand(bsz, -1)
                )
        hidden = inputs_embeds
        if self._embed_dropout_name is not None:
            hidden = getattr(self.lm.base_model, self._embed_dropout_name)(hidden)
        state = LMState(hidden=hidden, position_ids=position_ids, attention_mask=attention_mask, cache=cache)
        state.masks = self.build_masks(state)
        state.position_embeddings = self.lm.base_model.rotary_emb(hidden, position_ids)
        return state

    def run_layer(self, i: int, state: LMState) -> LMState:
        layer = self.layers[i]
        out = layer(
            state.hidden,
            attention_mask=state.masks[self.layer_types()[i]],
            position_ids=state.position_ids,
            cache=state.cache,
            use_cache=state.cache is not None,
            position_embeddings=state.position_embeddings,
            **state.layer_kwargs,
        )
        state.hidden = out[0] if isinstance(out, tuple) else out
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
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        hooks: Sequence[LayerHook] = (),
        logits_to_keep: int = 0,
        layer_kwargs: dict[str, Any] | None = None,
    ) -> LMOutput:
        """Logits for ``input_ids`` or ``inputs_embeds``; ``attention_mask`` covers cached + new tokens.

        ``logits_to_keep=k`` > 0 computes logits only for the last ``k`` positions (as transformers does).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        if use_cache and cache is None:
            cache = self.new_cache()
        state = self.prepare(inputs_embeds, attention_mask, position_ids, cache)
        state.layer_kwargs = dict(layer_kwargs or {})
        for i in range(len(self.layers)):
            state = self.run_layer(i, state)
            for hook in hooks:
                new = hook(i, state)
                if new is not None:
                    state = new
        hidden = state.hidden if logits_to_keep <= 0 else state.hidden[:, -logits_to_keep:]
        hidden, logits = self.head(hidden)
        return LMOutput(logits=logits, hidden=hidden, cache=state.cache, state=state)
