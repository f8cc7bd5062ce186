"""Routing heatmaps from synthetic counts: one panel per layer with the right axes, PNGs written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from eval.generation.plots import (
    normalise,
    position_maps_figure,
    routing_heatmap_figure,
    save_all_routing_plots,
)
from eval.generation.routing import RoutingCounts


def _counts(
    layers: int = 3, steps: int = 7, experts: int = 4, grid: int = 3, classes: int = 5
) -> RoutingCounts:
    rng = np.random.default_rng(0)
    return RoutingCounts(
        by_step=rng.integers(0, 50, (layers, steps, experts)),
        by_position=rng.integers(0, 50, (layers, grid * grid, experts)),
        by_class=rng.integers(0, 50, (layers, classes, experts)),
        grid=(grid, grid),
        top_k=2,
        num_images=10,
    )


def test_heatmap_panels_axes_and_colorbar() -> None:
    c = _counts(layers=7)
    fig = routing_heatmap_figure(c.by_step, ylabel="sampling step", title="t", ncols=6)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title().startswith("MoE layer")]
    assert [ax.get_title() for ax in panels] == [f"MoE layer {i}" for i in range(7)]
    assert all(ax.get_images()[0].get_array().shape == (7, 4) for ax in panels)
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["0", "1", "2", "3"]
    assert panels[0].get_ylabel() == "sampling step" and panels[6].get_ylabel() == "sampling step"
    assert panels[6].get_xlabel() == "expert"
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and "min-max" in colorbars[0].get_ylabel()
    assert fig.get_suptitle() == "t"


def test_normalisations() -> None:
    c = np.array([[[1, 3], [2, 2]], [[0, 0], [5, 5]]])
    mm = normalise(c, "minmax")
    assert mm[0].min() == 0 and mm[0].max() == 1 and np.allclose(mm[1], [[0, 0], [1, 1]])
    assert np.allclose(normalise(c, "share").sum(axis=2), 1.0 * (c.sum(axis=2) > 0))
    with pytest.raises(ValueError, match="not one of"):
        normalise(c, "zscore")


def test_save_all_routing_plots(tmp_path) -> None:
    c = _counts()
    paths = save_all_routing_plots(c, tmp_path, note=" (synthetic)")
    assert set(paths) == {"step", "position", "class", "position_maps"}
    for p in paths.values():
        img = Image.open(p)
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 100
    fig = position_maps_figure(c.by_position, c.grid)
    grids = [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]
    assert len(grids) == 3 * 4 and grids[0].get_images()[0].get_array().shape == (3, 3)


def test_counts_round_trip_and_bad_shapes(tmp_path) -> None:
    c = _counts()
    back = RoutingCounts.load(c.save(tmp_path / "routing.npz"))
    assert np.array_equal(back.by_position, c.by_position) and back.grid == (3, 3) and back.top_k == 2
    assert back.layer_names == ["MoE layer 0", "MoE layer 1", "MoE layer 2"]
    with pytest.raises(ValueError, match="disagree"):
        RoutingCounts(
            by_step=np.zeros((2, 3, 4)), by_position=np.zeros((3, 9, 4)), by_class=np.zeros((2, 5, 4))
        )
    with pytest.raises(ValueError, match="does not hold"):
        RoutingCounts(
            by_step=np.zeros((2, 3, 4)),
            by_position=np.zeros((2, 9, 4)),
            by_class=np.zeros((2, 5, 4)),
            grid=(2, 2),
        )
    with pytest.raises(ValueError, match=r"\(layers, rows, experts\)"):
        routing_heatmap_figure(np.zeros((3, 4)), ylabel="y", title="t")
