"""The shipped demo weights load by name, reproduce their recorded scores, and answer through `zoo chat`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from zoo.registry import get_weights_cfg

ROOT = Path(__file__).resolve().parents[2]
NAME = "moe_llava_tiny.shapes"


def _ship_demo():
    spec = importlib.util.spec_from_file_location("ship_demo", ROOT / "recipes" / "moe_llava" / "ship_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def demo():
    import zoo.weights_table  # noqa: F401  (registers the name until zoo.models imports it)

    return zoo.load(NAME)


def test_weights_are_registered_small_and_traceable():
    import zoo.weights_table  # noqa: F401

    cfg = get_weights_cfg(NAME)
    assert cfg.recipe.startswith("recipes/moe_llava/shapes_tiny.yaml@") and len(cfg.recipe.split("@")[1]) == 40
    files = list((zoo.registry.SHIPPED_WEIGHTS_DIR / cfg.file).iterdir())
    assert sum(f.stat().st_size for f in files) < 8 * 2**20
    assert {"shapes_vqa/accuracy", "shapes_pope/f1", "params_active_M", "params_total_M"} <= set(cfg.metrics)


def test_demo_weights_reproduce_recorded_scores(demo):
    cfg = get_weights_cfg(NAME)
    scores = _ship_demo().demo_scores(demo)
    recorded = {k: v for k, v in cfg.metrics.items() if k.startswith("demo64/")}
    assert recorded, "no demo64/ scores recorded"
    for key, value in recorded.items():
        assert scores[key.removeprefix("demo64/")] == pytest.approx(value, abs=1e-6), key


def test_demo_model_is_moe_with_fewer_active_parameters(demo):
    n = demo.num_parameters()
    assert demo.moe_layers == [0, 2] and n["active"] < n["total"]


def test_zoo_chat_answers_about_a_synthetic_scene(capsys):
    from data.shapes import ShapesWorld, WorldConfig
    from zoo.chat import main

    scene = ShapesWorld(WorldConfig(image_size=64)).scene(0, split="test")
    color_q = next(qa for qa in scene.vqa if qa.kind == "color")
    # The question as the model was trained on and is evaluated with (LLaVA-1.5's short-answer instruction).
    assert main(["--scene", "test:0", f"{color_q.question}\nAnswer the question using a single word or phrase."]) == 0
    out = capsys.readouterr().out.strip()
    assert out == color_q.answer


def test_zoo_chat_reports_a_missing_image(tmp_path):
    from zoo.chat import main

    with pytest.raises(SystemExit, match="no such file"):
        main(["--image", str(tmp_path / "nope.png"), "What color?"])
