"""Stage-type registry: a recipe stage's ``type:`` -> a :class:`zoo.stages.base.StageModule` subclass.

"Task" in mmzoo means a benchmark (``eval/tasks``); what a training stage does is its *stage type*. A stage module
registers its class with ``@register_stage("name")``. Importing this package stays light (no torch,
no lightning), because the recipe validator uses it before anything heavy is loaded: ``get_stage_type(name)`` imports only
the one module that defines ``name``. That module is found without importing anything, by reading the
``@register_stage("...")`` decorators in ``zoo/stages/*.py`` (the name must be a string literal there). Tasks defined
outside ``zoo/stages/`` work too: import their module before running the recipe and they are found in the table.

Validating a recipe needs only a stage type's config dataclasses, and a stage module imports Lightning (seconds), so
``stage_configs(name)`` does not import it: the same ``ast`` reading finds the class body's ``ModelConfig = X`` /
``DataConfig = Y`` / ``EvalConfig = Z`` and the module's ``from M import X`` lines, and imports only ``M``
(``zoo/stages/configs/*``, torch-free). A stage whose config classes are not imported that way (defined in the stage
module itself, say) still works: its module is imported instead.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

if TYPE_CHECKING:
    from zoo.stages.base import StageModule

__all__ = ["StageConfigs", "register_stage", "get_stage_type", "list_stage_types", "stage_configs", "stage_type_module"]

_STAGE_TYPES: dict[str, type] = {}
_CONFIG_ATTRS = ("ModelConfig", "DataConfig", "EvalConfig")
_T = TypeVar("_T", bound=type)


def register_stage(name: str):
    """Class decorator: make a :class:`StageModule` subclass available to recipes as ``type: name``."""

    def wrap(cls: _T) -> _T:
        for attr in _CONFIG_ATTRS:
            if not hasattr(cls, attr):
                raise TypeError(f"stage type {name!r} ({cls.__qualname__}) must define the class attribute {attr}")
        if name in _STAGE_TYPES and _STAGE_TYPES[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"stage type {name!r} is registered twice ({_STAGE_TYPES[name].__qualname__}, {cls.__qualname__})")
        cls.stage_type = name
        _STAGE_TYPES[name] = cls
        return cls

    return wrap


class StageConfigs(NamedTuple):
    """The dataclasses a stage type validates its recipe sections against."""

    model: type
    data: type
    eval: type


class _Declaration(NamedTuple):
    module: str  # the stage module, e.g. zoo.stages.moe_llava
    # ModelConfig / DataConfig / EvalConfig -> (module, name) they are imported from; None where the stage module
    # does not import all three by ``from M import X`` (they are then read from the imported stage class)
    config_sources: dict[str, tuple[str, str]] | None


def _config_sources(tree: ast.Module, cls: ast.ClassDef, module: str) -> dict[str, tuple[str, str]] | None:
    """Where the class body's ``ModelConfig = X`` (etc.) come from, read off the module's top-level imports."""
    imported: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            try:
                source = importlib.util.resolve_name("." * node.level + (node.module or ""), module.rpartition(".")[0])
            except ImportError:
                continue  # a relative import above the top package: importing the stage module reports it
            for alias in node.names:
                imported[alias.asname or alias.name] = (source, alias.name)
    found: dict[str, tuple[str, str]] = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in _CONFIG_ATTRS and isinstance(value, ast.Name):
            if value.id not in imported:
                return None
            found[target.id] = imported[value.id]
    return found if set(found) == set(_CONFIG_ATTRS) else None


@lru_cache(maxsize=1)
def _declared() -> dict[str, _Declaration]:
    """Stage type name -> its module and config sources, read from ``zoo/stages/*.py`` without importing them."""
    found: dict[str, _Declaration] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name in ("__init__.py", "base.py"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError:
            # The module is broken; importing it (when its stage type is asked for) reports the real error.
            continue
        module = f"{__name__}.{path.stem}"
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
                    found[dec.args[0].value] = _Declaration(module, _config_sources(tree, node, module))
    return found


def _declared_stage_types() -> dict[str, str]:
    """Task name -> module, read from the ``@register_stage("...")`` decorators of ``zoo/stages/*.py``."""
    return {name: d.module for name, d in _declared().items()}


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


def stage_configs(name: str) -> StageConfigs:
    """Stage type ``name``'s ``ModelConfig`` / ``DataConfig`` / ``EvalConfig``, importing only the modules that define
    them where the stage module imports them by ``from M import X`` (see the module docstring); else its class's."""
    if name not in _STAGE_TYPES:
        declaration = _declared().get(name)
        if declaration is not None and declaration.config_sources is not None:
            sources = declaration.config_sources
            return StageConfigs(
                *(getattr(importlib.import_module(sources[attr][0]), sources[attr][1]) for attr in _CONFIG_ATTRS)
            )
    cls = get_stage_type(name)
    return StageConfigs(*(getattr(cls, attr) for attr in _CONFIG_ATTRS))
