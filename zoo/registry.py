"""Model registry, weights table and the one loading path.

Names follow timm: ``family_size`` names an architecture (a registered builder) and ``family_size.tag`` names
weights for it (every one of them is in ``zoo/weights_table.py``). ``create_model`` builds an architecture; ``load``
builds and fills it from weights:

* a registered ``name.tag`` -> its directory (shipped under ``zoo/weights/``; the recorded sha256 of
  ``model.safetensors`` is checked before anything is read);
* a directory written by ``save_pretrained`` (``config.json`` with ``architecture`` + ``model_args``, and
  ``model.safetensors``) -> the registered builder -> a strict load (``zoo.checkpoint``);
* anything else (an official release directory, a DiT ``.pt``) -> the converter table (``zoo.convert``), which asks
  each registered converter whether it recognises the layout. This module names no family and no converter;
* a registered ``name.official`` (a hub id, no local file) -> ``huggingface_hub`` fetches the release into its cache
  (``HF_HOME`` / ``HF_HUB_CACHE``; with ``HF_HUB_OFFLINE=1`` only the cache is read), the converter table converts
  it once, and the converted directory is cached under ``$MMZOO_CACHE`` (default ``$HF_HOME/mmzoo``) by release
  commit, so later loads read it directly. Tests and the default job never reach the network.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a model is built, so `zoo list` and name checks stay fast
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
    "fetch_official",
    "converted_cache_dir",
    "parse_dtype",
]

SHIPPED_WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True, kw_only=True)
class WeightsCfg:
    """Where a set of weights lives, how it was made and what it scored."""

    file: str | None = None  # a directory under zoo/weights/ (shipped) or an absolute path
    hf_hub_id: str | None = None  # for officially released weights; fetched on first zoo.load, never in tests
    filename: str | None = None  # one file of the hub repository (a DiT .pt); None: the whole repository
    revision: str | None = None  # the hub branch, tag or commit the entry means (None: the repository's main)
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
    import zoo.models  # the families register into this module: cycle zoo.registry <-> zoo.models

    zoo.models.import_families()
    import zoo.weights_table  # noqa: F401  (registers every weights name; cycle zoo.registry <-> zoo.weights_table)


def list_models(pattern: str = "*") -> list[str]:
    _ensure_registered()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def _ensure_weights_registered() -> None:
    # Every weights name is in zoo/weights_table.py, which imports neither torch nor a family: listing and
    # checking names stays fast. Lazy for the same cycle as above (zoo.registry <-> zoo.weights_table).
    import zoo.weights_table  # noqa: F401


def list_pretrained(pattern: str = "*") -> list[str]:
    _ensure_weights_registered()
    return sorted(n for n in _WEIGHTS if fnmatch.fnmatch(n, pattern))


def get_weights_cfg(name: str) -> WeightsCfg:
    _ensure_weights_registered()
    if name not in _WEIGHTS:
        raise KeyError(f"no weights named {name!r}; known: {', '.join(list_pretrained()) or 'none'}")
    return _WEIGHTS[name]


def default_weights(arch: str) -> str | None:
    """The default weights of an architecture, as timm's default tag: its first entry in zoo/weights_table.py."""
    _ensure_weights_registered()
    return next((n for n in _WEIGHTS if n.rpartition(".")[0] == arch), None)


def create_model(name: str, pretrained: bool = False, **model_args: Any) -> nn.Module:
    """Build a registered architecture; ``pretrained=True`` loads ``name`` if it is ``arch.tag``, else the
    architecture's default weights (its first entry in the weights table, as timm picks a default tag)."""
    _ensure_registered()
    if pretrained and name not in _WEIGHTS and name in _MODELS:
        tag = default_weights(name)
        if tag is None:
            raise KeyError(f"architecture {name!r} has no registered weights; see `zoo list --pretrained`")
        name = tag
    if pretrained or name in _WEIGHTS:
        return load(name, **model_args)
    if name not in _MODELS:
        close = fnmatch.filter(_MODELS, f"*{name.split('_')[0]}*")
        hint = f" Similar: {', '.join(sorted(close))}." if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} See `zoo list`.")
    return _MODELS[name].builder(**model_args)


def resolve_weights_dir(cfg: WeightsCfg, name: str) -> Path:
    """The local directory of a shipped (or absolute-path) weights entry; a hub entry goes through fetch_official."""
    if cfg.file is None:
        raise FileNotFoundError(
            f"weights {name!r} live on the hub ({cfg.hf_hub_id}), not on disk; zoo.load({name!r}) or "
            "zoo.registry.fetch_official fetches and converts them"
        )
    path = Path(cfg.file)
    return path if path.is_absolute() else SHIPPED_WEIGHTS_DIR / path


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_home() -> Path:
    # Read at call time (huggingface_hub reads its constants once, at import), so a changed HF_HOME takes effect.
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(os.environ.get("HF_HOME") or default)


def converted_cache_dir() -> Path:
    """Where converted official releases are kept: ``$MMZOO_CACHE``, else ``$HF_HOME/mmzoo``."""
    return Path(os.environ.get("MMZOO_CACHE") or _hf_home() / "mmzoo")


def fetch_official(name: str, revision: str | None = None, **options: Any) -> Path:
    """The converted mmzoo directory of hub weights ``name``: fetched and converted on first use, then cached.

    ``huggingface_hub`` does the fetching (its cache, ``HF_HOME`` / ``HF_HUB_CACHE``, progress bars and revisions);
    ``HF_HUB_OFFLINE=1`` reads only that cache. ``revision`` (branch, tag or commit) overrides the entry's own.
    ``options`` go to the converter (e.g. ``vision_weights=`` for a MoE-LLaVA release without its tower) and are
    part of the cache key, so different options never share a converted directory.
    """
    import hashlib

    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from tqdm.auto import tqdm

    cfg = get_weights_cfg(name)
    if cfg.hf_hub_id is None:
        raise ValueError(f"weights {name!r} are not a hub release (no hf_hub_id in zoo/weights_table.py)")
    offline = _env_flag("HF_HUB_OFFLINE")
    hub_cache = os.environ.get("HF_HUB_CACHE") or str(_hf_home() / "hub")
    revision = revision or cfg.revision

    def converted(commit: str) -> Path:
        # Keyed by the release commit (a new commit on the hub gets a new directory) and the converter options.
        digest = hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return converted_cache_dir() / "converted" / name / (f"{commit}-{digest}" if options else commit)

    known = _cached_commit(Path(hub_cache), cfg.hf_hub_id, revision)
    if offline and known and is_zoo_checkpoint(converted(known)):
        return converted(known)  # converted before: the release files themselves are no longer needed
    where = dict(repo_id=cfg.hf_hub_id, revision=revision, cache_dir=hub_cache, local_files_only=offline)
    try:
        src = Path(hf_hub_download(filename=cfg.filename, **where) if cfg.filename else snapshot_download(**where))
    except LocalEntryNotFoundError as e:
        mode = "HF_HUB_OFFLINE is set and " if offline else "the hub is unreachable and "
        raise FileNotFoundError(
            f"weights {name!r}: {mode}{cfg.hf_hub_id}"
            f"{'/' + cfg.filename if cfg.filename else ''} (revision {revision or 'main'}) is not in the "
            f"hub cache {hub_cache}; run once with network access, or point HF_HOME at a cache that holds it ({e})"
        ) from None
    parts = src.parts  # huggingface_hub's snapshots/<commit>/<file in the repository>
    out = converted(parts[parts.index("snapshots") + 1] if "snapshots" in parts else src.name)
    if is_zoo_checkpoint(out):
        return out
    # Lazy import: the converter table imports model families, which import this module (a cycle).
    from zoo.convert import convert

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        with tqdm(total=1, desc=f"converting {name} (first use)", unit="release") as bar:
            convert(src, tmp, **options)
            bar.update(1)
        os.replace(tmp, out)  # readers see the whole converted directory or none of it
        print(f"{name}: converted release cached in {out}", file=sys.stderr)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def weights_availability(name: str) -> str:
    """One line for `zoo list --pretrained`: shipped, converted / fetched into the local caches, or hub-only."""
    cfg = get_weights_cfg(name)
    if cfg.file is not None:
        return "offline: shipped with mmzoo"
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub")
    commit = _cached_commit(hub_cache, cfg.hf_hub_id or "", cfg.revision)
    converted = converted_cache_dir() / "converted" / name
    if commit and any(is_zoo_checkpoint(p) for p in converted.glob(f"{commit}*")):
        return f"offline: converted in {converted}"
    if commit:
        return f"offline: in the hub cache ({cfg.hf_hub_id}), converted on first load"
    return f"hub: {cfg.hf_hub_id}{'/' + cfg.filename if cfg.filename else ''} (downloaded on first load)"


def _cached_commit(hub_cache: Path, repo_id: str, revision: str | None) -> str | None:
    """The commit a revision names in a huggingface_hub cache (refs/<branch or tag>), without asking the hub."""
    if revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    ref = hub_cache / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def resolve_weights(name: str, revision: str | None = None, **options: Any) -> Path:
    """The local directory of registered weights ``name``: a shipped one with its recorded sha256 checked, or a
    hub release fetched and converted on first use (:func:`fetch_official`; ``revision`` and ``options`` apply)."""
    cfg = get_weights_cfg(name)
    if cfg.file is None:
        return fetch_official(name, revision, **options)
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


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16`` (None stays None)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[dtype])


def load(
    name_or_path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a model and load its weights strictly, from a weights name, an mmzoo directory or a released layout.

    For an mmzoo directory ``overrides`` replace entries of its ``model_args``; for a released layout (or a hub
    release, fetched and converted on first use; ``revision`` picks its branch, tag or commit) they are the
    converter's options (e.g. ``vision_weights=`` for an official MoE-LLaVA release without its tower).
    ``device`` / ``dtype`` (``"cuda"``, ``"bf16"``...) move the loaded model, as ``model.to`` would.
    """
    model = _load(name_or_path, map_location, revision, overrides)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=parse_dtype(dtype))
    return model


def _load(name_or_path: str | os.PathLike, map_location: Any, revision: str | None, overrides: dict) -> nn.Module:
    _ensure_registered()
    path = Path(name_or_path)
    if not path.exists():
        if get_weights_cfg(str(name_or_path)).file is None:  # a hub release: the overrides are converter options
            path, overrides = fetch_official(str(name_or_path), revision, **overrides), {}
        else:
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
