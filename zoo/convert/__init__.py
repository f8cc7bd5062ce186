"""Checkpoint converters: released layouts -> mmzoo models and directories (``config.json`` + ``model.safetensors``).

A converter registers itself with :func:`register_converter`: a name, ``detect(path) -> bool`` (does ``path`` hold
this layout? read config.json fields or the checkpoint's keys, cheaply, and never raise for a foreign layout),
``load(path, **options) -> nn.Module`` (the model in memory), ``convert(path, out, **options) -> Path`` (an mmzoo
directory) and the options it accepts. ``detect_format``, ``load_released``, ``convert``, ``zoo convert`` and
``zoo.load`` of a directory that is not ours all go through this table, so a new layout needs no edit elsewhere.

Registered here:

``zoo convert moe-llava SRC OUT [--vision-weights DIR]``: an official MoE-LLaVA release directory.
``zoo convert llava-hf SRC OUT [--template NAME]``: a transformers ``LlavaForConditionalGeneration`` directory.
``zoo convert dit ARCH SRC.pt OUT [--input-size N]``: an official DiT / DiT-MoE ``.pt`` checkpoint.
``zoo convert uni-moe-v1 SRC OUT --base DIR``: an official Uni-MoE v1 release (``-e2`` on top of ``-base``).
``zoo convert uni-moe-8e SRC OUT --base DIR``: an official Uni-MoE 8-expert (DeepSpeed) release.
``zoo convert auto SRC OUT``: whichever registered converter recognises SRC (for a DiT ``.pt`` the architecture is
read from the tensor shapes).

The result loads with ``zoo.load(OUT)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Converter",
    "register_converter",
    "list_converters",
    "get_converter",
    "detect_format",
    "load_released",
    "convert",
    "main",
]


@dataclass(frozen=True, kw_only=True)
class Converter:
    """How to recognise, load and convert one released checkpoint layout."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., Any]  # (src, **options) -> nn.Module
    convert: Callable[..., Path]  # (src, out, **options) -> out
    options: dict[str, str] = field(default_factory=dict)  # keyword option load / convert accept -> its --flag help
    summary: str = ""
    # A layout whose CLI takes other positional arguments (DiT: the architecture) hands `zoo convert NAME ...` to this.
    cli: Callable[[list[str]], int] | None = None


_CONVERTERS: dict[str, Converter] = {}


def register_converter(
    name: str,
    *,
    detect: Callable[[Path], bool],
    load: Callable[..., Any],
    convert: Callable[..., Path],
    options: dict[str, str] | None = None,
    summary: str = "",
    cli: Callable[[list[str]], int] | None = None,
) -> Converter:
    """Add a layout to the table (``name`` is what ``zoo convert NAME`` and ``fmt=`` take)."""
    if name == "auto":
        raise ValueError("'auto' is reserved for detection; pick another converter name")
    entry = Converter(
        name=name, detect=detect, load=load, convert=convert, options=dict(options or {}), summary=summary, cli=cli
    )
    if name in _CONVERTERS and _CONVERTERS[name] != entry:
        raise ValueError(f"converter {name!r} is registered twice")
    _CONVERTERS[name] = entry
    return entry


def _ensure_registered() -> None:
    # Lazy registration imports of the built-in converters (each imports its model family, which imports
    # zoo.registry, whose load() imports this package: importing them at the top would be a cycle).
    from zoo.convert import dit, llava_hf, moe_llava, uni_moe  # noqa: F401


def list_converters() -> list[str]:
    _ensure_registered()
    return sorted(_CONVERTERS)


def get_converter(name: str) -> Converter:
    _ensure_registered()
    if name not in _CONVERTERS:
        raise ValueError(f"unknown format {name!r}; use auto or one of {', '.join(sorted(_CONVERTERS))}")
    return _CONVERTERS[name]


def detect_format(src: str | os.PathLike) -> str:
    """The name of the one registered converter whose ``detect`` recognises ``src``."""
    _ensure_registered()
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    found = [name for name, c in sorted(_CONVERTERS.items()) if c.detect(src)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{src}: several converters recognise it ({', '.join(found)}); name the format")
    raise ValueError(f"{src}: not a format zoo convert knows (registered: {', '.join(sorted(_CONVERTERS))})")


def _resolve(src: str | os.PathLike, fmt: str, options: dict[str, Any]) -> tuple[Converter, dict[str, Any]]:
    converter = get_converter(detect_format(src) if fmt == "auto" else fmt)
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - set(converter.options))
    if foreign:
        raise ValueError(
            f"{src}: option(s) {', '.join(foreign)} do not apply to format {converter.name!r} "
            f"(it takes {', '.join(converter.options) or 'none'})"
        )
    return converter, given


def load_released(src: str | os.PathLike, fmt: str = "auto", **options: Any):
    """Build and load a released checkpoint in memory (nothing written); returns the model in eval mode."""
    converter, given = _resolve(src, fmt, options)
    return converter.load(Path(src), **given).eval()


def convert(src: str | os.PathLike, out: str | os.PathLike, fmt: str = "auto", **options: Any) -> Path:
    """Convert ``src`` (a registered format name, or ``auto``) into an mmzoo directory ``out``."""
    converter, given = _resolve(src, fmt, options)
    return converter.convert(Path(src), Path(out), **given)


def main(argv: list[str]) -> int:
    argv = list(argv)
    _ensure_registered()
    if argv and argv[0] in _CONVERTERS and _CONVERTERS[argv[0]].cli is not None:
        return int(_CONVERTERS[argv[0]].cli(argv[1:]) or 0)
    p = argparse.ArgumentParser(
        prog="zoo convert", description=__doc__.replace("``", "`"), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("format", choices=["auto", *sorted(_CONVERTERS)], help="source layout")
    p.add_argument("src", help="released checkpoint (a model directory, or a DiT .pt file)")
    p.add_argument("out", help="output directory for the mmzoo checkpoint")
    helps: dict[str, list[str]] = {}
    for c in sorted(_CONVERTERS.values(), key=lambda c: c.name):
        for option, text in c.options.items():
            helps.setdefault(option, []).append(f"{c.name}: {text}")
    for option, texts in helps.items():
        p.add_argument("--" + option.replace("_", "-"), dest=option, help="; ".join(texts))
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.out, args.format, **{o: getattr(args, o) for o in helps})
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"zoo convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load with zoo.load({str(out)!r}))")
    return 0
