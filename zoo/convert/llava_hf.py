"""transformers ``LlavaForConditionalGeneration`` checkpoints -> ``zoo.models.moe_llava.MoELLaVA`` (dense).

Llava's computation is ours without MoE: penultimate-layer CLIP features (``vision_feature_layer``), class token
dropped for the ``"default"`` select strategy, a two-layer GELU projector (``linear_1``, ``linear_2``) and the text
LM, with ``image_token_index`` positions replaced by the projected features. Both key layouts are read: transformers
>= 4.52 (``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model``, ``lm_head``) and the
older one (``vision_tower``, ``multi_modal_projector``, ``language_model.model``, ``language_model.lm_head``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from zoo.checkpoint import load_state_dict_strict
from zoo.convert import register_converter
from zoo.convert.common import (
    config_model_type,
    fit_vision_keys,
    read_config,
    read_state_dict,
    read_tokenizer_spec,
)
from zoo.models.moe_llava import MoELLaVA, MoELLaVAConfig

__all__ = ["llava_config_to_model_args", "llava_to_zoo_state_dict", "load_llava_hf", "convert_llava_hf"]

# (old or new prefix) -> our prefix; the longest matching prefix wins.
_PREFIXES = [
    ("model.vision_tower.", "vision_tower.model."),
    ("vision_tower.", "vision_tower.model."),
    ("model.multi_modal_projector.linear_1.", "mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "mm_projector.2."),
    ("multi_modal_projector.linear_1.", "mm_projector.0."),
    ("multi_modal_projector.linear_2.", "mm_projector.2."),
    ("model.language_model.", "llm.lm.model."),
    ("language_model.model.", "llm.lm.model."),
    ("language_model.lm_head.", "llm.lm.lm_head."),
    ("lm_head.", "llm.lm.lm_head."),
]


def _as_dict(sub: Any) -> dict[str, Any]:
    return sub.to_dict() if hasattr(sub, "to_dict") else dict(sub)


def llava_config_to_model_args(src: str | os.PathLike, template: str = "vicuna_v1") -> dict[str, Any]:
    src = Path(src)
    cfg = read_config(src)
    where = src / "config.json"
    if cfg.get("model_type") != "llava":
        raise ValueError(f"{where}: field 'model_type' = {cfg.get('model_type')!r}; expected 'llava'")
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(
            f"{where}: field 'vision_feature_layer' = {layer!r}; only a single layer is supported"
        )
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(
            f"{where}: field 'vision_feature_select_strategy' = {strategy!r}; expected default/full"
        )
    if cfg.get("projector_hidden_act", "gelu") != "gelu" or not cfg.get("multimodal_projector_bias", True):
        raise ValueError(f"{where}: only the GELU projector with biases (LLaVA's mlp2x_gelu) is supported")
    vision = {k: v for k, v in _as_dict(cfg["vision_config"]).items() if k not in ("architectures",)}
    text = {k: v for k, v in _as_dict(cfg["text_config"]).items() if k not in ("architectures",)}
    token = cfg.get("image_token_index", cfg.get("image_token_id"))
    if token is None:
        raise ValueError(f"{where}: no 'image_token_index' / 'image_token_id' field")
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return dict(
        vision=dict(
            kind="hf",
            config=vision,
            select_layer=layer,
            select_feature="patch" if strategy == "default" else "cls_patch",
        ),
        lm=text,
        projector="mlp2x_gelu",
        template=template,
        tokenizer=read_tokenizer_spec(src),
        image_token_id=int(token),
        moe=None,
        pad_to_square=False,
    )


def llava_to_zoo_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for old, new in _PREFIXES:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            out[key] = value  # reported as unexpected by the strict load
    return out


def load_llava_hf(src: str | os.PathLike, template: str = "vicuna_v1") -> MoELLaVA:
    src = Path(src)
    model = MoELLaVA(
        MoELLaVAConfig(**llava_config_to_model_args(src, template)), architecture="moe_llava_custom"
    )
    out = llava_to_zoo_state_dict(read_state_dict(src))
    own = model.state_dict()
    if (
        "llm.lm.lm_head.weight" in own
        and "llm.lm.lm_head.weight" not in out
        and model.llm.config.tie_word_embeddings
    ):
        out["llm.lm.lm_head.weight"] = out["llm.lm.model.embed_tokens.weight"]  # tied weights are saved once
    fit_vision_keys(out, model)
    load_state_dict_strict(model, out, src, "moe_llava_custom")
    return model.eval()


def convert_llava_hf(src: str | os.PathLike, out_dir: str | os.PathLike, template: str = "vicuna_v1") -> Path:
    from zoo.registry import save_pretrained

    model = load_llava_hf(src, template)
    return save_pretrained(
        model,
        out_dir,
        "moe_llava_custom",
        model.model_args,
        converted_from=str(src),
        source_format="llava_hf",
    )


def is_llava_hf(src: Path) -> bool:
    """A transformers ``LlavaForConditionalGeneration`` directory (config.json ``model_type`` = ``llava`` with a
    nested ``text_config``; Uni-MoE's flat LLaMA configs also say ``llava``)."""
    if not (src.is_dir() and config_model_type(src) == "llava"):
        return False
    return "text_config" in read_config(src)


register_converter(
    "llava-hf",
    detect=is_llava_hf,
    load=load_llava_hf,
    convert=convert_llava_hf,
    options={"template": "conversation template for generate (default vicuna_v1)"},
    summary="transformers LlavaForConditionalGeneration directory",
)
