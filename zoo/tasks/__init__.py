"""Task registry: recipe ``task:`` names -> :class:`zoo.tasks.base.StageTask` subclasses.

A task module registers its class with ``@register_task("name")``. Importing this package stays light (no torch,
no lightning), because the recipe validator uses it before anything heavy is loaded: ``get_task(name)`` imports only
the one module that defines ``name``. That module is found without importing anything, by reading the
``@register_task("...")`` decorators in ``zoo/tasks/*.py`` (the name must be a string literal there). Tasks defined
outside ``zoo/tasks/`` work too: import their module before running the recipe and they are found in the table.
"""

from __future__ import annotations

import ast
import difflib
import importlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from zoo.tasks.base import StageTask

__all__ = ["register_task", "get_task", "list_tasks", "task_module"]

_TASKS: dict[str, type] = {}
_T = TypeVar("_T", bound=type)


def register_task(name: str):
    """Class decorator: make a :class:`StageTask` subclass available to recipes as ``task: name``."""

    def wrap(cls: _T) -> _T:
        for attr in ("ModelConfig", "DataConfig", "EvalConfig"):
            if not hasattr(cls, attr):
                raise TypeError(f"task {name!r} ({cls.__qualname__}) must define the class attribute {attr}")
        if name in _TASKS and _TASKS[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"task name {name!r} is registered twice ({_TASKS[name].__qualname__}, {cls.__qualname__})")
        cls.task_name = name
        _TASKS[name] = cls
        return cls

    return wrap


@lru_cache(maxsize=1)
def _declared_tasks() -> dict[str, str]:
    """Task name -> module, read from the ``@register_task("...")`` decorators of ``zoo/tasks/*.py``."""
    found: dict[str, str] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name in ("__init__.py", "base.py"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError:
            # The module is broken; importing it (when its task is asked for) reports the real error.
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for dec in node.decorator_list:
                if (
                    isinstance(dec, ast.Call)
                    and getattr(dec.func, "id", getattr(dec.func, "attr", None)) == "register_task"
                    and dec.args
                    and isinstance(dec.args[0], ast.Constant)
                    and isinstance(dec.args[0].value, str)
                ):
                    found[dec.args[0].value] = f"{__name__}.{path.stem}"
    return found


def list_tasks() -> list[str]:
    """Every task name a recipe may use (registered ones plus those declared in ``zoo/tasks/*.py``)."""
    return sorted(set(_TASKS) | set(_declared_tasks()))


def task_module(name: str) -> str | None:
    """The module that defines task ``name`` (without importing it), or None if no module declares it."""
    if name in _TASKS:
        return _TASKS[name].__module__
    return _declared_tasks().get(name)


def get_task(name: str) -> type[StageTask]:
    """The task class registered as ``name``, importing its module on first use."""
    if name not in _TASKS:
        module = task_module(name)
        if module is None:
            close = difflib.get_close_matches(name, list_tasks(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(list_tasks()) or 'none'}")
        importlib.import_module(module)
        if name not in _TASKS:
            raise KeyError(f"module {module} declares task {name!r} but importing it did not register it")
    return _TASKS[name]
