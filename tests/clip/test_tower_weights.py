"""The shipped tiny-CLIP tower ``clip_vit_tiny4.shapes`` loads by name, reproduces its recorded zero-shot scores,
and initialises the tiny MoE-LLaVA's tower exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NAME = "clip_vit_tiny4.shapes"


def _ship_tower():
    spec = importlib.util.spec_from_file_location("ship_tower", ROOT / "recipes" / "clip" / "ship_tower.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tower():
    import zoo
    import zoo.weights_table  # noqa: F401  (registers the name)

    return zoo.load(NAME)


def test_tower_is_registered_and_traceable():
    import zoo.weights_table  # noqa: F401
    from zoo.registry import get_weights_cfg

    cfg = get_weights_cfg(NAME)
    assert cfg.recipe.startswith("recipes/clip/shapes_tiny4_patch.yaml@") and len(cfg.recipe.split("@")[1]) == 40
    assert (ROOT / cfg.recipe.split("@")[0]).is_file()
    assert cfg.metrics["zeroshot_acc"] > 90 and cfg.metrics["demo200/zeroshot_acc"] > 90


def test_tower_reproduces_recorded_zero_shot_scores(tower):
    from zoo.registry import get_weights_cfg

    cfg = get_weights_cfg(NAME)
    scores = _ship_tower().demo_scores(tower)
    recorded = {k.removeprefix("demo200/"): v for k, v in cfg.metrics.items() if k.startswith("demo200/")}
    assert recorded.keys() == scores.keys()
    for key, value in recorded.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key


def test_tower_initialises_the_tiny_moe_llava_tower(tower, tmp_path):
    """A stage whose init_from names the weights gets exactly their image tower (what the default recipe does)."""
    from zoo.recipe import load_recipe
    from zoo.registry import resolve_weights
    from zoo.stages.moe_llava import MoELLaVAStage

    stage = next(s for s in load_recipe(ROOT / "recipes" / "moe_llava" / "shapes_tiny.yaml").stages if s.name == "align")
    module = MoELLaVAStage(stage.model, stage.data, stage.eval, stage)
    module.init_from(resolve_weights(NAME))
    mine = module.model.vision_tower.visual.state_dict()
    assert mine.keys() == tower.visual.state_dict().keys()
    for k, v in tower.visual.state_dict().items():
        torch.testing.assert_close(mine[k], v, rtol=0, atol=0, msg=k)
