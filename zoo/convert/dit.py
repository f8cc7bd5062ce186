"""Official DiT / DiT-MoE ``.pt`` checkpoints -> mmzoo models and directories.

Examples::

    zoo convert dit dit_xl_2 pretrained_models/DiT-XL-2-256x256.pt out/dit_xl_2
    zoo convert dit dit_xl_2 DiT-XL-2-512x512.pt out/dit_xl_2_512 --input-size 64
    zoo convert dit dit_moe_s_2_8e2a dit_moe_s_8E2A.pt out/dit_moe_s     # {"ema": ...} wrapper is unwrapped
    zoo convert auto DiT-XL-2-256x256.pt out/dit_xl_2                     # architecture read from the tensors

The key mapping (``attn.Wqkv``/``out_proj`` -> ``attn.qkv``/``proj``, per-expert Linears -> the MoE core's stacked
experts) is ``zoo.models.dit.checkpoint_filter_fn``; loading is strict and lists missing / unexpected keys.

``auto`` (and ``zoo.load(FILE.pt)``) reads the architecture from the shapes: depth, width, patch, channels, classes,
input size, experts and qk-norm are all in the tensors; the number of heads is read from the qk-norm width or, for
the standard attention, from the DiT size table (``DIT_SIZES``). A checkpoint whose shape matches a registered
architecture is recorded under that name (``dit_xl_2``, ``dit_moe_s_2_8e2a``, ...); any other is recorded as
``dit_tiny`` with every field given.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.checkpoint import torch_load_safely
from zoo.convert import register_converter
from zoo.models.dit import (
    DIT_MOE_VARIANTS,
    DIT_SIZES,
    DiT,
    DiTConfig,
    load_official_checkpoint,
    unwrap_training_state,
)

__all__ = ["convert_dit", "infer_dit_architecture", "is_dit_checkpoint", "load_dit", "main"]

CHECKPOINT_SUFFIXES = (".pt", ".pth")
# Keys every official DiT / DiT-MoE checkpoint has (after the {"ema": ...} wrapper is removed).
_DIT_KEYS = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight")


# DiT's own train.py saves {"model", "ema", "opt", "args"} with its argparse.Namespace under "args": that one class
# is allowed to the safe unpickler (it holds only the command-line values); the EMA weights are the ones converted.
TRAINING_CHECKPOINT_CLASSES = (argparse.Namespace,)


def _read(src: str | Path) -> Mapping[str, Any]:
    # mmap: detection and conversion of a multi-GB file read only the tensors they touch.
    try:
        return torch_load_safely(src, mmap=True, allow=TRAINING_CHECKPOINT_CLASSES)
    except RuntimeError:  # the pre-zip (legacy) torch.save format cannot be memory-mapped
        return torch_load_safely(src, allow=TRAINING_CHECKPOINT_CLASSES)


def is_dit_checkpoint(src: Path) -> bool:
    """A ``.pt`` file holding a DiT / DiT-MoE state dict (raw or in a training wrapper)."""
    if not (src.is_file() and src.suffix in CHECKPOINT_SUFFIXES):
        return False
    try:
        state = _read(src)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
        return False  # not a checkpoint torch reads with weights_only: some other converter's, or none
    if not isinstance(state, Mapping):
        return False
    state = unwrap_training_state(state)
    return all(k in state for k in _DIT_KEYS)


def infer_dit_architecture(state: Mapping[str, Any], source: str = "checkpoint") -> tuple[str, dict[str, Any]]:
    """(registered architecture, model_args overriding its defaults) for an official DiT / DiT-MoE state dict."""
    sd = unwrap_training_state(state)
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    q_norm = sd.get("blocks.0.attn.q_norm.weight")
    qk_norm = q_norm is not None
    if qk_norm:
        heads = hidden // q_norm.shape[0]
    else:
        sizes = [s for s, (d, h, _) in DIT_SIZES.items() if (d, h) == (depth, hidden)]
        if not sizes:
            raise ValueError(
                f"{source}: depth {depth}, width {hidden} is not in the DiT size table and the attention has no "
                "qk-norm, so the number of heads is unknown; name a registered architecture of that shape: "
                "`zoo convert dit ARCH SRC OUT`"
            )
        heads = DIT_SIZES[sizes[0]][2]
    experts = sorted({int(k.split(".")[4]) for k in sd if k.startswith("blocks.0.moe.experts.")})
    fields: dict[str, Any] = dict(
        input_size=int(round(sd["pos_embed"].shape[1] ** 0.5)) * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,  # the last row is the null class
        learn_sigma=sd["final_layer.linear.weight"].shape[0] == 2 * in_channels * patch * patch,
        qk_norm=qk_norm,
        num_experts=len(experts),
    )
    if experts:
        fields["expert_hidden"] = sd["blocks.0.moe.experts.0.gate_proj.weight"].shape[0]
        fields["shared_hidden"] = sd["blocks.0.moe.shared_experts.gate_proj.weight"].shape[0]
    else:
        fields["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    fields = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
    arch = _registered_name(fields) or "dit_tiny"  # dit_tiny takes every DiTConfig field as an override
    with torch.device("meta"):
        registered = _builder_config(arch)
    overrides = {
        k: v for k, v in fields.items() if getattr(registered, k) != v and not _default_width(k, v, fields, registered)
    }
    return arch, overrides


def _registered_name(fields: dict[str, Any]) -> str | None:
    sizes = [s for s, (d, h, _) in DIT_SIZES.items() if (d, h) == (fields["depth"], fields["hidden_size"])]
    if not sizes:
        return None
    if fields["num_experts"]:
        for name, (size, experts, _, qk_norm, _) in DIT_MOE_VARIANTS.items():
            if (size, experts, qk_norm, 2) == (sizes[0], fields["num_experts"], fields["qk_norm"], fields["patch_size"]):
                return name
        return None
    return f"dit_{sizes[0]}_{fields['patch_size']}" if fields["patch_size"] in (2, 4, 8) else None


def _builder_config(arch: str) -> DiTConfig:
    from zoo.registry import create_model

    return create_model(arch).cfg


def _default_width(key: str, value: Any, fields: dict[str, Any], cfg: DiTConfig) -> bool:
    # None in the builder's config means "the official width for this hidden size"; no override needed then.
    hidden = fields["hidden_size"]
    if key == "expert_hidden":
        return cfg.expert_hidden is None and value == int(fields.get("mlp_ratio", cfg.mlp_ratio) * hidden)
    if key == "shared_hidden":
        return cfg.shared_hidden is None and value == cfg.num_shared_experts * hidden
    return False


def _build_and_load(arch: str, src: str | Path, state: Mapping[str, Any], model_args: dict[str, Any]) -> DiT:
    from zoo.registry import create_model

    with torch.device("meta"):  # the checkpoint's tensors become the parameters: a full-size model is built once
        model = create_model(arch, **model_args)
    return load_official_checkpoint(model, state, where=str(src))


def load_dit(src: str | Path) -> DiT:
    """The model of an official DiT / DiT-MoE ``.pt``, architecture read from its shapes."""
    state = _read(src)
    arch, model_args = infer_dit_architecture(state, str(src))
    return _build_and_load(arch, src, state, model_args)


def _convert_detected(src: str | Path, out: str | Path) -> Path:
    from zoo.registry import save_pretrained

    state = _read(src)
    arch, model_args = infer_dit_architecture(state, str(src))
    model = _build_and_load(arch, src, state, model_args)
    return save_pretrained(model, out, arch, model_args, converted_from=str(src), source_format="dit_official")


def convert_dit(arch: str, src: str | Path, out: str | Path, **model_args: Any) -> Path:
    """Build ``arch`` (with ``model_args`` overrides) on the meta device, load ``src`` strictly, save ``out``."""
    from zoo.registry import save_pretrained

    model = _build_and_load(arch, src, _read(src), model_args)
    return save_pretrained(model, out, arch, model_args, converted_from=str(src), source_format="dit_official")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="zoo convert dit", description=__doc__.replace("``", "`"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arch", help="registered architecture, e.g. dit_xl_2, dit_moe_xl_2_8e2a (see `zoo list dit*`)")
    p.add_argument("src", help="official .pt checkpoint")
    p.add_argument("out", help="output directory")
    p.add_argument("--input-size", type=int, help="latent side (32 for 256 px, 64 for 512 px); default 32")
    args = p.parse_args(argv)
    extra = {"input_size": args.input_size} if args.input_size else {}
    try:
        out = convert_dit(args.arch, args.src, args.out, **extra)
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"zoo convert dit: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load with zoo.load({str(out)!r}))")
    return 0


register_converter(
    "dit",
    detect=is_dit_checkpoint,
    load=load_dit,
    convert=_convert_detected,
    summary="official DiT / DiT-MoE .pt checkpoint",
    cli=main,
)
