"""Model registry, weights table and the one loading path.

Names follow timm: ``family_size`` names an architecture (a registered builder) and ``family_size.tag`` names
weights for it (every one of them is in ``zoo/weights_table.py``). ``create_model`` builds an architecture; ``load``
builds and fills it from weights:

* a registered ``name.tag`` -> its directory (shipped under ``zoo/weights/``; the recorded sha256 of
  ``model.safetensors`` is checked before anything is read);
* a directory written by ``save_pretrained`` (``config.json`` with ``architecture`` + ``model_args``, and
  ``model.safetensors``) -> the registered builder -> a strict load (``zoo.checkpoint``);
* anything else (an official release directory, a DiT ``.pt``) -> the converter table (``zoo.convert``), which asks
  each registered converter whether it recognises the layout. This module names no family and no converter.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
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
    "resolve_weights",
    "load",
    "save_pretrained",
    "atomic_write",
    "is_zoo_checkpoint",
    "WeightsHashMismatchError",
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
    sha256: str | None = None  # of the shipped model.safetensors; zoo.load refuses a file that differs
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


class WeightsHashMismatchError(ValueError):
    """A weights file whose sha256 differs from the one recorded in the weights table."""


def _ensure_registered() -> None:
    # Lazy registration imports: both modules import this one, so importing them at the top would be a cycle.
    import zoo.models  # noqa: F401  (registers every family's architectures; cycle zoo.registry <-> zoo.models)
    import zoo.weights_table  # noqa: F401  (registers every weights name; cycle zoo.registry <-> zoo.weights_table)


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
            "release yourself, then zoo.load(<its directory or file>) or `zoo convert auto <it> <out>`."
        )
    path = Path(cfg.file)
    return path if path.is_absolute() else SHIPPED_WEIGHTS_DIR / path


def resolve_weights(name: str) -> Path:
    """The local directory of registered weights ``name`` with its recorded sha256 checked; never downloads."""
    cfg = get_weights_cfg(name)
    path = resolve_weights_dir(cfg, name)
    if cfg.sha256 is not None:
        _check_sha256(path / WEIGHTS_NAME, cfg.sha256)
    return path


def is_zoo_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_pretrained`` (its config.json names an architecture)."""
    cfg_file = Path(path) / CONFIG_NAME
    if not cfg_file.is_file():
        return False
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    return isinstance(config, dict) and "architecture" in config


def _check_sha256(weights_file: Path, expected: str) -> None:
    from zoo.checkpoint import sha256_file

    actual = sha256_file(weights_file)
    if actual != expected:
        raise WeightsHashMismatchError(
            f"{weights_file}: sha256 {actual} differs from the {expected} recorded in zoo/weights_table.py; the "
            "file is damaged or was replaced (re-shipped weights need their new hash recorded there)"
        )


def load(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Build a model and load its weights strictly, from a weights name, an mmzoo directory or a released layout.

    For an mmzoo directory ``overrides`` replace entries of its ``model_args``; for a released layout they are the
    converter's options (e.g. ``vision_weights=`` for an official MoE-LLaVA release without its tower).
    """
    _ensure_registered()
    path = Path(name_or_path)
    if not path.exists():
        path = resolve_weights(str(name_or_path))
    if path.is_file() and is_zoo_checkpoint(path.parent):
        path = path.parent  # the model.safetensors (or config.json) of one of our directories
    if not is_zoo_checkpoint(path):
        # Lazy import: the converter table registers converters that import model families, which import this module.
        from zoo.convert import detect_format, load_released

        try:
            fmt = detect_format(path)
        except ValueError as e:
            raise FileNotFoundError(
                f"{path}: not an mmzoo checkpoint (a directory whose {CONFIG_NAME} names an 'architecture', written "
                f"by save_pretrained), and the converter table says: {e}"
            ) from None
        return load_released(path, fmt, **overrides)
    cfg_file = path / CONFIG_NAME
    config = json.loads(cfg_file.read_text())
    if not isinstance(config.get("model_args"), dict):
        raise ValueError(f"{cfg_file}: field 'model_args' is missing or not a mapping")
    weights_file = path / WEIGHTS_NAME
    if not weights_file.exists():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
    try:
        model = create_model(config["architecture"], **{**config["model_args"], **overrides})
    except (KeyError, TypeError) as e:
        # An unknown architecture, or model_args its builder does not take (a typo, or a config from another version).
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ValueError(f"{cfg_file}: cannot build {config['architecture']!r} from its model_args: {msg}") from None
    from zoo.checkpoint import load_file_strict

    load_file_strict(model, weights_file, config["architecture"], device=map_location)
    model.eval()
    return model


def writable_folder_error(folder: str | os.PathLike) -> str | None:
    """Create ``folder`` and a scratch file in it; None if that worked, else why not (for a one-line error)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return str(e.strerror or e)
    return None


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
