"""``zoo convert dit ARCH SRC.pt OUT``: an official DiT / DiT-MoE ``.pt`` checkpoint -> an mmzoo directory.

Examples::

    zoo convert dit dit_xl_2 pretrained_models/DiT-XL-2-256x256.pt out/dit_xl_2
    zoo convert dit dit_xl_2 DiT-XL-2-512x512.pt out/dit_xl_2_512 --input-size 64
    zoo convert dit dit_moe_s_2_8e2a dit_moe_s_8E2A.pt out/dit_moe_s     # {"ema": ...} wrapper is unwrapped

The key mapping (``attn.Wqkv``/``out_proj`` -> ``attn.qkv``/``proj``, per-expert Linears -> the MoE core's stacked
experts) is ``zoo.models.dit.checkpoint_filter_fn``; loading is strict and lists missing / unexpected keys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

__all__ = ["convert_dit", "main"]


def convert_dit(arch: str, src: str | Path, out: str | Path, **model_args) -> Path:
    """Build ``arch`` (with ``model_args`` overrides) on the meta device, load ``src`` strictly, save ``out``."""
    from zoo.models.dit import load_official_checkpoint
    from zoo.registry import create_model, save_pretrained

    with torch.device("meta"):
        model = create_model(arch, **model_args)
    load_official_checkpoint(model, src)
    return save_pretrained(model, out, arch, model_args, converted_from=str(src))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="zoo convert dit", description=__doc__,
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
