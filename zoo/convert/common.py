"""Shared helpers for checkpoint converters: reading released configs and weight files (strict loading is
``zoo.checkpoint.load_state_dict_strict``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["read_config", "config_model_type", "read_state_dict", "read_tokenizer_spec", "fit_vision_keys"]


def read_config(src: str | os.PathLike) -> dict[str, Any]:
    path = Path(src) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{src}: no config.json; expected a released model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def config_model_type(src: str | os.PathLike) -> str | None:
    """``model_type`` of ``src/config.json``, or None when ``src`` has no readable config (for ``detect``)."""
    path = Path(src) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    from zoo.checkpoint import read_safetensors, torch_load_safely

    if path.suffix == ".safetensors":
        return read_safetensors(path)
    # Official .bin files are plain state dicts; weights_only refuses anything that is not tensors/containers.
    return torch_load_safely(path)


def read_state_dict(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a released directory: ``model.safetensors``, ``pytorch_model.bin`` or their sharded indexes."""
    src = Path(src)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (src / shard).exists():
                    raise FileNotFoundError(f"{index} names shard {shard!r}, which is not in {src}")
                sd.update(_load_file(src / shard))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).exists():
            return _load_file(src / name)
    raise FileNotFoundError(
        f"{src}: no weights (looked for model.safetensors[.index.json] and pytorch_model.bin[.index.json])"
    )


def read_tokenizer_spec(src: str | os.PathLike) -> dict[str, Any] | None:
    """A ``tokenizer_spec`` for the fast tokenizer in ``src`` (tokenizer.json), or None when there is none."""
    src = Path(src)
    if not (src / "tokenizer.json").exists():
        return None
    from transformers import PreTrainedTokenizerFast

    from zoo.models.moe_llava import tokenizer_spec

    kwargs: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = src / name
        if f.exists():
            data = json.loads(f.read_text())
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                value = data.get(key)
                if isinstance(value, dict):  # AddedToken serialisation
                    value = value.get("content")
                if isinstance(value, str) and key not in kwargs:
                    kwargs[key] = value
    tok = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), **kwargs)
    return tokenizer_spec(tok)


def fit_vision_keys(
    state_dict: dict[str, torch.Tensor], model: nn.Module, prefix: str = "vision_tower.model."
) -> None:
    """Match transformers' vision-model key layouts in place.

    Checkpoints written by transformers 4.x (and full CLIP/SigLIP models) keep tower tensors under
    ``vision_model.``; ``CLIPVisionModel`` in transformers 5 holds them one level up. Keys are moved to whichever
    form ``model`` has, so both generations of checkpoints load.
    """
    own = model.state_dict()
    inner = prefix + "vision_model."
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key in own:
            continue
        if key.startswith(inner) and prefix + key[len(inner) :] in own:
            state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
        elif inner + key[len(prefix) :] in own:
            state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)
