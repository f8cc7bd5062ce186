"""Model registry, weights tables and the one loading path.

Names follow timm: ``family_size`` names an architecture (a registered builder) and ``family_size.tag`` names
weights for it. ``create_model`` builds an architecture; ``load`` builds and fills it from weights, either a
registered ``name.tag`` or a local directory holding ``config.json`` + ``model.safetensors`` written by
``save_pretrained``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "WeightsCfg",
    "register_model",
    "register_weights",
    "create_model",
    "list_models",
    "list_pretrained",
    "get_weights_cfg",
    "resolve_weights_dir",
    "load",
    "save_pretrained",
    "atomic_write",
    "SHIPPED_WEIGHTS_DIR",
]

SHIPPED_WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True, kw_only=True)
class WeightsCfg:
    """Where a set of weights lives, how it was made and what it scored."""

    file: str | None = None  # a directory under zoo/weights/ (shipped) or an absolute path
    hf_hub_id: str | None = None  # for officially released weights; never fetched in tests
    filename: str | None = None
    sha256: str | None = None
    recipe: str | None = None  # "recipes/...yaml@<commit>" that produced shipped weights
    metrics: dict[str, float] = field(default_factory=dict)
    license: str | None = None
    notes: str = ""


@dataclass(frozen=True)
class _ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    family: str


_MODELS: dict[str, _ModelEntry] = {}
_WEIGHTS: dict[str, WeightsCfg] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None, family: str = ""):
    """Register a builder ``fn(**model_args) -> nn.Module`` under its function name (or ``name``)."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key].builder is not f:
            raise ValueError(f"model name {key!r} is registered twice")
        _MODELS[key] = _ModelEntry(key, f, family or f.__module__.rsplit(".", 1)[-1])
        return f

    return wrap(fn) if fn is not None else wrap


def register_weights(model_name: str, tag: str, cfg: WeightsCfg) -> None:
    """Attach weights ``model_name.tag`` to a registered architecture."""
    key = f"{model_name}.{tag}"
    _WEIGHTS[key] = cfg


def _ensure_registered() -> None:
    # Families register themselves on import; importing here keeps `import zoo.registry` light.
    import zoo.models  # noqa: F401  (lazy: breaks the cycle zoo.registry <-> zoo.models, which registers into it)


def list_models(pattern: str = "*") -> list[str]:
    _ensure_registered()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def list_pretrained(pattern: str = "*") -> list[str]:
    _ensure_registered()
    return sorted(n for n in _WEIGHTS if fnmatch.fnmatch(n, pattern))


def get_weights_cfg(name: str) -> WeightsCfg:
    _ensure_registered()
    if name not in _WEIGHTS:
        raise KeyError(f"no weights named {name!r}; known: {', '.join(list_pretrained()) or 'none'}")
    return _WEIGHTS[name]


def create_model(name: str, pretrained: bool = False, **model_args: Any) -> nn.Module:
    """Build a registered architecture; with ``pretrained=True`` ``name`` must be ``arch.tag``."""
    _ensure_registered()
    if pretrained or name in _WEIGHTS:
        return load(name, **model_args)
    if name not in _MODELS:
        close = fnmatch.filter(_MODELS, f"*{name.split('_')[0]}*")
        hint = f" Similar: {', '.join(sorted(close))}." if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} See `zoo list`.")
    return _MODELS[name].builder(**model_args)


def resolve_weights_dir(cfg: WeightsCfg, name: str) -> Path:
    """The local directory of a weights entry (shipped under zoo/weights/ or absolute); never downloads."""
    if cfg.file is None:
        raise FileNotFoundError(
            f"weights {name!r} live on the hub ({cfg.hf_hub_id}); mmzoo never downloads at run time. Download the "
            "release yourself, then zoo.load(<its directory>) or `zoo convert <its directory> <out>`."
        )
    path = Path(cfg.file)
    return path if path.is_absolute() else SHIPPED_WEIGHTS_DIR / path


def load(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Build a model and load its weights strictly, from a weights name or a local directory."""
    _ensure_registered()
    path = Path(name_or_path)
    if not path.exists():
        cfg = get_weights_cfg(str(name_or_path))
        path = resolve_weights_dir(cfg, str(name_or_path))
    if path.is_file():
        path = path.parent
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; mmzoo checkpoints are a directory written by save_pretrained")
    config = json.loads(cfg_file.read_text())
    if "architecture" not in config:
        # Not ours: an officially released directory (MoE-LLaVA, transformers Llava). The converters read those
        # layouts and map their keys; `zoo convert` writes the same model as an mmzoo directory once and for all.
        from zoo.convert import load_released

        return load_released(path).eval()
    if "model_args" not in config:
        raise ValueError(f"{cfg_file}: missing field 'model_args'")
    model_args = {**config["model_args"], **overrides}
    model = create_model(config["architecture"], **model_args)
    weights_file = path / WEIGHTS_NAME
    if not weights_file.exists():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, str(weights_file), strict=False, device=str(map_location))
    if missing or unexpected:
        raise RuntimeError(
            f"{weights_file}: checkpoint does not match {config['architecture']}: "
            f"missing keys {sorted(missing)[:20]}, unexpected keys {sorted(unexpected)[:20]}"
        )
    model.eval()
    return model


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the mode an ordinary open() would have (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    architecture: str,
    model_args: dict[str, Any],
    **extra: Any,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture + model_args + extra) atomically."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"architecture": architecture, "model_args": model_args, **extra}
    json.dumps(config)  # fail before writing anything if the args are not JSON
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_model(model, tmp))
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str)))
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_cfg_dict(cfg: WeightsCfg) -> dict[str, Any]:
    return asdict(cfg)
