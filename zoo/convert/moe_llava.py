"""Official MoE-LLaVA checkpoints (PKU-YuanGroup/MoE-LLaVA releases) -> ``zoo.models.moe_llava.MoELLaVA``.

A release directory holds ``config.json`` (the LM config plus LLaVA fields and a nested ``moe`` dict) and weights
(``model.safetensors`` / ``pytorch_model.bin``, possibly sharded). Key layout (DeepSpeed MoE, no DeepSpeed needed
here):

* MoE layer i: ``<root>.layers.{i}.mlp.deepspeed_moe.gate.wg.weight`` [E, d] and
  ``<root>.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.<ffn>`` (Phi ``fc1/fc2`` with biases,
  StableLM ``gate_proj/up_proj/down_proj``, Qwen ``w1/w2/c_proj``);
* projector: ``<root>.mm_projector.image_spatial_proj.{0,2}.{weight,bias}``;
* vision tower (if saved): ``<root>.image_tower.image_tower.vision_model.*``;
* ``<root>`` is ``model`` (Phi, StableLM) or ``transformer`` (Qwen, whose blocks are ``transformer.h.{i}``).

Qwen-1.8B (Qwen v1, remote code) is mapped onto transformers' Qwen2 modules: ``c_attn`` splits into q/k/v,
``w2`` is the gate and ``w1`` the up projection (Qwen computes ``c_proj(w1(x) * silu(w2(x)))``). Phi's LLaVA class
has no ``lm_head.bias``; ours (transformers' Phi) has one, which is set to zero.

Official checkpoints usually do not carry the vision tower (the code re-downloads it); pass the tower's own
directory (``vision_weights``: a transformers CLIP/SigLIP vision or full model) in that case.
"""

from __future__ import annotations

import os
import re
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
from zoo.models.moe_llava import CLIP_L_336, SIGLIP_SO400M_384, MoELLaVA, MoELLaVAConfig

__all__ = [
    "BACKBONES",
    "KNOWN_TOWERS",
    "official_config_to_model_args",
    "official_to_zoo_state_dict",
    "convert_moe_llava",
    "load_official",
]

# model_type in an official config.json -> (backbone, conversation template). Dense stage-2 releases use llava_*.
BACKBONES = {
    "moe_llava_phi": ("phi", "phi"),
    "llava_phi": ("phi", "phi"),
    "moe_llava_stablelm": ("stablelm", "stablelm"),
    "llava_stablelm": ("stablelm", "stablelm"),
    "moe_llava_qwen": ("qwen", "qwen"),
    "llava_qwen": ("qwen", "qwen"),
}

# Vision towers the releases name in ``mm_image_tower`` (hub ids; we never download them).
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": CLIP_L_336,
    "google/siglip-so400m-patch14-384": SIGLIP_SO400M_384,
}

IMAGE_TOKEN_INDEX = -200  # MoE-LLaVA's placeholder id for <image> in input_ids

# config.json keys that belong to LLaVA / MoE / bookkeeping rather than to the LM's own config.
_NON_LM_KEYS = {
    "moe",
    "mm_image_tower",
    "mm_video_tower",
    "image_tower",
    "video_tower",
    "image_projector_type",
    "video_projector_type",
    "mm_hidden_size",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "image_aspect_ratio",
    "use_mm_proj",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "mm_projector_lr",
    "mm_projector_type",
    "mm_patch_merge_type",
    "X",
    "architectures",
    "auto_map",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "model_type",
    "use_cache",
}


def _vision_from_config(
    cfg: dict[str, Any], src: Path, vision_config: dict[str, Any] | None
) -> dict[str, Any]:
    tower_id = cfg.get("mm_image_tower") or cfg.get("image_tower")
    if vision_config is None:
        local = Path(str(tower_id)) if tower_id else None
        if local is not None and (local / "config.json").exists():
            import json

            vision_config = json.loads((local / "config.json").read_text())
        elif tower_id in KNOWN_TOWERS:
            vision_config = dict(KNOWN_TOWERS[tower_id])
        else:
            raise ValueError(
                f"{src / 'config.json'}: field 'mm_image_tower' = {tower_id!r} is neither a known tower "
                f"({sorted(KNOWN_TOWERS)}) nor a local directory with config.json; pass vision_config="
            )
    if "vision_config" in vision_config:  # a full CLIP / SigLIP config: take its vision part
        parent = vision_config.get("model_type")
        vision_config = dict(vision_config["vision_config"], model_type=f"{parent}_vision_model")
    vision_config = {
        k: v for k, v in vision_config.items() if k not in ("architectures", "transformers_version")
    }
    select = cfg.get("mm_vision_select_feature", "patch")
    return dict(
        kind="hf",
        config=vision_config,
        select_layer=int(cfg.get("mm_vision_select_layer", -2)),
        select_feature=select,
        # MoE-LLaVA's SigLIP tower reuses the CLIP code and drops index 0 although SigLIP has no class token.
        drop_first_token=vision_config["model_type"] == "siglip_vision_model" and select == "patch",
    )


def _lm_config(cfg: dict[str, Any], backbone: str) -> dict[str, Any]:
    if backbone == "qwen":
        # Qwen v1 field names -> transformers Qwen2 (same computation; w1/w2 each have intermediate_size / 2 rows).
        return dict(
            model_type="qwen2",
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"] // 2,
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_attention_heads"],
            max_position_embeddings=cfg.get("seq_length", cfg.get("max_position_embeddings", 8192)),
            rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
            rope_theta=float(cfg.get("rotary_emb_base", 10000.0)),
            hidden_act="silu",
            tie_word_embeddings=False,
        )
    lm = {k: v for k, v in cfg.items() if k not in _NON_LM_KEYS}
    if backbone == "stablelm":
        # StableLM-2's remote-code config (stablelm_epoch, early 2024) spells two fields differently.
        for old, new in (("rope_pct", "partial_rotary_factor"), ("norm_eps", "layer_norm_eps")):
            if old in lm:
                lm.setdefault(new, lm.pop(old))
    lm["model_type"] = backbone
    lm["tie_word_embeddings"] = False  # the LLaVA classes hold a separate lm_head
    return lm


def official_config_to_model_args(
    src: str | os.PathLike, vision_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``MoELLaVAConfig`` fields (JSON) for an official release directory."""
    src = Path(src)
    cfg = read_config(src)
    model_type = cfg.get("model_type")
    if model_type not in BACKBONES:
        raise ValueError(
            f"{src / 'config.json'}: field 'model_type' = {model_type!r}; expected one of {sorted(BACKBONES)}"
        )
    backbone, template = BACKBONES[model_type]
    moe = None
    moe_cfg = cfg.get("moe") or {}
    if moe_cfg.get("moe_enable", False):
        if moe_cfg.get("use_residual", False):
            raise ValueError(
                f"{src / 'config.json'}: field 'moe.use_residual' is true; residual MoE is not supported"
            )
        experts = moe_cfg.get("num_experts", 4)
        experts = list(experts) if isinstance(experts, (list, tuple)) else [experts]
        if len(set(experts)) != 1:
            raise ValueError(
                f"{src / 'config.json'}: field 'moe.num_experts' = {experts}; differing expert counts "
                "per layer are not supported"
            )

        def value(name: str, default: Any) -> Any:
            # A null in the release's config means "the training script's default" (MoE-LLaVA's train.py).
            v = moe_cfg.get(name)
            return default if v is None else v

        if "moe_layers_idx" not in moe_cfg:
            raise ValueError(f"{src / 'config.json'}: field 'moe.moe_layers_idx' is missing")
        moe = dict(
            num_experts=int(experts[0]),
            top_k=int(value("top_k_experts", 2)),
            layers=[int(i) for i in moe_cfg["moe_layers_idx"]],
            capacity_factor=float(value("capacity_factor", 1.5)),
            eval_capacity_factor=float(value("eval_capacity_factor", 2.0)),
            min_capacity=int(value("min_capacity", 0)),
            aux_loss_coef=float(value("router_aux_loss_coef", 0.01)),
        )
    return dict(
        vision=_vision_from_config(cfg, src, vision_config),
        lm=_lm_config(cfg, backbone),
        projector=cfg.get("image_projector_type", cfg.get("mm_projector_type", "mlp2x_gelu")),
        template=template,
        tokenizer=read_tokenizer_spec(src),
        image_token_id=IMAGE_TOKEN_INDEX,
        moe=moe,
        pad_to_square=cfg.get("image_aspect_ratio", "pad") == "pad",
    )


_MOE = re.compile(
    r"^(?P<layer>.+)\.mlp\.deepspeed_moe\.(?:gate\.wg\.weight|experts\.deepspeed_experts\.(?P<e>\d+)\."
    r"(?P<proj>\w+)\.(?P<wb>weight|bias))$"
)
# Expert projection names per backbone -> our stacked parameter slots.
# SwiGLU expert projections: StableLM names and Qwen's (``c_proj(w1(x) * silu(w2(x)))``: w2 gates, w1 is "up").
_SWIGLU_PARTS = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w2": "gate",
    "w1": "up",
    "c_proj": "down",
}
_QWEN_BLOCK = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.up_proj",
    "mlp.w2": "mlp.gate_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def _rename_qwen(key: str, value: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    """Qwen v1 dense keys -> Qwen2 keys under ``llm.lm.``; returns False when ``key`` is not a Qwen LM key."""
    if key == "transformer.wte.weight":
        out["llm.lm.model.embed_tokens.weight"] = value
        return True
    if key == "transformer.ln_f.weight":
        out["llm.lm.model.norm.weight"] = value
        return True
    m = re.match(r"^transformer\.h\.(\d+)\.(.+)\.(weight|bias)$", key)
    if not m:
        return False
    i, name, wb = m.groups()
    base = f"llm.lm.model.layers.{i}."
    if name == "attn.c_attn":
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
            out[f"{base}self_attn.{part}.{wb}"] = chunk.contiguous()
        return True
    if name in _QWEN_BLOCK:
        out[f"{base}{_QWEN_BLOCK[name]}.{wb}"] = value
        return True
    return False


def official_to_zoo_state_dict(
    sd: dict[str, torch.Tensor], model: MoELLaVA, vision_sd: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Rename/restack an official state dict into ``model``'s keys (strictly checked by the caller)."""
    qwen = any(k.startswith("transformer.") for k in sd)
    root = "transformer" if qwen else "model"
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str, str], dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a non-persistent buffer some exports still contain
        if key.startswith(f"{root}.mm_projector."):
            rest = key[len(f"{root}.mm_projector.") :]
            rest = rest[len("image_spatial_proj.") :] if rest.startswith("image_spatial_proj.") else rest
            out[f"mm_projector.{rest}"] = value
            continue
        if key.startswith(f"{root}.image_tower.image_tower."):
            out["vision_tower.model." + key[len(f"{root}.image_tower.image_tower.") :]] = value
            continue
        m = _MOE.match(key)
        if m:
            layer = m["layer"]
            layer = f"model.layers.{layer.rsplit('.', 1)[1]}" if qwen else layer
            if m["e"] is None:
                out[f"llm.lm.{layer}.mlp.router.weight"] = value.float()
            else:
                experts.setdefault((layer, m["proj"], m["wb"]), {})[int(m["e"])] = value
            continue
        if key.startswith("lm_head."):
            out[f"llm.lm.{key}"] = value
            continue
        if qwen and _rename_qwen(key, value, out):
            continue
        if not qwen and key.startswith("model."):
            out[f"llm.lm.{key}"] = value
            continue
        out[key] = value  # left as is: the strict load reports it as unexpected
    swiglu: dict[str, dict[str, torch.Tensor]] = {}
    for (layer, proj, wb), per_e in experts.items():
        n = max(per_e) + 1
        if sorted(per_e) != list(range(n)):
            raise ValueError(f"{layer}: expert indices {sorted(per_e)} are not 0..{n - 1}")
        stacked = torch.stack([per_e[e] for e in range(n)])
        prefix = f"llm.lm.{layer}.mlp.experts."
        if proj in ("fc1", "fc2"):
            out[f"{prefix}{proj}_{wb}"] = stacked
        elif proj in _SWIGLU_PARTS and wb == "weight":
            swiglu.setdefault(prefix, {})[_SWIGLU_PARTS[proj]] = stacked
        else:
            out[f"{layer}.mlp.deepspeed_moe.experts.{proj}.{wb}"] = stacked  # reported as unexpected
    for prefix, parts in swiglu.items():
        if set(parts) != {"gate", "up", "down"}:
            raise ValueError(f"{prefix}: expert projections {sorted(parts)}; expected gate, up and down")
        out[prefix + "gate_up_proj"] = torch.cat(
            [parts["gate"], parts["up"]], dim=1
        )  # gate rows first (zoo.moe)
        out[prefix + "down_proj"] = parts["down"]
    if vision_sd is not None:
        for k, v in vision_sd.items():
            out.setdefault(f"vision_tower.model.{k}", v)
    # Phi's LLaVA classes build lm_head without a bias; transformers' Phi has one: zero reproduces the official.
    bias_key = "llm.lm.lm_head.bias"
    own = model.state_dict()
    if bias_key in own and bias_key not in out and "llm.lm.lm_head.weight" in out:
        out[bias_key] = torch.zeros_like(own[bias_key])
    return out


def _vision_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``vision_model.*`` tensors of a transformers CLIP/SigLIP model directory.

    A full CLIP/SigLIP model (the hub layout) stores them under ``vision_model.``; a vision-only model saved by
    transformers 5 stores them without that prefix.
    """
    sd = read_state_dict(path)
    vis = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    if not vis:
        vis = {
            f"vision_model.{k}": v
            for k, v in sd.items()
            if k.split(".")[0] in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm", "head")
        }
    if not vis:
        raise ValueError(f"{path}: no vision tower tensors; expected a transformers CLIP or SigLIP model dir")
    return vis


def load_official(
    src: str | os.PathLike,
    vision_weights: str | os.PathLike | None = None,
    vision_config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> MoELLaVA:
    """Build our model for an official release directory and load its weights strictly."""
    src = Path(src)
    args = official_config_to_model_args(src, vision_config)
    model = MoELLaVA(MoELLaVAConfig(**args), architecture="moe_llava_custom")
    sd = read_state_dict(src)
    vision_sd = _vision_state_dict(vision_weights) if vision_weights is not None else None
    if vision_sd is None and not any(".image_tower.image_tower." in k for k in sd):
        raise ValueError(
            f"{src}: the checkpoint has no vision tower weights (the official code re-downloads "
            f"{args['vision']['config'].get('model_type')} weights at load time); pass vision_weights=<local dir of "
            "that transformers model> (zoo convert: --vision-weights DIR)"
        )
    out = official_to_zoo_state_dict(sd, model, vision_sd)
    fit_vision_keys(out, model)
    load_state_dict_strict(model, out, src, "moe_llava_custom")
    return model.to(dtype).eval()


def convert_moe_llava(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    vision_weights: str | os.PathLike | None = None,
    vision_config: dict[str, Any] | None = None,
) -> Path:
    """Write an mmzoo directory (``zoo.load(out_dir)``) for an official MoE-LLaVA release directory."""
    from zoo.registry import save_pretrained

    model = load_official(src, vision_weights, vision_config)
    return save_pretrained(
        model,
        out_dir,
        "moe_llava_custom",
        model.model_args,
        converted_from=str(src),
        source_format="moe_llava_official",
    )


def is_official_moe_llava(src: Path) -> bool:
    """An official MoE-LLaVA (or its dense LLaVA stage) release: config.json's ``model_type`` names the backbone."""
    return src.is_dir() and config_model_type(src) in BACKBONES


register_converter(
    "moe-llava",
    detect=is_official_moe_llava,
    load=load_official,
    convert=convert_moe_llava,
    options={"vision_weights": "local transformers CLIP/SigLIP directory when the release lacks tower weights"},
    summary="official MoE-LLaVA release directory (DeepSpeed MoE keys)",
)
