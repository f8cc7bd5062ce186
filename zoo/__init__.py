"""mmzoo: a multimodal mixture-of-experts model zoo.

The public names are imported on first use, so `import zoo` (and a recipe check that fails on a misspelt key) does
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["create_model", "list_models", "list_pretrained", "load", "save_pretrained"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("zoo.registry"), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
