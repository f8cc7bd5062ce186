"""Expert-selection counts recorded while a DiT-MoE samples (the data behind the DiT-MoE paper's Figs. 5-7).

The paper (../shared/reference/dit_moe.md Sec. 7) records every MoE call's top-k experts during sampling, keeps
only the conditional half of the classifier-free-guidance batch, counts *both* top-k choices, and aggregates by
(layer, denoising step), (layer, patch position) and (layer, class). :class:`RoutingCounts` holds those three
count tables as plain integer arrays so the plots (``eval.generation.plots``) can be tested without a model;
:class:`RoutingCollector` fills them from the MoE core's ``last_stats`` through the sampler's per-step callback
(``zoo.diffusion.sample(..., callback=collector)``), so nothing is patched or hooked into the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zoo.registry import atomic_write

__all__ = ["BatchRouting", "RoutingCounts", "RoutingCollector", "counts_from_images", "sample_with_routing"]


@dataclass(kw_only=True)
class RoutingCounts:
    """Expert-choice counts; every table is (layers, rows, experts), int64.

    ``by_step[l, s, e]``: choices of expert e in MoE layer l at sampling step s (0 = noisiest).
    ``by_position[l, p, e]``: ... at patch position p (row-major over the ``grid`` of patches).
    ``by_class[l, c, e]``: ... over images conditioned on class c.
    """

    by_step: np.ndarray
    by_position: np.ndarray
    by_class: np.ndarray
    layer_names: list[str] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)
    top_k: int = 0
    num_images: int = 0

    def __post_init__(self) -> None:
        tables = {"by_step": self.by_step, "by_position": self.by_position, "by_class": self.by_class}
        shapes = {k: np.shape(v) for k, v in tables.items()}
        if any(len(s) != 3 for s in shapes.values()):
            raise ValueError(f"routing count tables must be 3-d (layers, rows, experts); got {shapes}")
        if len({(s[0], s[2]) for s in shapes.values()}) != 1:
            raise ValueError(f"routing count tables disagree on (layers, experts): {shapes}")
        if self.grid != (0, 0) and self.grid[0] * self.grid[1] != shapes["by_position"][1]:
            raise ValueError(f"grid {self.grid} does not hold {shapes['by_position'][1]} positions")
        if not self.layer_names:
            self.layer_names = [f"MoE layer {i}" for i in range(shapes["by_step"][0])]
        elif len(self.layer_names) != shapes["by_step"][0]:
            raise ValueError(f"{len(self.layer_names)} layer names for {shapes['by_step'][0]} layers")

    @property
    def num_layers(self) -> int:
        return self.by_step.shape[0]

    @property
    def num_experts(self) -> int:
        return self.by_step.shape[2]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(
                    f,
                    by_step=self.by_step,
                    by_position=self.by_position,
                    by_class=self.by_class,
                    layer_names=np.array(self.layer_names),
                    grid=np.array(self.grid),
                    top_k=np.array(self.top_k),
                    num_images=np.array(self.num_images),
                )

        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingCounts:
        with np.load(path) as z:
            missing = {"by_step", "by_position", "by_class"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a routing-counts file; missing arrays {sorted(missing)}")
            return cls(
                by_step=z["by_step"],
                by_position=z["by_position"],
                by_class=z["by_class"],
                layer_names=[str(s) for s in z["layer_names"]] if "layer_names" in z.files else [],
                grid=tuple(int(v) for v in z["grid"]) if "grid" in z.files else (0, 0),
                top_k=int(z["top_k"]) if "top_k" in z.files else 0,
                num_images=int(z["num_images"]) if "num_images" in z.files else 0,
            )


@dataclass
class BatchRouting:
    """Per-image routing of one sampling batch: ``by_step`` (B, layers, steps, experts), ``by_position``
    (B, layers, positions, experts), int64, and the batch's labels (B,)."""

    by_step: np.ndarray
    by_position: np.ndarray
    labels: np.ndarray


def counts_from_images(
    per_image: list[tuple[np.ndarray, np.ndarray, int]],
    num_classes: int,
    *,
    layer_names: list[str] | None = None,
    grid: tuple[int, int] = (0, 0),
    top_k: int = 0,
) -> RoutingCounts:
    """Sum per-image ``(by_step [L, S, E], by_position [L, P, E], label)`` into a :class:`RoutingCounts`."""
    if not per_image:
        raise ValueError("no per-image routing records to sum")
    by_step = np.zeros_like(per_image[0][0], dtype=np.int64)
    by_position = np.zeros_like(per_image[0][1], dtype=np.int64)
    by_class = np.zeros((by_step.shape[0], num_classes, by_step.shape[2]), np.int64)
    for i, (st, pos, label) in enumerate(per_image):
        if st.shape != by_step.shape or pos.shape != by_position.shape:
            raise ValueError(
                f"routing record {i}: shapes {st.shape}, {pos.shape} differ from the first record's "
                f"{by_step.shape}, {by_position.shape} (same model and number of steps needed)"
            )
        if not 0 <= label < num_classes:
            raise ValueError(f"routing record {i}: label {label} outside [0, {num_classes})")
        by_step += st
        by_position += pos
        by_class[:, label] += pos.sum(axis=1)
    return RoutingCounts(
        by_step=by_step,
        by_position=by_position,
        by_class=by_class,
        layer_names=layer_names or [],
        grid=grid,
        top_k=top_k,
        num_images=len(per_image),
    )


class RoutingCollector:
    """Record the expert choices of every MoE layer of a DiT while it samples; pass it as the sampler callback.

    ``layers`` maps a name to an object with ``last_stats.top_k_indices`` ([B_fwd * N, k] after each forward, as
    the MoE core records). For each sampling batch call :meth:`begin` with its conditional labels, let the sampler
    call ``collector(step, t)`` after every model call, then :meth:`end` (per-image tables of the batch; they are
    also added to the running totals that :meth:`counts` returns). When the forward batch is the CFG pair
    [cond; null] (twice the labels), only the conditional half counts, as in the paper.
    """

    def __init__(
        self, layers: dict[str, Any], num_experts: int, num_classes: int, grid: tuple[int, int]
    ) -> None:
        if not layers:
            raise ValueError("no MoE layers to record: this model is dense (num_experts == 0)")
        self.layers = layers
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.grid = grid
        self.num_positions = grid[0] * grid[1]
        self.top_k = 0
        self._labels: Tensor | None = None
        self._steps: list[Tensor] = []  # per step of the current batch: (B, layers, experts)
        self._positions: Tensor | None = None  # (B, layers, positions, experts)
        # running totals over finished batches
        self._by_step: np.ndarray | None = None
        self._by_position = np.zeros((len(layers), self.num_positions, num_experts), np.int64)
        self._by_class = np.zeros((len(layers), num_classes, num_experts), np.int64)
        self._num_images = 0

    @classmethod
    def for_dit(cls, model: Any) -> RoutingCollector:
        """A collector over every MoE block of a ``zoo.models.dit.DiT``."""
        cfg = model.cfg
        layers = {f"MoE layer {i}": block.moe for i, block in enumerate(model.blocks) if block.is_moe}
        return cls(layers, cfg.num_experts, cfg.num_classes, (cfg.grid_size, cfg.grid_size))

    def begin(self, labels: Tensor) -> None:
        """Start a sampling batch conditioned on ``labels`` (B,)."""
        labels = torch.as_tensor(labels).long().reshape(-1).cpu()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got {labels.unique().tolist()}")
        self._labels = labels
        self._steps = []
        self._positions = torch.zeros(labels.numel(), len(self.layers), self.num_positions, self.num_experts,
                                      dtype=torch.long)  # fmt: skip

    def __call__(self, step: int, t: Any = None) -> None:
        if self._labels is None or self._positions is None:
            raise RuntimeError("RoutingCollector: call begin(labels) before sampling")
        b = self._labels.numel()
        if step != len(self._steps):
            raise RuntimeError(
                f"RoutingCollector: step {step} arrived after {len(self._steps)} recorded steps"
            )
        this_step = torch.zeros(b, len(self.layers), self.num_experts, dtype=torch.long)
        for li, (name, layer) in enumerate(self.layers.items()):
            stats = getattr(layer, "last_stats", None)
            if stats is None:
                raise RuntimeError(f"{name}: no routing statistics after the forward (is it an MoE layer?)")
            idx = stats.top_k_indices.detach().cpu().long()  # (rows * N, k), row-major over (image, patch)
            rows, rem = divmod(idx.shape[0], self.num_positions)
            if rem or rows not in (b, 2 * b):
                raise ValueError(
                    f"{name}: {idx.shape[0]} routed tokens do not split into {b} (or {2 * b} with guidance) "
                    f"images of {self.num_positions} patches"
                )
            self.top_k = idx.shape[1]
            # rows = [cond; null] under guidance: keep the conditional images only (the paper's convention)
            idx = idx.reshape(rows, self.num_positions, self.top_k)[:b]
            onehot = torch.nn.functional.one_hot(idx, self.num_experts).sum(dim=2)  # (B, N, E), both choices
            this_step[:, li] = onehot.sum(dim=1)
            self._positions[:, li] += onehot
        self._steps.append(this_step)

    def end(self) -> BatchRouting:
        """Finish the batch: its per-image tables (also added to the running totals)."""
        if self._labels is None or self._positions is None:
            raise RuntimeError("RoutingCollector: end() without begin()")
        if not self._steps:
            raise RuntimeError(
                "RoutingCollector: no sampling step was recorded (was it passed as the callback?)"
            )
        batch = BatchRouting(
            by_step=torch.stack(self._steps, dim=2).numpy(),
            by_position=self._positions.numpy(),
            labels=self._labels.numpy(),
        )
        step_total = batch.by_step.sum(axis=0)
        if self._by_step is None:
            self._by_step = step_total
        elif self._by_step.shape != step_total.shape:
            raise ValueError(
                f"batch sampled with {step_total.shape[1]} steps, earlier batches with {self._by_step.shape[1]}"
            )
        else:
            self._by_step += step_total
        self._by_position += batch.by_position.sum(axis=0)
        for label, pos in zip(batch.labels, batch.by_position):
            self._by_class[:, label] += pos.sum(axis=1)
        self._num_images += len(batch.labels)
        self._labels, self._positions, self._steps = None, None, []
        return batch

    def counts(self) -> RoutingCounts:
        """Totals over every finished batch."""
        if self._by_step is None:
            raise RuntimeError("RoutingCollector: no finished batch (call begin / sample / end first)")
        return RoutingCounts(
            by_step=self._by_step.copy(),
            by_position=self._by_position.copy(),
            by_class=self._by_class.copy(),
            layer_names=list(self.layers),
            grid=self.grid,
            top_k=self.top_k,
            num_images=self._num_images,
        )


@torch.no_grad()
def sample_with_routing(
    model: Any,
    class_labels: Tensor,
    *,
    num_steps: int,
    cfg_scale: float,
    generator: torch.Generator | None = None,
    batch_size: int = 100,
    collector: RoutingCollector | None = None,
) -> tuple[Tensor, RoutingCounts]:
    """Sample a DiT-MoE for ``class_labels`` in batches and record its routing; returns (images, counts)."""
    from zoo.diffusion import sample

    collector = collector or RoutingCollector.for_dit(model)
    out = []
    for labels in torch.as_tensor(class_labels).long().split(batch_size):
        collector.begin(labels)
        out.append(sample(model, labels, num_steps=num_steps, cfg_scale=cfg_scale, generator=generator,
                          callback=collector))  # fmt: skip
        collector.end()
    return torch.cat(out), collector.counts()
