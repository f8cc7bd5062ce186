"""The shipped demo weights `dit_moe_tiny.digits`: load strictly and re-check the recorded scores (same seed,
sampler and evaluation code as the recipe's evaluate)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from zoo.models.dit import count_params
from zoo.recipe import load_recipe
from zoo.registry import get_weights_cfg
from zoo.stages.dit import evaluate_generator

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_dit_moe_tiny_digits_reproduces_its_recorded_scores() -> None:
    pytest.importorskip("eval.generation.digit_classifier")
    cfg = get_weights_cfg("dit_moe_tiny.digits")
    model = zoo.load("dit_moe_tiny.digits")
    assert model.cfg.num_experts == 8 and count_params(model) == (627_744, 332_832)
    torch.set_num_threads(1)  # the recorded numbers were computed with one thread (summation order)
    # The recipe that produced the weights also fixes how they are scored (seed, steps, guidance, sample count).
    stage = load_recipe(ROOT / cfg.recipe.split("@")[0]).stages[0]
    scores = evaluate_generator(model, stage.eval, stage.data, None)
    recorded = cfg.metrics
    assert scores["class_acc"] == pytest.approx(recorded["class_acc"], abs=1.0)
    assert scores["class_acc"] >= 90.0
    assert scores["fid_digits"] == pytest.approx(recorded["fid_digits"], rel=0.03)
