"""Model families. ``import_families()`` imports every family, which registers its architectures with zoo.registry
(the weights names are registered by zoo.weights_table); ``zoo.registry`` calls it before it lists or builds a model.
Importing the package itself loads no family, so that a light submodule (``zoo.models.dit_config``, which the recipe
validator imports) does not load torch."""

from __future__ import annotations

import importlib

__all__ = ["FAMILIES", "import_families"]

FAMILIES = ("clip", "digit_cnn", "dit", "flmm", "moe_llava", "uni_moe")


def import_families() -> None:
    """Import every family module (each registers its architectures when imported; a second call costs nothing)."""
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}")
