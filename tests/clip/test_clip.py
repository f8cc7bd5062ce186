"""Tiny CLIP: open_clip model config registration, preprocessing from the model, export/load, recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "clip" / "shapes_tiny.yaml"


def test_tiny_clip_is_an_open_clip_model_built_from_its_config():
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from zoo.models.clip import CLIP_SIZES, get_tokenizer
    from zoo.registry import create_model

    model = create_model("clip_vit_tiny")
    name = CLIP_SIZES["clip_vit_tiny"]
    assert isinstance(model, open_clip.CLIP) and name in open_clip.list_models()
    cfg = open_clip.get_model_config(name)
    assert model.visual.image_size == (cfg["vision_cfg"]["image_size"],) * 2
    assert model.token_embedding.num_embeddings == 49408
    # preprocessing comes from the model (open_clip's defaults for weights-less configs), not from our code
    pp = open_clip.get_model_preprocess_cfg(model)
    assert tuple(pp["mean"]) == tuple(OPENAI_DATASET_MEAN) and tuple(pp["std"]) == tuple(OPENAI_DATASET_STD)
    tok = get_tokenizer("clip_vit_tiny")
    assert isinstance(tok, open_clip.SimpleTokenizer)
    ids = tok(["a large red circle."])
    assert ids.shape == (1, cfg["text_cfg"]["context_length"])
    assert torch.equal(ids, open_clip.tokenize(["a large red circle."], context_length=ids.shape[1]))


def test_tiny4_differs_from_tiny_only_by_one_image_block():
    """clip_vit_tiny4 (the tiny MoE-LLaVA's stage 0) is clip_vit_tiny with a fourth image block, per the size table."""
    import open_clip

    from zoo.models.clip import CLIP_SIZES
    from zoo.registry import create_model

    small, deep = (open_clip.get_model_config(CLIP_SIZES[a]) for a in ("clip_vit_tiny", "clip_vit_tiny4"))
    assert (small["vision_cfg"]["layers"], deep["vision_cfg"]["layers"]) == (3, 4)
    deep["vision_cfg"]["layers"] = 3
    assert deep == small
    a, b = create_model("clip_vit_tiny"), create_model("clip_vit_tiny4")
    assert len(b.visual.transformer.resblocks) == 4
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    block = count(b.visual.transformer.resblocks[0])
    assert count(b) - count(a) == block and count(b.visual) == 843_008


def test_image_transform_follows_model_config():
    from PIL import Image

    from zoo.models.clip import image_transform
    from zoo.registry import create_model

    model = create_model("clip_vit_tiny")
    model.visual.preprocess_cfg = {**model.visual.preprocess_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    x = image_transform(model)(Image.new("RGB", (64, 64), (255, 0, 0)))
    assert x.shape == (3, 64, 64)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([2.0, -2.0, -2.0]))


def test_export_roundtrip_exposes_visual_tower(tmp_path):
    from zoo.registry import create_model, load, save_pretrained

    torch.manual_seed(0)
    model = create_model("clip_vit_tiny").eval()
    save_pretrained(model, tmp_path, "clip_vit_tiny", {})
    back = load(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back.visual(x), model.visual(x))
        torch.testing.assert_close(back.encode_image(x), model.encode_image(x))


def test_recipe_end_to_end_reduced(tmp_path):
    """The real recipe at a reduced size: trains, evaluates zero-shot on the held-out split, exports."""
    from zoo.registry import load
    from zoo.train import train

    overrides = [
        "stages.clip.trainer.max_steps=3",
        "stages.clip.trainer.enable_progress_bar=false",
        "stages.clip.batch_size=8",
        "stages.clip.data.num_train=24",
        "stages.clip.eval.num_samples=30",
        "stages.clip.schedule.warmup_steps=1",
    ]
    (row,) = train(RECIPE, overrides=overrides, runs_dir=tmp_path)
    out = tmp_path / "clip_shapes_tiny" / "clip"
    assert row["status"] == "trained" and row["steps"] == 3
    metrics = row["metrics"]
    assert set(metrics) == {"zeroshot_acc", "color_acc", "shape_acc"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())  # percent
    report = json.loads((out / "zeroshot.json").read_text())
    assert report["split"] == "test" and report["num_samples"] == 30 and len(report["class_names"]) == 30
    assert sum(map(sum, report["confusion"])) == 30
    assert abs(report["metrics"]["zeroshot_acc"] - metrics["zeroshot_acc"]) < 1e-12
    # percent, read off the confusion matrix it writes: the trace, and same-colour cells for colour accuracy
    confusion = torch.tensor(report["confusion"])
    assert metrics["zeroshot_acc"] == pytest.approx(100 * float(confusion.trace()) / 30)
    colours = [name.split(" ")[0] for name in report["class_names"]]
    same_colour = torch.tensor([[a == b for b in colours] for a in colours])
    assert metrics["color_acc"] == pytest.approx(100 * float(confusion[same_colour].sum()) / 30)
    assert metrics["color_acc"] > 1.0  # three steps already tell some colours apart: a fraction would be <= 1
    tower = load(out / "final").visual
    assert tower(torch.zeros(1, 3, 64, 64)).shape == (1, 128)


@pytest.mark.slow
def test_recipe_reaches_90_percent_zero_shot(tmp_path):
    """The acceptance run: the full recipe, zero-shot colour x shape accuracy >= 90% on the held-out split."""
    from zoo.train import train

    (row,) = train(RECIPE, runs_dir=tmp_path)
    assert row["metrics"]["zeroshot_acc"] >= 90.0, row
