"""Strict state-dict loading with one readable error, used wherever mmzoo loads weights into a model.

Every loader (``zoo.load``, the converters, a recipe stage starting from an earlier stage, the DiT ``.pt`` reader)
calls :func:`load_state_dict_strict` or :func:`load_file_strict`. Keys and shapes are compared before anything is
copied, so a mismatch never leaves a half-filled model, and the error names the file, the architecture and, for
missing, unexpected and shape-mismatched keys, how many there are and the first few of each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointMismatchError",
    "UnreadableWeightsError",
    "load_state_dict_strict",
    "load_file_strict",
    "read_safetensors",
    "torch_load_safely",
    "sha256_file",
]

SHOWN_KEYS = 8  # how many keys of each kind the error lists; the counts are always complete


class CheckpointMismatchError(ValueError):
    """A state dict whose keys or shapes differ from the model's."""


class UnreadableWeightsError(ValueError):
    """A weights file that cannot be read safely: truncated, empty, not that format, or a pickle holding code."""


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` with an error that names the file when it is truncated, empty or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        size = Path(path).stat().st_size
        raise UnreadableWeightsError(
            f"{path}: not a readable safetensors file ({size} bytes: {e}); it is probably truncated or empty: "
            "export, convert or copy it again"
        ) from None


def torch_load_safely(path: str | os.PathLike, *, mmap: bool = False, allow: tuple[type, ...] = ()) -> object:
    """``torch.load`` with ``weights_only=True`` (plus the classes in ``allow``); refusals name the file.

    A file that needs other classes is refused, never loaded with the safe unpickler switched off: unpickling
    arbitrary classes can run code.
    """
    import pickle

    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = str(e).split("Please file an issue")[0]
        wanted = [line.strip() for line in detail.splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise UnreadableWeightsError(
            f"{path}: refused: the file holds Python objects other than tensors and plain containers "
            f"({'; '.join(wanted)[:300] or 'not a weights-only pickle'}); mmzoo reads only weights-only "
            "checkpoints, since unpickling other objects can run code. Re-save the state dict alone "
            "(torch.save(model.state_dict(), path)) where the file was made"
        ) from None


def _tied_aliases(model: nn.Module) -> dict[str, set[str]]:
    """name -> every other state-dict name of the same tensor (tied weights are stored once by safetensors)."""
    by_tensor: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: set(names) - {name} for names in by_tensor.values() for name in names if len(names) > 1}


def _listing(what: str, keys: list[str]) -> str:
    more = f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} {what} [{', '.join(keys[:SHOWN_KEYS])}{more}]"


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str | os.PathLike,
    architecture: str | None = None,
) -> nn.Module:
    """Load ``state_dict`` into ``model`` only if keys and shapes match exactly; raise CheckpointMismatchError if not.

    A tied tensor may appear under any one of its names. A model built on the meta device receives the checkpoint's
    tensors themselves (``assign``), so full-size models are never allocated twice.
    """
    own = model.state_dict()
    aliases = _tied_aliases(model)
    missing = sorted(k for k in own if k not in state_dict and not (aliases.get(k, set()) & state_dict.keys()))
    unexpected = sorted(k for k in state_dict if k not in own)
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state_dict.keys())
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        arch = architecture or type(model).__name__
        raise CheckpointMismatchError(
            f"{source}: checkpoint does not match {arch}: {_listing('missing keys', missing)}; "
            f"{_listing('unexpected keys', unexpected)}; {_listing('shape mismatches', shapes)}"
        )
    on_meta = any(t.is_meta for t in own.values())
    model.load_state_dict(state_dict, strict=False, assign=on_meta)
    return model


def load_file_strict(
    model: nn.Module,
    path: str | os.PathLike,
    architecture: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """:func:`load_state_dict_strict` from a ``.safetensors`` file (read onto ``device``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    return load_state_dict_strict(model, read_safetensors(path, device), path, architecture)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
