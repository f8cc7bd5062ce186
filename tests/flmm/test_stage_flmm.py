"""The F-LMM stage through the recipe runner at toy size: it trains only the heads, reports the LMM unchanged, scores
ShapesRefSeg and the union baseline, writes overlays and a loadable checkpoint; globs that reach the LMM are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import zoo
from zoo.recipe import load_recipe
from zoo.train import train

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "flmm" / "moe_llava_tiny_shapes.yaml"

TOY = [
    "stages.flmm.trainer.max_steps=3",
    "stages.flmm.trainer.ckpt_every_n_steps=3",
    "stages.flmm.trainer.enable_progress_bar=false",
    "stages.flmm.batch_size=4",
    "stages.flmm.data.num_scenes=4",
    "stages.flmm.model.unet_channels=4",
    "stages.flmm.eval.tasks=[shapes_refseg]",
    "stages.flmm.eval.limit=6",
    "stages.flmm.eval.batch_size=6",
]


def test_recipe_validates_and_trains_only_the_heads() -> None:
    stage = load_recipe(RECIPE).stages[0]
    assert stage.type == "flmm" and stage.init_source is None and stage.model.base == "moe_llava_tiny.shapes"
    assert stage.frozen == ["lmm.*", "refiner.vision_encoder.*"] and all(not g.startswith("lmm") for g in stage.trainable)
    assert stage.model.sam_weights == "recipes/flmm/tiny_sam_shapes" and (ROOT / stage.model.sam_weights).is_dir()
    assert set(stage.eval.tasks) == {"shapes_refseg", "shapes_vqa", "shapes_pope"} and stage.eval.baseline


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    [row] = train(RECIPE, overrides=TOY, runs_dir=runs)
    assert row["status"] == "trained"
    return runs / "flmm_moe_llava_tiny_shapes" / "flmm"


@pytest.mark.slow  # a whole stage with evaluation: about 10 s on an idle machine
def test_toy_run_keeps_the_lmm_and_scores_model_and_baseline(toy_run: Path) -> None:
    summary = json.loads((toy_run / "summary.json").read_text())
    m = summary["metrics"]
    assert m["lmm_unchanged"] == 1.0 and summary["steps"] == 3
    model = zoo.load(toy_run / "final")
    encoder = sum(p.numel() for p in model.refiner.vision_encoder.parameters())
    assert summary["params"]["frozen"] == 2_501_282 + encoder  # exactly the tiny MoE-LLaVA and SAM's image encoder
    for prefix in ("", "baseline_union/"):
        assert 0.0 <= m[f"{prefix}shapes_refseg/ciou"] <= 100.0  # percent
        assert f"{prefix}shapes_refseg/relation/ciou" in m or f"{prefix}shapes_refseg/attribute/ciou" in m
    results = json.loads((toy_run / "eval" / "flmm" / "results.json").read_text())
    overlays = results["artifacts"]["shapes_refseg"]["overlays"]
    assert len(overlays) == 6 and all(Path(p).is_file() for p in overlays)
    from transformers import SamModel

    sam = SamModel.from_pretrained(str(ROOT / "recipes" / "flmm" / "tiny_sam_shapes")).vision_encoder.state_dict()
    assert all(torch.equal(v, sam[k]) for k, v in model.refiner.vision_encoder.state_dict().items())  # frozen
    base = zoo.load("moe_llava_tiny.shapes")
    ref = base.state_dict()
    assert all(v.equal(ref[k]) for k, v in model.lmm.state_dict().items())


def test_globs_that_reach_the_lmm_are_refused(tmp_path: Path) -> None:
    raw = yaml.safe_load(RECIPE.read_text())
    raw["stages"][0]["trainable"] = ["*"]
    raw["stages"][0]["frozen"] = []
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="F-LMM keeps the LMM frozen"):
        train(bad, overrides=[*TOY, "stages.flmm.trainer.max_steps=1"], runs_dir=tmp_path / "runs")


def test_repeat_kinds_lists_rare_kinds_more_often() -> None:
    from zoo.stages.flmm import RefSegTrainSet

    class Sample:
        def __init__(self, kind: str) -> None:
            self.kind = kind

    kinds = ["attribute", "relation", "attribute", "position"]
    ds = RefSegTrainSet([Sample(k) for k in kinds], {"relation": 3, "position": 2}, kinds)
    assert ds.order == [0, 1, 1, 1, 2, 3, 3] and len(ds) == 7
    assert RefSegTrainSet([Sample(k) for k in kinds]).order == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="kinds must be among"):
        RefSegTrainSet([Sample(k) for k in kinds], {"relations": 2}, kinds)
