"""``zoo eval --routing``: which experts a MoE-LLaVA model's image tokens and text tokens use, per MoE layer.

The MoE-LLaVA paper's routing analysis (expert loading by modality) as a heatmap a person can look at: for every MoE
layer of the language model, the share of top-k choices that went to each expert, separately over image-token
positions and text-token positions of the benchmark prompts. It runs one prefill forward per batch of the evaluated
documents (the prompts as the benchmark builds them, with their images) and reads each MoE layer's ``last_stats``
(``zoo.moe.MoEStats``): nothing is hooked or patched. Generated answer tokens are not included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["routing_by_modality", "save_routing_by_modality", "write_routing_report"]


def routing_by_modality(model: Any, images: Sequence[Any], prompts: list[str]) -> dict[str, Any]:
    """Top-k choice counts ``[layers, experts]`` over image positions and over text positions of one batch."""
    import torch

    from zoo.moe.layer import MoE

    needed = ("build_generation_inputs", "image_mask", "llm")
    if not all(hasattr(model, n) for n in needed):
        raise TypeError(f"{type(model).__name__} is not a LLaVA-like model (needs {', '.join(needed)})")
    layers = [(n, m) for n, m in model.llm.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers: no routing to show")
    inputs = model.build_generation_inputs(images, prompts)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items() if v is not None}
    with torch.inference_mode():
        model(**inputs)
    real = inputs["attention_mask"].bool()
    image = (model.image_mask(inputs["input_ids"]) & real).reshape(-1)
    text = (~model.image_mask(inputs["input_ids"]) & real).reshape(-1)
    experts = layers[0][1].cfg.routed_experts
    counts = {"image": np.zeros((len(layers), experts), np.int64), "text": np.zeros((len(layers), experts), np.int64)}
    for i, (_, layer) in enumerate(layers):
        chosen = layer.last_stats.top_k_indices  # [tokens, k]: the MoE layer sees the batch flattened
        for kind, mask in (("image", image), ("text", text)):
            picked = chosen[mask.to(chosen.device)].reshape(-1)
            counts[kind][i] += torch.bincount(picked.cpu(), minlength=experts).numpy()
    return {"layers": [n for n, _ in layers], **counts}


def save_routing_by_modality(counts: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Two heatmaps side by side (image tokens | text tokens): rows are MoE layers, columns experts, colour the
    share of that layer's choices (rows sum to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zoo.registry import atomic_write

    layers = counts["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 0.5 * counts["image"].shape[1] * 2, 1.5 + 0.35 * len(layers)),
                             constrained_layout=True, squeeze=False)  # fmt: skip
    im = None
    for ax, kind in zip(axes[0], ("image", "text"), strict=True):
        c = np.asarray(counts[kind], dtype=float)
        share = c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)
        im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_title(f"{kind} tokens ({int(c.sum(axis=1).max()) if c.size else 0} choices/layer)", fontsize=10)
        ax.set_xticks(range(c.shape[1]))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([n.removesuffix(".mlp").split("layers.")[-1] for n in layers], fontsize=7)
        ax.set_ylabel("MoE layer")
        for (r, e), v in np.ndenumerate(share):
            ax.text(e, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, label="share of choices")
    fig.suptitle(title or "expert routing by token modality", fontsize=11)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def write_routing_report(model: Any, tasks: Any, out_dir: str | os.PathLike, *, limit: int | None = None,
                         batch_size: int = 8, load_kwargs: Mapping[str, Any] | None = None,
                         model_name: str | None = None) -> Path:  # fmt: skip
    """Routing counts over the first ``limit`` (default 64) documents of each task -> ``routing.json`` and
    ``routing.png`` in ``out_dir``; returns the PNG's path."""
    from eval.models import resolve_model
    from eval.registry import PROMPTS, READERS, expand_tasks, resolve_files

    obj, name = resolve_model(model, **dict(load_kwargs or {})) if isinstance(model, str | os.PathLike) else (
        model, type(model).__name__)  # fmt: skip
    name = model_name or name
    specs = tasks if isinstance(tasks, list) else expand_tasks(tasks)
    total: dict[str, Any] | None = None
    n = limit or 64
    for spec in specs:
        reader = READERS[spec.reader]
        docs = reader(spec, resolve_files(spec, None, None))[:n]
        for start in range(0, len(docs), batch_size):
            batch = docs[start : start + batch_size]
            images = [d.load_media().get("image", [None])[0] for d in batch]
            counts = routing_by_modality(obj, images, [PROMPTS[spec.prompt](d, spec) for d in batch])
            if total is None:
                total = counts
            else:
                total["image"] += counts["image"]
                total["text"] += counts["text"]
    if total is None:
        raise ValueError("no documents to route")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from zoo.registry import atomic_write

    payload = {"model": name, "tasks": [s.name for s in specs], "documents_per_task": n, "layers": total["layers"],
               "image": total["image"].tolist(), "text": total["text"].tolist()}  # fmt: skip
    atomic_write(out / "routing.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1) + "\n"))
    return save_routing_by_modality(total, out / "routing.png", title=f"{name}: expert routing by token modality")
