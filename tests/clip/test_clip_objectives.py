"""The CLIP task's optional objectives: shape-swapped hard-negative captions and the dense patch loss."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "clip" / "shapes_tiny.yaml"


def _world():
    from data.shapes import ShapesWorld, WorldConfig

    return ShapesWorld(WorldConfig(image_size=64, seed=0, min_objects=2, max_objects=3))


def test_shape_swapped_captions_change_exactly_one_shape_word():
    from data.shapes_clip import shape_swapped_captions

    world = _world()
    shapes = world.config.shapes
    for index in range(20):
        scene = world.scene(index, "train")
        negatives = shape_swapped_captions(scene, shapes, 3, seed=index)
        assert negatives == shape_swapped_captions(scene, shapes, 3, seed=index)  # seeded
        for neg in negatives:
            old, new = scene.caption.split(" "), neg.split(" ")
            assert len(old) == len(new)
            diff = [(a, b) for a, b in zip(old, new) if a != b]
            assert len(diff) == 1, (scene.caption, neg)
            a, b = (w.rstrip(".,") for w in diff[0])
            assert a in shapes and b in shapes and a != b
    assert shape_swapped_captions(world.scene(0, "train"), shapes, 0, seed=0) == []


def test_patch_labels_follow_the_masks():
    from data.shapes_clip import patch_labels

    world = _world()
    shapes, sizes = world.config.shapes, world.config.sizes
    for index in range(10):
        scene = world.scene(index, "train")
        labels = patch_labels(scene, 8, shapes, sizes).reshape(8, 8)
        for obj in scene.objects:
            cover = obj.mask.reshape(8, 8, 8, 8).mean(axis=(1, 3))
            want = 1 + shapes.index(obj.shape) * len(sizes) + sizes.index(obj.size)
            # Patches the object fills entirely carry its label (objects never overlap).
            assert (labels[torch.from_numpy(cover == 1.0)] == want).all()
        covered = np.max([o.mask.reshape(8, 8, 8, 8).mean(axis=(1, 3)) for o in scene.objects], axis=0)
        assert ((labels == 0).numpy() == (covered < 0.3)).all()


def test_recipe_with_hard_negatives_and_patch_loss(tmp_path):
    """Both objectives train through the runner, log their parts, and the patch head is not exported."""
    from zoo.registry import load
    from zoo.train import train

    overrides = [
        "stages.clip.trainer.max_steps=2",
        "stages.clip.trainer.log_every_n_steps=1",
        "stages.clip.trainer.enable_progress_bar=false",
        "stages.clip.batch_size=4",
        "stages.clip.data.num_train=8",
        "stages.clip.data.max_objects=3",
        "stages.clip.data.hard_negatives=2",
        "stages.clip.data.patch_loss=2.0",
        "stages.clip.eval.num_samples=10",
        "stages.clip.eval.max_objects=1",
        "stages.clip.schedule.warmup_steps=1",
    ]
    (row,) = train(RECIPE, overrides=overrides, runs_dir=tmp_path)
    out = tmp_path / "clip_shapes_tiny" / "clip"
    assert row["status"] == "trained" and row["steps"] == 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for r in rows:
        total, contrastive, dense = (float(r[k]) for k in ("loss", "contrastive_loss", "patch_loss"))
        assert dense > 0 and abs(total - (contrastive + 2.0 * dense)) < 1e-4
    model = load(out / "final")
    assert not any(k.startswith("patch_head") for k in model.state_dict())


def test_task_loss_matches_a_direct_computation():
    """compute_loss = (image->text CE over captions + negatives, text->image CE) / 2 + w * patch CE (object
    patches), each term written out here independently of the task's code."""
    from zoo.components.vision import OpenClipVisionTower, VisionTowerConfig
    from zoo.recipe import load_recipe
    from zoo.stages import get_stage_type

    recipe = load_recipe(RECIPE, overrides=["stages.clip.data.max_objects=3", "stages.clip.data.hard_negatives=2",
                                            "stages.clip.data.patch_loss=0.5", "stages.clip.data.num_train=4"])
    stage = recipe.stages[0]
    torch.manual_seed(0)
    task = get_stage_type(stage.type)(stage.model, stage.data, stage.eval, stage)
    task.model.eval()
    batch = task.collate_fn([task.train_dataset()[i] for i in range(4)])
    assert batch["negative_texts"].shape[0] == 8 and batch["patch_labels"].shape == (4, 64)
    with torch.no_grad():
        loss, logs = task.compute_loss(batch)
        m = task.model
        img = m.encode_image(batch["images"], normalize=True)
        txt = m.encode_text(batch["texts"], normalize=True)
        neg = m.encode_text(batch["negative_texts"], normalize=True)
        scale = m.logit_scale.exp()
        texts = torch.cat([txt, neg])
        i2t = torch.stack([-(scale * img[i] @ texts.T).log_softmax(0)[i] for i in range(4)]).mean()
        t2i = torch.stack([-(scale * txt[i] @ img.T).log_softmax(0)[i] for i in range(4)]).mean()
        # The head must read what a LLaVA tower hands on: the penultimate block's patch tokens (select_layer=-2).
        tower = OpenClipVisionTower(VisionTowerConfig(kind="open_clip", select_layer=-2), visual=m.visual)
        tokens = tower.forward_features(batch["images"])
        logits, labels = task.patch_head(tokens).flatten(0, 1), batch["patch_labels"].flatten()
        keep = labels > 0
        dense = -logits[keep].log_softmax(-1).gather(1, labels[keep, None]).mean()
    assert torch.allclose(logs["contrastive_loss"], (i2t + t2i) / 2, atol=1e-5)
    assert torch.allclose(logs["patch_loss"], dense, atol=1e-5)
    assert torch.allclose(loss, (i2t + t2i) / 2 + 0.5 * dense, atol=1e-5)
