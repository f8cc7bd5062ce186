"""mmzoo evaluation: benchmark tasks, official scorers, the runner behind ``zoo eval`` and its reports.

Python API::

    import eval
    results = eval.run(model, "shapes_vqa,shapes_pope", limit=8, batch_size=8, output_dir="runs/eval/x")
    eval.list_tasks()                     # registered task names (YAMLs under eval/tasks/<bench>/)

``model`` is any object with ``generate(images, prompts, max_new_tokens=..., **gen) -> list[str]``
(``eval.models.GenerativeModel``) or a name / directory for ``zoo.load``. How to add a task: ``eval.registry``.
Attributes are imported lazily so that ``import eval.bench`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "run",
    "list_tasks",
    "get_task",
    "register_task",
    "TaskSpec",
    "Doc",
    "GenerativeModel",
    "GenerationStats",
]

_LAZY = {
    "run": "eval.runner",
    "list_tasks": "eval.registry",
    "get_task": "eval.registry",
    "register_task": "eval.registry",
    "TaskSpec": "eval.registry",
    "Doc": "eval.registry",
    "GenerativeModel": "eval.models",
    "GenerationStats": "eval.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
