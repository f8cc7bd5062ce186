"""The synthetic world: determinism, splits, balance, masks, referring expressions, sizes."""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter

import numpy as np
import pytest

from data.shapes import (
    COLORS,
    POPE_STRATEGIES,
    SHAPES,
    ShapesWorld,
    WorldConfig,
    render_grid,
    rle_decode,
    rle_encode,
)


def _png_sha(scene) -> str:
    buf = io.BytesIO()
    scene.image.save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _world(**kw) -> ShapesWorld:
    return ShapesWorld(WorldConfig(**kw))


@pytest.mark.parametrize("background,clutter", [("plain", 0), ("noise", 3), ("gradient", 2)])
def test_same_seed_same_bytes_other_seed_differs(background, clutter):
    a = [_png_sha(s) for s in _world(seed=3, background=background, clutter=clutter).scenes("train", 8)]
    b = [_png_sha(s) for s in _world(seed=3, background=background, clutter=clutter).scenes("train", 8)]
    c = [_png_sha(s) for s in _world(seed=4, background=background, clutter=clutter).scenes("train", 8)]
    assert a == b
    assert all(x != y for x, y in zip(a, c))
    s1, s2 = _world(seed=3).scene(5, "val"), _world(seed=3).scene(5, "val")
    assert np.array_equal(np.asarray(s1.image), np.asarray(s2.image))
    assert s1.to_record() == s2.to_record()


def test_splits_are_disjoint_by_layout():
    world = _world(seed=0, min_objects=1, max_objects=1, image_size=32)
    keys = {
        split: {world.layout_key(s) for s in world.scenes(split, n)}
        for split, n in (("train", 300), ("val", 150), ("test", 150))
    }
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    for split, ks in keys.items():
        assert all(world.split_of_layout(k) == split for k in ks)
    imgs = {split: {_png_sha(s) for s in world.scenes(split, 50)} for split in ("train", "val", "test")}
    assert not imgs["train"] & imgs["val"] and not imgs["val"] & imgs["test"]


def test_single_object_label_is_colour_times_shape():
    world = _world(min_objects=1, max_objects=1)
    assert world.class_names == [f"{c} {s}" for c in COLORS for s in SHAPES]
    for s in world.scenes("train", 50):
        assert len(s.objects) == 1
        assert world.class_names[s.label] == f"{s.objects[0].color} {s.objects[0].shape}" == s.label_name
        assert s.caption == f"a {s.objects[0].size} {s.label_name}."
    labels = Counter(s.label for s in world.scenes("train", 600))
    assert len(labels) == world.num_classes  # every class shows up


def test_masks_consistent_with_bboxes_and_colours():
    world = _world(max_objects=4, background="noise", clutter=4)
    for s in world.scenes("train", 40):
        arr = np.asarray(s.image)
        union = np.zeros(arr.shape[:2], dtype=int)
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            ys, xs = np.nonzero(o.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            assert o.mask[y0:y1, x0:x1].sum() == o.mask.sum() > 0
            assert x0 <= o.center[0] < x1 and y0 <= o.center[1] < y1
            from data.shapes import COLOR_RGB

            assert (arr[o.mask] == COLOR_RGB[o.color]).all()
            assert np.array_equal(rle_decode(rle_encode(o.mask)), o.mask)
            union += o.mask
        assert union.max() <= 1  # objects never overlap
        assert len({o.name for o in s.objects}) == len(s.objects)


def test_vqa_kinds_answers_and_balanced_existence():
    world = _world(max_objects=3)
    kinds, exist = Counter(), Counter()
    for s in world.scenes("train", 200):
        per_scene = Counter(q.answer for q in s.vqa if q.kind == "exist")
        assert per_scene == {"yes": 1, "no": 1}
        for q in s.vqa:
            kinds[q.kind] += 1
            assert q.question.endswith("?")
            if q.kind == "exist":
                exist[q.answer] += 1
                target = re.match(r"Is there an? (\w+ \w+) in the image\?", q.question).group(1)
                assert (q.answer == "yes") == (target in {o.name for o in s.objects})
            elif q.kind == "color":
                assert q.answer in COLORS
            elif q.kind == "shape":
                assert q.answer in SHAPES
            elif q.kind == "count":
                assert q.answer.isdigit()
            elif q.kind == "position":
                assert q.answer in {"left", "right", "above", "below"}
    assert set(kinds) == {"color", "shape", "count", "position", "exist"}
    assert exist["yes"] == exist["no"] == 200


def test_count_answers_are_true():
    world = _world(max_objects=3)
    for s in world.scenes("train", 100):
        for q in s.vqa:
            if q.kind != "count":
                continue
            m = re.fullmatch(r"How many (?:(\w+) objects|(\w+)) are there\?", q.question)
            if q.question == "How many objects are there?":
                want = len(s.objects)
            elif m.group(1):
                want = sum(o.color == m.group(1) for o in s.objects)
            else:
                want = sum(m.group(2) in (o.shape + "s", o.shape + "es") for o in s.objects)
            assert q.answer == str(want), q


def test_pope_balanced_per_strategy_and_negatives_follow_strategy():
    world = _world(max_objects=3)
    for s in world.scenes("train", 100):
        present = {o.name for o in s.objects}
        for strategy in POPE_STRATEGIES:
            probes = [p for p in s.pope if p.strategy == strategy]
            assert Counter(p.answer for p in probes) == {"yes": len(present), "no": len(present)}
            assert {p.target for p in probes if p.answer == "yes"} == present
            negatives = [p.target for p in probes if p.answer == "no"]
            assert len(set(negatives)) == len(negatives) and not set(negatives) & present
            if strategy == "popular":
                absent_by_popularity = [c for c in world.popularity if c not in present]
                assert set(negatives) == set(absent_by_popularity[: len(present)])
            if strategy == "adversarial":
                colors = {o.color for o in s.objects}
                shapes = {o.shape for o in s.objects}
                for t in negatives:
                    c, sh = t.split()
                    assert c in colors or sh in shapes
        for p in s.pope:
            assert (
                p.question == f"Is there {'an' if p.target[0] in 'aeiou' else 'a'} {p.target} in the image?"
            )


def _resolve_text(text: str, objects) -> list[int]:
    """An independent reading of a referring expression: attribute filter, then an extreme position."""
    words = text.removeprefix("the ").split()
    position = None
    for phrase, pos in (
        ("on the left", "left"),
        ("on the right", "right"),
        ("at the top", "top"),
        ("at the bottom", "bottom"),
    ):
        if text.endswith(phrase):
            position = pos
            words = words[: -len(phrase.split())]
    hits = [
        i
        for i, o in enumerate(objects)
        if all(w == "object" or w in (o.color, o.shape, o.size) for w in words)
    ]
    if position is None:
        return hits
    key = {
        "left": lambda i: objects[i].center[0],
        "right": lambda i: -objects[i].center[0],
        "top": lambda i: objects[i].center[1],
        "bottom": lambda i: -objects[i].center[1],
    }[position]
    best = min(key(i) for i in hits)
    chosen = [i for i in hits if key(i) == best] if len(hits) > 1 else []
    # and it lies entirely beyond the others on that axis (bboxes do not overlap there)
    axis = 0 if position in ("left", "right") else 1
    for i in chosen:
        lo, hi = objects[i].bbox[axis], objects[i].bbox[axis + 2]
        for j in hits:
            if j != i:
                olo, ohi = objects[j].bbox[axis], objects[j].bbox[axis + 2]
                assert (hi <= olo) if position in ("left", "top") else (lo >= ohi), text
    return chosen


def test_referring_expressions_are_unique_with_their_mask():
    world = _world(max_objects=4, colors=("red", "green", "blue"), shapes=("circle", "square", "triangle"))
    n_positional = 0
    for s in world.scenes("train", 150):
        assert s.refexps
        for r in s.refexps:
            assert _resolve_text(r.text, s.objects) == [r.object_index], (r.text, s.id)
            assert np.array_equal(r.mask, s.objects[r.object_index].mask)
            n_positional += r.text.endswith(("left", "right", "top", "bottom"))
        names = [r.text for r in s.refexps]
        assert len(names) == len(set(names))
        assert {f"the {o.name}" for o in s.objects} <= set(names)
    assert n_positional > 10


@pytest.mark.parametrize("size", [32, 336])
def test_extreme_image_sizes(size, tmp_path):
    world = _world(image_size=size, max_objects=3, background="gradient", clutter=2)
    for s in world.scenes("val", 4):
        assert s.image.size == (size, size) and s.image.mode == "RGB"
        for o in s.objects:
            assert o.mask.shape == (size, size)
            assert o.mask.sum() >= 30  # still a recognisable shape at 32 px, not a speck
    out = render_grid(world.scenes("train", 4), tmp_path / "grid.png")
    assert out.exists() and out.stat().st_size > 0


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=16)
    with pytest.raises(ValueError, match="unknown: \\['mauve'\\]"):
        WorldConfig(colors=("red", "mauve"))
    with pytest.raises(ValueError, match="background"):
        WorldConfig(background="sky")
    assert WorldConfig(colors=["red", "blue"], shapes=["circle", "square", "star"], max_objects=2).colors == (
        "red",
        "blue",
    )


def test_object_counts_uniform_even_when_crowded():
    world = _world(image_size=32, max_objects=4)
    counts = Counter(len(s.objects) for s in world.scenes("train", 200))
    assert set(counts) == {1, 2, 3, 4}
    assert min(counts.values()) >= 30  # placement failures must not thin out the crowded scenes


def test_grid_cli(tmp_path):
    from PIL import Image

    from data.shapes import main

    out = main(["--out", str(tmp_path / "g.png"), "-n", "3", "--image-size", "32", "--background", "noise"])
    with Image.open(out) as im:
        assert im.size[0] > 3 * 32


def test_resample_vqa_is_a_seeded_redraw_of_the_same_generator():
    from data.shapes import ShapesWorld, WorldConfig

    world = ShapesWorld(WorldConfig(image_size=64))
    scene = world.scene(3)
    a, b = world.resample_vqa(scene, 1), world.resample_vqa(scene, 1)
    assert [q.question for q in a] == [q.question for q in b]  # deterministic per draw
    draws = [world.resample_vqa(scene, d) for d in range(1, 6)]
    assert any([q.question for q in d] != [q.question for q in scene.vqa] for d in draws)
    # same kinds and the same object facts; only the choice of objects and phrases moves
    colors = {o.color for o in scene.objects}
    for d in draws:
        assert {q.kind for q in d} <= {q.kind for q in scene.vqa} | {"position"}
        assert all(q.answer in colors for q in d if q.kind == "color")
    with pytest.raises(ValueError, match="draw"):
        world.resample_vqa(scene, 0)
