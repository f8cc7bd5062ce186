"""Files that ship with mmzoo and are found by name: the recipes.

In a git checkout the recipes are the top-level ``recipes/`` folder; a wheel installs the same files as
``zoo/_recipes/`` (setup.py maps one onto the other, because a wheel can only carry files inside packages). So
``zoo train moe_llava/shapes_tiny`` works in both, and a path to a YAML file always wins over a name.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["recipes_dir", "list_recipes", "find_recipe"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def recipes_dir() -> Path | None:
    """The installed recipes (``zoo/_recipes``) or, in a checkout, ``recipes/`` beside ``zoo/``; None if neither."""
    for candidate in (_PACKAGE_DIR / "_recipes", _PACKAGE_DIR.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    return None


def list_recipes() -> list[str]:
    """Names of the shipped recipes, ``family/name`` (the YAML path under the recipes folder, no suffix)."""
    root = recipes_dir()
    if root is None:
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.yaml"))


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe file: an existing path as given, else a shipped recipe named ``family/name`` (``.yaml`` optional).

    ``recipes/family/name.yaml`` (the checkout spelling used throughout the docs) resolves too, so the documented
    commands work from an installed wheel in any folder. An unknown name is returned unchanged, and the recipe loader
    reports it as a missing file.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    root = recipes_dir()
    if root is None:
        return path
    name = path.as_posix().removesuffix(".yaml").removeprefix("recipes/")
    shipped = root / f"{name}.yaml"
    return shipped if shipped.is_file() else path
