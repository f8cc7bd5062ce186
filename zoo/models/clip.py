"""CLIP family: tiny open_clip models for the synthetic world, built by open_clip from its own config format.

The architecture is data, the open_clip way: each size is an open_clip model-config JSON in
``zoo/models/clip_configs/`` (file stem = open_clip model name), added to open_clip's registry with
``open_clip.add_model_config`` and built with ``open_clip.create_model``. So the model *is* an ``open_clip.CLIP``:
``.visual`` is the image tower (``forward``, ``preprocess_cfg``: size, mean, std, interpolation), ``encode_image`` /
``encode_text`` give embeddings, and ``open_clip.get_tokenizer(OPEN_CLIP_NAME)`` its tokenizer (open_clip's BPE
``SimpleTokenizer``, vocab 49408, shipped inside open_clip). Exported with ``zoo.save_pretrained`` it reloads via
``zoo.load(dir)``; the tiny MoE-LLaVA uses ``zoo.load(dir).visual`` as its frozen vision tower.

Sizes (``CLIP_SIZES``):

=================  ==========================  =======================================================
zoo name           open_clip config            towers
=================  ==========================  =======================================================
clip_vit_tiny      mmzoo-ViT-tiny-8-64         ViT 64 px / patch 8, width 128, 3 layers, 4 heads (0.64 M);
                                               text ctx 24, width 64, 2 layers, 2 heads; embed 128 (3.9 M
                                               params in all, 3.2 M of them the 49408-token embedding)
clip_vit_tiny4     mmzoo-ViT-tiny4-8-64        as clip_vit_tiny with a 4-block image tower (0.84 M; 4.1 M in all):
                                               the tiny MoE-LLaVA's stage 0, whose penultimate block (what
                                               LLaVA reads) then has three blocks of context behind it
=================  ==========================  =======================================================
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from zoo.registry import register_model

__all__ = ["CLIP_SIZES", "CONFIG_DIR", "open_clip_name", "register_open_clip_configs", "get_tokenizer",
           "image_transform", "clip_vit_tiny"]

CONFIG_DIR = Path(__file__).parent / "clip_configs"

# zoo architecture name -> open_clip model-config name (a JSON file in CONFIG_DIR)
CLIP_SIZES: dict[str, str] = {
    "clip_vit_tiny": "mmzoo-ViT-tiny-8-64",
    "clip_vit_tiny4": "mmzoo-ViT-tiny4-8-64",
}

_configs_added = False


def register_open_clip_configs() -> None:
    """Add ``CONFIG_DIR`` to open_clip's model-config registry (once per process)."""
    global _configs_added
    if _configs_added:
        return
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    missing = [n for n in CLIP_SIZES.values() if n not in open_clip.list_models()]
    if missing:
        raise RuntimeError(f"open_clip did not pick up the configs {missing} from {CONFIG_DIR}")
    _configs_added = True


def open_clip_name(architecture: str) -> str:
    """The open_clip model-config name behind a zoo CLIP architecture."""
    if architecture not in CLIP_SIZES:
        raise KeyError(f"unknown CLIP architecture {architecture!r}; known: {', '.join(CLIP_SIZES)}")
    return CLIP_SIZES[architecture]


def get_tokenizer(architecture: str, context_length: int | None = None) -> Any:
    """open_clip's tokenizer for the architecture (``SimpleTokenizer``; ``context_length`` from its config)."""
    import open_clip

    register_open_clip_configs()
    return open_clip.get_tokenizer(open_clip_name(architecture), context_length=context_length)


def image_transform(model: nn.Module, is_train: bool = False) -> Any:
    """PIL -> normalised tensor, from the model's own preprocessing config (size, mean, std, interpolation)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = open_clip.get_model_preprocess_cfg(model)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=is_train)


class _DropRandomInitWarning(logging.Filter):
    # open_clip warns on the root logger whenever it builds a model without weights; random init is what we
    # ask for here (weights come from zoo.load), so that one message is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


def _create(architecture: str, context_length: int | None = None, **open_clip_kwargs: Any) -> nn.Module:
    import open_clip

    register_open_clip_configs()
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        # pretrained=None: random init; nothing is ever downloaded here.
        return open_clip.create_model(
            open_clip_name(architecture),
            pretrained=None,
            force_context_length=context_length,
            output_dict=True,
            **open_clip_kwargs,
        )
    finally:
        logging.getLogger().removeFilter(quiet)


@register_model(family="clip")
def clip_vit_tiny(context_length: int | None = None) -> nn.Module:
    """Tiny CLIP for 64 px synthetic scenes (see the size table in the module docstring)."""
    return _create("clip_vit_tiny", context_length=context_length)


@register_model(family="clip")
def clip_vit_tiny4(context_length: int | None = None) -> nn.Module:
    """The tiny CLIP with a 4-block image tower (see the size table in the module docstring)."""
    return _create("clip_vit_tiny4", context_length=context_length)
