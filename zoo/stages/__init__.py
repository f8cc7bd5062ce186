"""Stage-type registry: a recipe stage's ``type:`` -> a :class:`zoo.stages.base.StageModule` subclass.

"Task" in mmzoo means a benchmark (``eval/tasks``); what a training stage does is its *stage type*. A stage module
registers its class with ``@register_stage("name")``. Importing this package stays light (no torch,
no lightning), because the recipe validator uses it before anything heavy is loaded: ``get_stage_type(name)`` imports only
the one module that defines ``name``. That module is found without importing anything, by reading the
``@register_stage("...")`` decorators in ``zoo/stages/*.py`` (the name must be a string literal there). Tasks defined
outside ``zoo/stages/`` work too: import their module before running the recipe and they are found in the table.
"""

from __future__ import annotations

import ast
import difflib
import importlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from zoo.stages.base import StageModule

__all__ = ["register_stage", "get_stage_type", "list_stage_types", "stage_type_module"]

_STAGE_TYPES: dict[str, type] = {}
_T = TypeVar("_T", bound=type)


def register_stage(name: str):
    """Class decorator: make a :class:`StageModule` subclass available to recipes as ``type: name``."""

    def wrap(cls: _T) -> _T:
        for attr in ("ModelConfig", "DataConfig", "EvalConfig"):
            if not hasattr(cls, attr):
                raise TypeError(f"stage type {name!r} ({cls.__qualname__}) must define the class attribute {attr}")
        if name in _STAGE_TYPES and _STAGE_TYPES[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"stage type {name!r} is registered twice ({_STAGE_TYPES[name].__qualname__}, {cls.__qualname__})")
        cls.stage_type = name
        _STAGE_TYPES[name] = cls
        return cls

    return wrap


@lru_cache(maxsize=1)
def _declared_stage_types() -> dict[str, str]:
    """Task name -> module, read from the ``@register_stage("...")`` decorators of ``zoo/stages/*.py``."""
    found: dict[str, str] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name in ("__init__.py", "base.py"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError:
            # The module is broken; importing it (when its stage type is asked for) reports the real error.
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for dec in node.decorator_list:
                if (
                    isinstance(dec, ast.Call)
                    and getattr(dec.func, "id", getattr(dec.func, "attr", None)) == "register_stage"
                    and dec.args
                    and isinstance(dec.args[0], ast.Constant)
                    and isinstance(dec.args[0].value, str)
                ):
                    found[dec.args[0].value] = f"{__name__}.{path.stem}"
    return found


def list_stage_types() -> list[str]:
    """Every stage type a recipe may use (registered ones plus those declared in ``zoo/stages/*.py``)."""
    return sorted(set(_STAGE_TYPES) | set(_declared_stage_types()))


def stage_type_module(name: str) -> str | None:
    """The module that defines stage type ``name`` (without importing it), or None if no module declares it."""
    if name in _STAGE_TYPES:
        return _STAGE_TYPES[name].__module__
    return _declared_stage_types().get(name)


def get_stage_type(name: str) -> type[StageModule]:
    """The stage module class registered as ``name``, importing its module on first use."""
    if name not in _STAGE_TYPES:
        module = stage_type_module(name)
        if module is None:
            close = difflib.get_close_matches(name, list_stage_types(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown stage type {name!r}.{hint} Known stage types: {', '.join(list_stage_types()) or 'none'}")
        importlib.import_module(module)
        if name not in _STAGE_TYPES:
            raise KeyError(f"module {module} declares stage type {name!r} but importing it did not register it")
    return _STAGE_TYPES[name]
