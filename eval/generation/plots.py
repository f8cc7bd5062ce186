"""Expert-specialisation heatmaps as in DiT-MoE Figs. 5-7, from plain (layer, row, expert) count arrays.

One panel per MoE layer (``MoE layer i``), x = expert id, y = denoising step / patch position / class, and one
shared colour bar. Normalisations: ``"minmax"`` per layer (the paper's choice for steps and positions),
``"share"`` (each row divided by its total: the fraction of that row's top-k choices that went to each expert;
uniform routing is 1/E) and ``"counts"`` (raw, the paper's choice for classes). :func:`plot_position_maps` adds
the view a reader of the patch grid wants: for each layer and expert, the share of choices at every patch,
laid out on the image's patch grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from eval.generation.routing import RoutingCounts  # noqa: E402
from zoo.registry import atomic_write  # noqa: E402

__all__ = [
    "NORMALISATIONS",
    "routing_heatmap_figure",
    "save_routing_heatmaps",
    "plot_routing_by_step",
    "plot_routing_by_position",
    "plot_routing_by_class",
    "position_maps_figure",
    "plot_position_maps",
    "save_all_routing_plots",
]

NORMALISATIONS = ("minmax", "share", "counts")
_CBAR_LABEL = {
    "minmax": "choices, min-max normalised per layer",
    "share": "share of the row's top-k choices",
    "counts": "number of top-k choices",
}


def normalise(counts: np.ndarray, how: str) -> np.ndarray:
    """Normalise a (layers, rows, experts) table per layer (``minmax``) or per row (``share``)."""
    c = np.asarray(counts, dtype=np.float64)
    if how == "counts":
        return c
    if how == "share":
        tot = c.sum(axis=2, keepdims=True)
        return np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)
    if how == "minmax":
        lo = c.min(axis=(1, 2), keepdims=True)
        span = c.max(axis=(1, 2), keepdims=True) - lo
        return np.divide(c - lo, span, out=np.zeros_like(c), where=span > 0)
    raise ValueError(f"normalisation {how!r} is not one of {NORMALISATIONS}")


def _check(counts: np.ndarray, layer_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    c = np.asarray(counts)
    if c.ndim != 3:
        raise ValueError(f"counts must be (layers, rows, experts); got shape {c.shape}")
    if c.shape[0] == 0 or c.shape[1] == 0 or c.shape[2] == 0:
        raise ValueError(f"counts table is empty: shape {c.shape}")
    names = list(layer_names) if layer_names else [f"MoE layer {i}" for i in range(c.shape[0])]
    if len(names) != c.shape[0]:
        raise ValueError(f"{len(names)} layer names for {c.shape[0]} layers")
    return c, names


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return path


def routing_heatmap_figure(
    counts: np.ndarray,
    *,
    ylabel: str,
    title: str,
    normalisation: str = "minmax",
    cmap: str = "Blues",
    layer_names: Sequence[str] | None = None,
    ytick_labels: Sequence[str] | None = None,
    ncols: int = 6,
) -> Figure:
    """One heatmap per layer (rows x experts) with a shared colour bar; returns the matplotlib figure."""
    c, names = _check(counts, layer_names)
    data = normalise(c, normalisation)
    n_layers, n_rows, n_exp = data.shape
    ncols = min(ncols, n_layers)
    nrows = math.ceil(n_layers / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(1.0 + 0.3 * max(n_exp, 6) * ncols, 0.6 + 3.2 * nrows),
        squeeze=False,
        constrained_layout=True,
    )
    vmin, vmax = float(data.min()), float(data.max())
    if vmax <= vmin:
        vmax = vmin + 1.0
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= n_layers:
            ax.set_visible(False)
            continue
        im = ax.imshow(data[i], aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(names[i], fontsize=10)
        ax.set_xticks(range(n_exp))
        ax.set_xticklabels([str(e) for e in range(n_exp)], fontsize=7)
        if i // ncols == nrows - 1 or i + ncols >= n_layers:
            ax.set_xlabel("expert")
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
        if ytick_labels is not None:
            step = max(1, math.ceil(n_rows / 12))
            ax.set_yticks(range(0, n_rows, step))
            ax.set_yticklabels([ytick_labels[j] for j in range(0, n_rows, step)], fontsize=7)
        elif i % ncols:
            ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=12)
    cbar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, pad=0.01)
    label = _CBAR_LABEL[normalisation]
    if normalisation == "share":
        label += f" (uniform = {1 / n_exp:.3f})"
    cbar.set_label(label)
    return fig


def save_routing_heatmaps(counts: np.ndarray, path: str | os.PathLike, *, dpi: int = 110, **kwargs) -> Path:
    return _save(routing_heatmap_figure(counts, **kwargs), path, dpi)


def plot_routing_by_step(
    by_step: np.ndarray,
    path: str | os.PathLike,
    *,
    layer_names: Sequence[str] | None = None,
    normalisation: str = "minmax",
    note: str = "",
) -> Path:
    """Fig. 7: expert choice by denoising step (0 = the first, noisiest step), Blues."""
    return save_routing_heatmaps(
        by_step,
        path,
        ylabel="sampling step (0 = noisiest)",
        cmap="Blues",
        normalisation=normalisation,
        layer_names=layer_names,
        title=f"Expert selection by denoising step{note}",
    )


def plot_routing_by_position(
    by_position: np.ndarray,
    path: str | os.PathLike,
    *,
    layer_names: Sequence[str] | None = None,
    normalisation: str = "minmax",
    note: str = "",
) -> Path:
    """Fig. 6: expert choice by patch position (row-major over the patch grid), Greens."""
    return save_routing_heatmaps(
        by_position,
        path,
        ylabel="patch position (row-major)",
        cmap="Greens",
        normalisation=normalisation,
        layer_names=layer_names,
        title=f"Expert selection by spatial position{note}",
    )


def plot_routing_by_class(
    by_class: np.ndarray,
    path: str | os.PathLike,
    *,
    layer_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    normalisation: str = "share",
    note: str = "",
) -> Path:
    """Fig. 5: expert choice by conditioning class, Oranges. Default ``share`` so unequal class counts compare."""
    n_classes = np.shape(by_class)[1]
    return save_routing_heatmaps(
        by_class,
        path,
        ylabel="class",
        cmap="Oranges",
        normalisation=normalisation,
        layer_names=layer_names,
        ytick_labels=list(class_names) if class_names is not None else [str(c) for c in range(n_classes)],
        title=f"Expert selection by class{note}",
    )


def position_maps_figure(
    by_position: np.ndarray,
    grid: tuple[int, int],
    *,
    layer_names: Sequence[str] | None = None,
    title: str = "Share of each patch's top-k choices per expert",
) -> Figure:
    """Rows = layers, columns = experts; each panel is the patch grid coloured by that expert's share."""
    c, names = _check(by_position, layer_names)
    h, w = grid
    if h * w != c.shape[1]:
        raise ValueError(f"grid {grid} does not hold {c.shape[1]} positions")
    share = normalise(c, "share")
    n_layers, _, n_exp = share.shape
    fig, axes = plt.subplots(
        n_layers,
        n_exp,
        figsize=(1.2 + 1.3 * n_exp, 0.8 + 1.3 * n_layers),
        squeeze=False,
        constrained_layout=True,
    )
    vmax = max(float(share.max()), 1e-12)
    im = None
    for li in range(n_layers):
        for e in range(n_exp):
            ax = axes[li, e]
            im = ax.imshow(
                share[li, :, e].reshape(h, w), cmap="Greens", vmin=0.0, vmax=vmax, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if li == 0:
                ax.set_title(f"expert {e}", fontsize=9)
            if e == 0:
                ax.set_ylabel(names[li], fontsize=9)
    fig.suptitle(f"{title} (uniform = {1 / n_exp:.3f})", fontsize=11)
    cbar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, pad=0.01)
    cbar.set_label("share of the patch's top-k choices")
    return fig


def plot_position_maps(
    by_position: np.ndarray,
    grid: tuple[int, int],
    path: str | os.PathLike,
    *,
    layer_names: Sequence[str] | None = None,
    dpi: int = 110,
) -> Path:
    return _save(position_maps_figure(by_position, grid, layer_names=layer_names), path, dpi)


def save_all_routing_plots(
    counts: RoutingCounts, out_dir: str | os.PathLike, note: str = ""
) -> dict[str, Path]:
    """The paper's three figures plus the patch-grid maps, as ``routing_{step,position,class,position_maps}.png``."""
    out = Path(out_dir)
    names = counts.layer_names
    paths = {
        "step": plot_routing_by_step(counts.by_step, out / "routing_step.png", layer_names=names, note=note),
        "position": plot_routing_by_position(
            counts.by_position, out / "routing_position.png", layer_names=names, note=note
        ),
        "class": plot_routing_by_class(
            counts.by_class, out / "routing_class.png", layer_names=names, note=note
        ),
    }
    if counts.grid != (0, 0):
        paths["position_maps"] = plot_position_maps(
            counts.by_position, counts.grid, out / "routing_position_maps.png", layer_names=names
        )
    return paths
