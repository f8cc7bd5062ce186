"""Referring-segmentation data: ShapesRefSeg (relation expressions that need their relation), the RefCOCO readers
on fixtures in the official layouts (``refer`` pickle + instances.json, harness parquet), PNG, and the restricted
unpickler refusing a malicious pickle."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from data.refseg import (
    ShapesRefSeg,
    UnsafePickleError,
    load_refs_pickle,
    polygons_to_mask,
    read_png,
    read_refcoco,
    read_refcoco_parquet,
    relation_expressions,
    rle_to_mask,
    shapes_refseg_samples,
)
from data.shapes import ShapesWorld, WorldConfig

# ------------------------------------------------------------------------------------------------------------
# fixtures in the official layouts
# ------------------------------------------------------------------------------------------------------------

RECT = [1.0, 1.0, 3.0, 1.0, 3.0, 4.0, 1.0, 4.0]  # pycocotools fills columns 1-2, rows 1-3 (area 6)
TRI = [10.0, 2.0, 18.0, 2.0, 14.0, 9.0]


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _sentence(text: str, sid: int) -> dict:
    return {"tokens": text.split(), "raw": text.capitalize(), "sent_id": sid, "sent": text}


def write_refer_layout(root: Path) -> Path:
    """<root>/refcoco/{refs(unc).p, instances.json} + images/.../train2014, as lichengunc/refer expects."""
    (root / "refcoco").mkdir(parents=True)
    images = root / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True)
    for image_id in (581857, 9):
        (images / f"COCO_train2014_{image_id:012d}.jpg").write_bytes(_jpeg(24, 16))
    instances = {
        "images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "height": 16, "width": 24},
                   {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 16, "width": 24}],
        "annotations": [
            {"id": 1001, "image_id": 581857, "category_id": 1, "bbox": [1, 1, 2, 3], "area": 6, "iscrowd": 0,
             "segmentation": [RECT, TRI]},
            {"id": 1002, "image_id": 9, "category_id": 2, "bbox": [10, 2, 8, 7], "area": 30, "iscrowd": 0,
             "segmentation": [TRI]},
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 2, "name": "dog", "supercategory": "animal"}],
    }  # fmt: skip
    refs = [
        {"ref_id": 0, "ann_id": 1001, "image_id": 581857, "category_id": 1, "split": "val", "sent_ids": [0, 1],
         "sentences": [_sentence("man on the left", 0), _sentence("left guy", 1)],
         "file_name": "COCO_train2014_000000581857_1.jpg"},
        {"ref_id": 1, "ann_id": 1002, "image_id": 9, "category_id": 2, "split": "testA", "sent_ids": [2],
         "sentences": [_sentence("the dog", 2)], "file_name": "COCO_train2014_000000000009_2.jpg"},
    ]  # fmt: skip
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))  # cPickle's protocol 2
    return root


def write_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "question_id": ["1001", "1002"],
        "image": [{"bytes": _jpeg(24, 16), "path": None}, {"bytes": _jpeg(24, 16), "path": None}],
        "question": ["", ""],
        "answer": [["man on the left", "left guy"], ["the dog"]],
        "segmentation": [RECT, TRI],
        "bbox": [[1.0, 1.0, 2.0, 3.0], [10.0, 2.0, 8.0, 7.0]],
        "iscrowd": [0, 0],
        "file_name": ["COCO_train2014_000000581857.jpg", "COCO_train2014_000000000009.jpg"],
    })  # fmt: skip
    pq.write_table(table, path)
    return path


def write_png_layout(root: Path) -> Path:
    """PNG narratives + COCO panoptic JSON + a panoptic PNG whose ids need more than 8 bits (300 = R 44, G 1)."""
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "images" / "val2017" / "000000000139.jpg").write_bytes(_jpeg(6, 4))
    ids = np.zeros((4, 6), dtype=np.int32)
    ids[0:2, 0:3] = 300  # a person (thing)
    ids[2:4, :] = 7  # grass (stuff)
    ids[0:2, 4:6] = 65536 + 5  # another person, id in the blue channel
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "annotations" / "panoptic_val2017" / "000000000139.png")
    panoptic = {
        "annotations": [{"image_id": 139, "file_name": "000000000139.png", "segments_info": [
            {"id": 300, "category_id": 1, "bbox": [0, 0, 3, 2], "area": 6, "iscrowd": 0},
            {"id": 7, "category_id": 125, "bbox": [0, 2, 6, 2], "area": 12, "iscrowd": 0},
            {"id": 65541, "category_id": 1, "bbox": [4, 0, 2, 2], "area": 4, "iscrowd": 0}]}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person", "isthing": 1, "color": [220, 20, 60]},
                       {"id": 125, "name": "grass", "supercategory": "plant", "isthing": 0, "color": [0, 200, 0]}],
    }  # fmt: skip
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(panoptic))
    narratives = [{"image_id": "139", "caption": "Two people stand on the grass.", "segments": [
        {"utterance": "Two people", "segment_ids": ["300", "65541"], "noun": True, "plural": True},
        {"utterance": "stand on", "segment_ids": [], "noun": False, "plural": False},
        {"utterance": "the grass", "segment_ids": [7], "noun": True, "plural": False}]}]  # fmt: skip
    (root / "png_coco_val2017.json").write_text(json.dumps(narratives))
    return root


# ------------------------------------------------------------------------------------------------------------
# masks through pycocotools
# ------------------------------------------------------------------------------------------------------------


def test_polygon_rasterisation_is_pycocotools_and_merges_polygons() -> None:
    rect = polygons_to_mask([RECT], 6, 5)
    assert rect.sum() == 6 and rect[1:4, 1:3].all()  # columns 1-2, rows 1-3
    both = polygons_to_mask([RECT, TRI], 16, 24)
    assert both.dtype == bool and both.max() == 1  # a union, not REFER's sum
    assert np.array_equal(both, polygons_to_mask([RECT], 16, 24) | polygons_to_mask([TRI], 16, 24))
    with pytest.raises(ValueError, match="coordinates"):
        polygons_to_mask([[1.0, 2.0, 3.0, 4.0]], 6, 5)  # 4 numbers would be read as a box


def test_rle_forms_decode_alike() -> None:
    from pycocotools import mask as mask_api

    m = polygons_to_mask([TRI], 16, 24)
    compressed = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
    flat = m.ravel(order="F").astype(np.int64)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))  # run boundaries, starting with zeros
    runs = np.diff(np.concatenate([[0], change])).tolist()
    assert np.array_equal(rle_to_mask(compressed), m)
    assert np.array_equal(rle_to_mask({"size": [16, 24], "counts": compressed["counts"].decode("ascii")}), m)
    assert np.array_equal(rle_to_mask({"size": [16, 24], "counts": runs[:-1] if runs[-1] == 0 else runs}), m)


# ------------------------------------------------------------------------------------------------------------
# RefCOCO
# ------------------------------------------------------------------------------------------------------------


def test_refer_layout_reader_matches_pycocotools_coco(tmp_path: Path) -> None:
    root = write_refer_layout(tmp_path)
    images = root / "images" / "mscoco" / "images" / "train2014"
    val = read_refcoco(root, "refcoco", "val", images)
    assert [s.text for s in val] == ["man on the left"]  # select_first
    coco = COCO(str(root / "refcoco" / "instances.json"))
    expected = coco.annToMask(coco.loadAnns([1001])[0]).astype(bool)
    assert np.array_equal(val[0].mask(), expected) and expected.sum() > 6
    assert val[0].load_image().size == (24, 16)
    assert val[0].fields["sentences"] == ["man on the left", "left guy"]
    every = read_refcoco(root, "refcoco", "val", images, per_sentence=True)
    assert [s.text for s in every] == ["man on the left", "left guy"]
    assert [s.text for s in read_refcoco(root, "refcoco", "testA", images)] == ["the dog"]
    assert read_refcoco(root, "refcoco", "test", images) == []  # mmdet's exact split match, not REFER's "contains"


def test_refer_reader_errors_name_file_record_and_field(tmp_path: Path) -> None:
    root = write_refer_layout(tmp_path)
    refs = pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes())
    del refs[1]["ann_id"]
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p:1: missing field 'ann_id'"):
        read_refcoco(root, "refcoco", "testA", root)
    with pytest.raises(FileNotFoundError, match=r"refcocog/refs\(umd\)\.p"):
        read_refcoco(root, "refcocog", "val", root)


def test_parquet_reader(tmp_path: Path) -> None:
    samples = read_refcoco_parquet(write_parquet(tmp_path / "val.parquet"))
    assert [s.text for s in samples] == ["man on the left", "the dog"]
    assert np.array_equal(samples[0].mask(), polygons_to_mask([RECT], 16, 24))
    assert samples[1].load_image().size == (24, 16)
    assert len(read_refcoco_parquet(tmp_path / "val.parquet", per_sentence=True)) == 3


# ------------------------------------------------------------------------------------------------------------
# the pickle: plain containers only
# ------------------------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pickle_is_refused_before_anything_runs(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "refs(unc).p"
    evil.write_bytes(pickle.dumps([{"ref_id": 0, "payload": _Payload(marker)}], protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p: refused: opcode (GLOBAL|STACK_GLOBAL)"):
        load_refs_pickle(evil)
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # what a plain pickle.load would have done
    assert marker.exists()


def test_plain_pickle_loads_and_garbage_is_an_error(tmp_path: Path) -> None:
    good = tmp_path / "good.p"
    data = [{"ref_id": 1, "sentences": [{"sent": "zoë's cat", "tokens": ["a"]}], "ok": True, "x": 1.5, "n": None}]
    good.write_bytes(pickle.dumps(data, protocol=2))
    assert load_refs_pickle(good) == data
    bad = tmp_path / "bad.p"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a valid pickle"):
        load_refs_pickle(bad)


# ------------------------------------------------------------------------------------------------------------
# PNG
# ------------------------------------------------------------------------------------------------------------


def test_png_reader_unions_segments_and_tells_thing_from_stuff(tmp_path: Path) -> None:
    root = write_png_layout(tmp_path)
    samples = read_png(root / "png_coco_val2017.json", root / "annotations" / "panoptic_val2017.json",
                       root / "annotations" / "panoptic_val2017", root / "images" / "val2017")  # fmt: skip
    assert [(s.text, s.kind) for s in samples] == [("Two people", "thing"), ("the grass", "stuff")]
    people = np.zeros((4, 6), dtype=bool)
    people[0:2, 0:3] = people[0:2, 4:6] = True
    assert np.array_equal(samples[0].mask(), people)  # ids 300 and 65541 need the int32 decode
    assert samples[1].mask().sum() == 12 and samples[0].fields["plural"]
    assert samples[0].load_image().size == (6, 4)


# ------------------------------------------------------------------------------------------------------------
# ShapesRefSeg
# ------------------------------------------------------------------------------------------------------------


def test_relation_expressions_need_their_relation_and_name_one_object() -> None:
    world = ShapesWorld(WorldConfig(image_size=64, seed=0))
    found = 0
    for scene in world.scenes("test", 60):
        for text, target in relation_expressions(scene.objects):
            found += 1
            words = text.split()
            anchor_colour, anchor_shape = words[-2], words[-1]
            anchor = next(j for j, o in enumerate(scene.objects)
                          if (o.color, o.shape) == (anchor_colour, anchor_shape))  # fmt: skip
            head = text.removeprefix("the ").split(" to the ")[0].split(" above ")[0].split(" below ")[0].split()
            fits = [k for k, o in enumerate(scene.objects)
                    if k != anchor and all(w in (o.shape, o.color, o.size, "object") for w in head)]  # fmt: skip
            assert target in fits and len(fits) >= 2, text  # the description alone is ambiguous
            x0, y0, x1, y1 = scene.objects[target].bbox
            ax0, ay0, ax1, ay1 = scene.objects[anchor].bbox
            holds = {"left": x1 <= ax0, "right": x0 >= ax1, "above": y1 <= ay0, "below": y0 >= ay1}
            relation = next(r for r in holds if f" {r} " in f" {text} ")
            assert holds[relation], text
    assert found >= 10


def test_shapes_refseg_split() -> None:
    world = ShapesWorld(WorldConfig(image_size=64, seed=0))
    ds = ShapesRefSeg(world, "test", 40)
    kinds = ds.kinds()
    assert set(kinds) == {"attribute", "position", "relation"} and kinds["relation"] > 0
    scene = world.scene(0, "test")
    samples = shapes_refseg_samples(scene)
    assert samples[0][0] == scene.refexps[0].text and samples[0][2] == "attribute"
    item = ds[0]
    assert item.mask().dtype == bool and np.array_equal(item.mask(), scene.objects[samples[0][1]].mask)
    assert item.load_image().size == (64, 64)


# ------------------------------------------------------------------------------------------------------------
# the eval tasks on the same fixtures (registry YAML -> reader -> segment output -> refseg scorer)
# ------------------------------------------------------------------------------------------------------------


class _WholeImage:
    """Predicts every pixel: each sample's IoU is its mask's share of the image."""

    def ground(self, images, expressions):
        return [np.full((im.size[1], im.size[0]), 0.9, dtype=np.float32) for im in images]


def test_refseg_tasks_score_the_fixtures(tmp_path: Path) -> None:
    import eval as zoo_eval

    write_refer_layout(tmp_path / "refcoco")
    write_parquet(tmp_path / "val.parquet")
    write_png_layout(tmp_path / "png")
    roots = {"refcoco": tmp_path / "refcoco", "refcoco_parquet": tmp_path, "png": tmp_path / "png"}
    res = zoo_eval.run(_WholeImage(), tasks=["refcoco_val", "refcoco_testa", "refcoco_parquet", "png_val"],
                       data_roots=roots, output_dir=tmp_path / "out", progress=False)  # fmt: skip
    r = res["results"]
    # the reports are in percent
    full = 100 * polygons_to_mask([RECT, TRI], 16, 24).sum() / (16 * 24)
    assert r["refcoco_val"]["ciou,none"] == pytest.approx(full)
    assert r["refcoco_testa"]["ciou,none"] == pytest.approx(100 * polygons_to_mask([TRI], 16, 24).sum() / (16 * 24))
    rect, tri = polygons_to_mask([RECT], 16, 24).sum(), polygons_to_mask([TRI], 16, 24).sum()
    assert r["refcoco_parquet"]["ciou,none"] == pytest.approx(100 * (rect + tri) / (2 * 16 * 24))
    assert r["png_val"]["ar,none"] == pytest.approx(100 * (12 + 10) / 24 / 2, abs=1e-3)  # people 10 px, grass 12 px
    assert r["png_val"]["thing/ciou,none"] == pytest.approx(100 * 10 / 24) and r["png_val"]["n_stuff,none"] == 1
    assert res["primary_metric"]["png_val"] == "ar" and res["primary_metric"]["refcoco_val"] == "ciou"
    assert all(Path(p).is_file() for p in res["artifacts"]["refcoco_val"]["overlays"])
