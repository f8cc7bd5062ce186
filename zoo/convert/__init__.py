"""Checkpoint converters: released layouts -> mmzoo directories (``config.json`` + ``model.safetensors``).

``zoo convert moe-llava SRC OUT [--vision-weights DIR]``: an official MoE-LLaVA release directory.
``zoo convert llava-hf SRC OUT [--template NAME]``: a transformers ``LlavaForConditionalGeneration`` directory.
``zoo convert auto SRC OUT``: choose from ``config.json``'s ``model_type``.
``zoo convert dit ...``: handed to ``zoo.convert.dit`` (DiT / DiT-MoE checkpoints).

The result loads with ``zoo.load(OUT)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["main", "convert", "detect_format", "load_released"]

_MOE_LLAVA_TYPES = (
    "moe_llava_phi",
    "moe_llava_stablelm",
    "moe_llava_qwen",
    "llava_phi",
    "llava_stablelm",
    "llava_qwen",
)


def detect_format(src: str | Path) -> str:
    """``moe-llava`` or ``llava-hf`` from the ``model_type`` field of ``src/config.json``."""
    from zoo.convert.common import read_config

    model_type = read_config(src).get("model_type")
    if model_type in _MOE_LLAVA_TYPES:
        return "moe-llava"
    if model_type == "llava":
        return "llava-hf"
    raise ValueError(
        f"{Path(src) / 'config.json'}: field 'model_type' = {model_type!r} is not a format "
        f"zoo convert knows ({', '.join(_MOE_LLAVA_TYPES)}, llava)"
    )


def load_released(src: str | Path, fmt: str = "auto", **kwargs):
    """Build and load a released directory in memory (no mmzoo directory written); returns the model."""
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "moe-llava":
        from zoo.convert.moe_llava import load_official

        return load_official(src, vision_weights=kwargs.get("vision_weights"))
    if fmt == "llava-hf":
        from zoo.convert.llava_hf import load_llava_hf

        return load_llava_hf(src, template=kwargs.get("template") or "vicuna_v1")
    raise ValueError(f"unknown format {fmt!r}; use moe-llava, llava-hf or auto")


def convert(src: str | Path, out: str | Path, fmt: str = "auto", **kwargs) -> Path:
    """Convert ``src`` (format ``moe-llava``, ``llava-hf`` or ``auto``) into an mmzoo directory ``out``."""
    if fmt == "auto":
        fmt = detect_format(src)
    if fmt == "moe-llava":
        from zoo.convert.moe_llava import convert_moe_llava

        return convert_moe_llava(src, out, vision_weights=kwargs.get("vision_weights"))
    if fmt == "llava-hf":
        from zoo.convert.llava_hf import convert_llava_hf

        return convert_llava_hf(src, out, template=kwargs.get("template") or "vicuna_v1")
    raise ValueError(f"unknown format {fmt!r}; use moe-llava, llava-hf or auto")


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "dit":
        try:
            dit = importlib.import_module("zoo.convert.dit")
        except ModuleNotFoundError:
            print("zoo convert dit: not available in this build", file=sys.stderr)
            return 2
        if not hasattr(dit, "main"):
            print("zoo convert dit: zoo.convert.dit has no command-line entry point", file=sys.stderr)
            return 2
        return int(dit.main(argv[1:]) or 0)
    p = argparse.ArgumentParser(
        prog="zoo convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("format", choices=["auto", "moe-llava", "llava-hf"], help="source layout")
    p.add_argument("src", help="released model directory (config.json + weights)")
    p.add_argument("out", help="output directory for the mmzoo checkpoint")
    p.add_argument(
        "--vision-weights",
        metavar="DIR",
        help="moe-llava: local transformers CLIP/SigLIP directory when the release lacks tower weights",
    )
    p.add_argument("--template", help="llava-hf: conversation template for generate (default vicuna_v1)")
    args = p.parse_args(argv)
    try:
        out = convert(
            args.src, args.out, args.format, vision_weights=args.vision_weights, template=args.template
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"zoo convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load with zoo.load({str(out)!r}))")
    return 0
