"""RoutingCollector: counts from the MoE core's last_stats during real DiT-MoE sampling and from scripted stats."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import zoo
from eval.generation.routing import RoutingCollector, counts_from_images, sample_with_routing


class ScriptedLayer:
    """Stands in for an MoE layer: ``last_stats.top_k_indices`` set by the test before each 'forward'."""

    def __init__(self) -> None:
        self.last_stats = None

    def set(self, idx: torch.Tensor) -> None:
        self.last_stats = SimpleNamespace(top_k_indices=idx)


def test_collector_counts_conditional_half_by_step_position_class() -> None:
    layer = ScriptedLayer()
    col = RoutingCollector({"MoE layer 0": layer}, num_experts=3, num_classes=2, grid=(1, 2))
    col.begin(torch.tensor([1, 0]))
    # CFG batch [cond0, cond1, null0, null1] x 2 patches, top-2; the null half must be ignored
    step0 = torch.tensor([[0, 1], [0, 2],  [1, 2], [1, 0],  [2, 2], [2, 2],  [2, 2], [2, 2]])  # fmt: skip
    layer.set(step0)
    col(0, 999)
    step1 = torch.tensor([[0, 1], [0, 1], [2, 1], [2, 1]])  # without guidance: just the 2 images
    layer.set(step1)
    col(1, 500)
    batch = col.end()
    assert batch.by_step.shape == (2, 1, 2, 3) and batch.by_position.shape == (2, 1, 2, 3)
    # image 0 (label 1), step 0: patches [0,1],[0,2] -> expert counts [2,1,1]; step 1: [0,1],[0,1] -> [2,2,0]
    np.testing.assert_array_equal(batch.by_step[0, 0], [[2, 1, 1], [2, 2, 0]])
    np.testing.assert_array_equal(batch.by_position[0, 0], [[2, 2, 0], [2, 1, 1]])
    counts = col.counts()
    np.testing.assert_array_equal(counts.by_step[0], [[3, 3, 2], [2, 4, 2]])
    # class 0 is image 1: step0 [1,2],[1,0] -> [1,2,1]; step1 [2,1],[2,1] -> [0,2,2]
    np.testing.assert_array_equal(counts.by_class[0], [[1, 4, 3], [4, 3, 1]])
    assert counts.by_step.sum() == counts.by_position.sum() == counts.by_class.sum() == 2 * 2 * 2 * 2
    assert counts.top_k == 2 and counts.num_images == 2
    again = counts_from_images(
        [(batch.by_step[i], batch.by_position[i], int(batch.labels[i])) for i in range(2)], 2
    )
    np.testing.assert_array_equal(again.by_class, counts.by_class)


def test_collector_rejects_mismatched_tokens() -> None:
    layer = ScriptedLayer()
    col = RoutingCollector({"l": layer}, num_experts=2, num_classes=2, grid=(2, 2))
    col.begin(torch.tensor([0]))
    layer.set(torch.zeros(12, 2, dtype=torch.long))  # 3 images of 4 patches for a batch of 1
    with pytest.raises(ValueError, match="do not split into 1"):
        col(0)
    with pytest.raises(ValueError, match="dense"):
        RoutingCollector({}, num_experts=2, num_classes=2, grid=(2, 2))


def test_sample_with_routing_on_tiny_dit_moe() -> None:
    torch.manual_seed(0)
    model = zoo.create_model("dit_tiny", num_experts=4, hidden_size=32, depth=3, num_heads=2, moe_every=1)
    labels = torch.tensor([0, 3, 3, 9, 1])
    images, counts = sample_with_routing(
        model, labels, num_steps=3, cfg_scale=1.5, generator=torch.Generator().manual_seed(0), batch_size=2
    )
    n_layers, grid = 3, model.cfg.grid_size
    assert images.shape == (5, 1, 16, 16)
    assert counts.by_step.shape == (n_layers, 3, 4)
    assert counts.by_position.shape == (n_layers, grid * grid, 4)
    per_layer = 5 * grid * grid * 2  # images x patches x top-2
    assert (counts.by_step.sum(axis=(1, 2)) == 3 * per_layer).all()
    assert (counts.by_position.sum(axis=(1, 2)) == 3 * per_layer).all()
    per_class = counts.by_class.sum(axis=(0, 2))
    assert per_class.tolist() == [v * 3 * n_layers * grid * grid * 2 for v in [1, 1, 0, 2, 0, 0, 0, 0, 0, 1]]
    # the images are those of model.sample with the same generator (the callback only reads statistics)
    plain = torch.cat([
        model.sample(chunk, num_steps=3, cfg_scale=1.5, generator=g)
        for g in [torch.Generator().manual_seed(0)]
        for chunk in labels.split(2)
    ])  # fmt: skip
    torch.testing.assert_close(images, plain)
