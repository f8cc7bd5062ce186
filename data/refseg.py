"""Referring-expression segmentation data: the synthetic world as a split (ShapesRefSeg) and readers for the official
formats (RefCOCO / RefCOCO+ / RefCOCOg in the ``refer`` layout and as parquet, Panoptic Narrative Grounding).

Every reader yields :class:`RefSegSample` (an image or its path, one expression, the target mask as a decoder, a
kind for per-group reporting). Masks are decoded with ``pycocotools`` (polygons are merged into one RLE, as mmdet's
``_poly2mask`` does, so the mask is strictly 0/1); nothing here writes RLE by hand.

ShapesRefSeg: per scene, the world's own referring expressions (``kind="attribute"``: "the red circle", "the small
square"; ``kind="position"``: "the circle on the left") plus **relation** expressions (``kind="relation"``): "the
circle to the left of the blue square". A relation expression is made only where it is needed: the target's shorter
description (its shape, or its colour, optionally with its size) also fits another object, and the relation to an
anchor object (named by its unique colour and shape) holds for the target and for none of the others, so the
object cannot be picked without reading the relation. "Left of" means the target's box ends before the anchor's
begins (boxes apart on that axis), so there is never a judgement call.

RefCOCO family (``read_refcoco``): ``<root>/<dataset>/refs(<split_by>).p`` + ``instances.json``; one sample per
referred object with its first sentence (F-LMM's ``select_first``) or one per sentence (``per_sentence=True``,
LISA's protocol); images from ``<image_root>/<images[].file_name>``. The pickle is read by
:func:`load_refs_pickle`, a restricted unpickler that accepts only plain containers (list, dict, str, int, float,
bool, None, tuple, bytes): any opcode that would import or call something (GLOBAL, STACK_GLOBAL, REDUCE, BUILD, INST,
OBJ, NEWOBJ) is refused before anything is built. ``read_refcoco_parquet``: the evaluation-harness copies
(``lmms-lab/RefCOCO*``: ``question_id``, ``image`` bytes, ``answer`` list, flat ``segmentation`` polygon, ``bbox``).

PNG (``read_png``): ``png_coco_<split>2017.json`` narratives + COCO ``panoptic_<split>2017.json`` + the panoptic
PNGs; one sample per grounded segment (F-LMM's unit), the mask being the union of its panoptic segments (segment id =
R + 256 G + 256^2 B, computed in int32); kinds ``thing``/``stuff`` and ``singular``/``plural`` (every plural counts
as thing, as F-LMM scores it).
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.shapes import Scene, ShapeObject, ShapesWorld, WorldConfig

__all__ = [
    "RefSegSample",
    "ShapesRefSeg",
    "relation_expressions",
    "shapes_refseg_samples",
    "UnsafePickleError",
    "load_refs_pickle",
    "polygons_to_mask",
    "rle_to_mask",
    "read_refcoco",
    "read_refcoco_parquet",
    "read_png",
    "REFCOCO_SPLIT_BY",
]

# The split file each dataset is evaluated with (F-LMM, LISA): RefCOCO and RefCOCO+ "unc", RefCOCOg "umd".
REFCOCO_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


@dataclass(frozen=True, kw_only=True)
class RefSegSample:
    """One (image, expression) -> mask pair.

    Attributes:
        sample_id: unique within its split.
        image: a PIL image, a path, or encoded bytes.
        text: the referring expression (or narrative segment).
        mask: a zero-argument callable returning the ``H x W`` bool mask (readers stay lazy).
        kind: the group it is reported in (``attribute`` / ``position`` / ``relation``; ``thing`` / ``stuff``...).
        fields: anything else (category, plural flag, all sentences of the object, ...).
        source: ``file:record`` for error messages.
    """

    sample_id: str
    image: Any
    text: str
    mask: Callable[[], np.ndarray]
    kind: str = "all"
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def load_image(self) -> Image.Image:
        img = self.image
        if isinstance(img, Image.Image):
            return img.convert("RGB")
        if isinstance(img, bytes | bytearray):
            return Image.open(io.BytesIO(img)).convert("RGB")
        path = Path(img)
        if not path.is_file():
            raise FileNotFoundError(f"{self.source}: image file {path} does not exist (check the image root)")
        with Image.open(path) as im:
            return im.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# ShapesRefSeg
# ----------------------------------------------------------------------------------------------------------------

_RELATIONS = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}


def _holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    """Whether ``a`` is ``relation`` of ``b`` with their boxes apart on that axis (bbox ends are exclusive)."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return {"left": ax1 <= bx0, "right": ax0 >= bx1, "above": ay1 <= by0, "below": ay0 >= by1}[relation]


def relation_expressions(objects: Sequence[ShapeObject]) -> list[tuple[str, int]]:
    """``(text, target index)`` for every relation expression the object list needs (see the module docstring)."""
    out: list[tuple[str, int]] = []
    for i, target in enumerate(objects):
        descriptions = [
            ((target.shape,), lambda o, t=target: o.shape == t.shape),
            ((target.color, "object"), lambda o, t=target: o.color == t.color),
            ((target.size, target.shape), lambda o, t=target: o.shape == t.shape and o.size == t.size),
        ]
        for words, fits in descriptions:
            rivals = [k for k, o in enumerate(objects) if k != i and fits(o)]
            if not rivals:
                continue  # the description alone names the target: no relation is needed
            for j, anchor in enumerate(objects):
                if j == i or j in rivals:
                    continue
                for relation, phrase in _RELATIONS.items():
                    if _holds(relation, target, anchor) and not any(_holds(relation, objects[k], anchor) for k in rivals):
                        out.append((f"the {' '.join(words)} {phrase} the {anchor.color} {anchor.shape}", i))
                        break  # one relation per (description, anchor)
    return out


def _kind(text: str) -> str:
    return "position" if any(w in text.split() for w in ("left", "right", "top", "bottom")) else "attribute"


def shapes_refseg_samples(scene: Scene) -> list[tuple[str, int, str]]:
    """``(text, object index, kind)`` of a scene: its own referring expressions, then the relation expressions."""
    own = [(r.text, r.object_index, _kind(r.text)) for r in scene.refexps]
    return own + [(text, i, "relation") for text, i in relation_expressions(scene.objects)]


class ShapesRefSeg:
    """The synthetic world's referring segmentation split: a map-style dataset of :class:`RefSegSample`.

    Samples are indexed once (scene by scene, in order); each item regenerates its scene (a pure function of
    ``(config, split, index)``), so the dataset holds no pixels.
    """

    def __init__(self, world: ShapesWorld | WorldConfig, split: str, num_scenes: int, start: int = 0) -> None:
        self.world = world if isinstance(world, ShapesWorld) else ShapesWorld(world)
        self.split = split
        self.index: list[tuple[int, str, int, str]] = []
        for scene in self.world.iter_scenes(split, num_scenes, start=start):
            self.index += [(scene.index, text, obj, kind) for text, obj, kind in shapes_refseg_samples(scene)]

    def __len__(self) -> int:
        return len(self.index)

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for *_, kind in self.index:
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def __getitem__(self, i: int) -> RefSegSample:
        scene_index, text, obj, kind = self.index[i]
        scene = self.world.scene(scene_index, self.split)
        mask = scene.objects[obj].mask
        return RefSegSample(
            sample_id=f"{scene.id}:{obj}:{text}",
            image=scene.image,
            text=text,
            mask=lambda: mask,
            kind=kind,
            fields={"scene": scene.id, "object_index": obj,
                    "all_objects": [o.mask for o in scene.objects]},
            source=f"{scene.id}:{text!r}",
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# pycocotools masks
# ----------------------------------------------------------------------------------------------------------------


def _mask_api() -> Any:
    try:
        from pycocotools import mask as mask_api
    except ImportError as e:  # a declared dependency; a clear message if the install is broken
        raise ImportError("pycocotools is needed to decode COCO masks: pip install pycocotools") from e
    return mask_api


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons (a list of flat ``[x1, y1, x2, y2, ...]`` lists) -> ``H x W`` bool: per-polygon RLEs merged
    (union), then decoded, as mmdet's ``_poly2mask``. A polygon of fewer than 3 points is an error (pycocotools would
    read a 4-number list as a box)."""
    mask_api = _mask_api()
    polys = [list(map(float, p)) for p in polygons]
    bad = [k for k, p in enumerate(polys) if len(p) < 6 or len(p) % 2]
    if not polys or bad:
        raise ValueError(f"polygons {bad or '[]'} need an even number (>= 6) of coordinates")
    rle = mask_api.merge(mask_api.frPyObjects(polys, height, width))
    return mask_api.decode(rle).astype(bool)


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (compressed string / bytes counts, or an uncompressed list of counts) -> ``H x W`` bool."""
    mask_api = _mask_api()
    h, w = (int(x) for x in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_api.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    elif isinstance(counts, str):
        rle = {"size": [h, w], "counts": counts.encode("ascii")}
    return mask_api.decode(rle).astype(bool)


def _segmentation_mask(seg: Any, height: int, width: int, where: str) -> np.ndarray:
    if isinstance(seg, dict) and "counts" in seg:
        return rle_to_mask(seg)
    if isinstance(seg, list) and seg and isinstance(seg[0], list | tuple):
        return polygons_to_mask(seg, height, width)
    if isinstance(seg, list | tuple) and seg and isinstance(seg[0], int | float):
        return polygons_to_mask([seg], height, width)  # one flat polygon (the parquet copies)
    raise ValueError(f"{where}: field 'segmentation' is neither polygons nor an RLE (got {type(seg).__name__})")


# ----------------------------------------------------------------------------------------------------------------
# The refs pickle, read without executing anything
# ----------------------------------------------------------------------------------------------------------------


class UnsafePickleError(ValueError):
    """A pickle asked to import or call something; the file is refused."""


# Opcodes that import a name or call / construct an object. Plain containers never need them.
_FORBIDDEN_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1",
                      "EXT2", "EXT4", "PERSID", "BINPERSID"}  # fmt: skip


class _ContainersOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # a second line of defence behind the opcode scan
        raise UnsafePickleError(f"the pickle wants the global {module}.{name}; only plain containers are accepted")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("the pickle holds a persistent id; only plain containers are accepted")


def load_refs_pickle(path: str | Path) -> Any:
    """Load a ``refs(*).p`` file holding only lists, dicts, strings, numbers, booleans and None.

    Every opcode is scanned first (``pickletools.genops``); one that would import or call something is refused with
    :class:`UnsafePickleError` naming it, its byte offset and, for a global, what it names, before anything is
    built. Python-2 strings are read as UTF-8 text (``encoding="utf-8"``) rather than the ASCII default.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name in _FORBIDDEN_OPCODES:
                what = f" ({arg})" if arg is not None else ""
                raise UnsafePickleError(
                    f"{path}: refused: opcode {op.name}{what} at byte {pos} would import or call code; a refs "
                    "file holds only plain containers"
                )
    except (ValueError, EOFError) as e:
        if isinstance(e, UnsafePickleError):
            raise
        raise ValueError(f"{path}: not a valid pickle ({e})") from None
    return _ContainersOnly(io.BytesIO(data), encoding="utf-8").load()


# ----------------------------------------------------------------------------------------------------------------
# RefCOCO / RefCOCO+ / RefCOCOg
# ----------------------------------------------------------------------------------------------------------------


def _require(record: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    return record[key]


def read_refcoco(
    root: str | Path,
    dataset: str,
    split: str,
    image_root: str | Path,
    split_by: str | None = None,
    per_sentence: bool = False,
) -> list[RefSegSample]:
    """Samples of ``<root>/<dataset>/refs(<split_by>).p`` whose ``split`` equals ``split`` exactly (mmdet's rule).

    ``split_by`` defaults to the dataset's evaluation split file (``REFCOCO_SPLIT_BY``). Masks come from the
    annotation the ref names (``ann_id``) in ``instances.json``; sentences are ``sent`` (the cleaned lower-case text).
    """
    split_by = split_by or REFCOCO_SPLIT_BY.get(dataset)
    if split_by is None:
        raise ValueError(f"no default split_by for dataset {dataset!r}; pass split_by (unc, umd, google, ...)")
    folder = Path(root) / dataset
    refs_path, inst_path = folder / f"refs({split_by}).p", folder / "instances.json"
    for p in (refs_path, inst_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist (expected the refer layout: <root>/{dataset}/...)")
    refs = load_refs_pickle(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    instances = json.loads(inst_path.read_text())
    images = {int(_require(im, "id", f"{inst_path}:images[{k}]")): im
              for k, im in enumerate(_require(instances, "images", str(inst_path)))}  # fmt: skip
    anns = {int(_require(a, "id", f"{inst_path}:annotations[{k}]")): a
            for k, a in enumerate(_require(instances, "annotations", str(inst_path)))}  # fmt: skip
    out: list[RefSegSample] = []
    for k, ref in enumerate(refs):
        where = f"{refs_path}:{k}"
        if _require(ref, "split", where) != split:
            continue
        ann_id, image_id = int(_require(ref, "ann_id", where)), int(_require(ref, "image_id", where))
        if ann_id not in anns:
            raise ValueError(f"{where}: ann_id {ann_id} is not in {inst_path}")
        if image_id not in images:
            raise ValueError(f"{where}: image_id {image_id} is not in {inst_path}")
        ann, info = anns[ann_id], images[image_id]
        sentences = [_require(s, "sent", f"{where}:sentences[{j}]") for j, s in enumerate(_require(ref, "sentences", where))]
        if not sentences:
            raise ValueError(f"{where}: field 'sentences' is empty")
        h, w = int(_require(info, "height", where)), int(_require(info, "width", where))
        seg = _require(ann, "segmentation", f"{inst_path}:annotation {ann_id}")

        def mask(seg: Any = seg, h: int = h, w: int = w, where: str = f"{inst_path}:annotation {ann_id}") -> np.ndarray:
            return _segmentation_mask(seg, h, w, where)

        image = Path(image_root) / _require(info, "file_name", where)
        texts = sentences if per_sentence else sentences[:1]
        for j, text in enumerate(texts):
            out.append(RefSegSample(
                sample_id=f"{ref.get('ref_id', k)}" + (f":{j}" if per_sentence else ""),
                image=image, text=text, mask=mask, kind=split,
                fields={"ref_id": ref.get("ref_id"), "ann_id": ann_id, "image_id": image_id,
                        "category_id": ref.get("category_id"), "sentences": sentences},
                source=where,
            ))  # fmt: skip
    return out


def read_refcoco_parquet(path: str | Path, per_sentence: bool = False) -> list[RefSegSample]:
    """The evaluation-harness parquet copies (``lmms-lab/RefCOCO*``): one row per ref with the image bytes, the
    ``answer`` list of expressions and one flat polygon ``segmentation`` in pixels."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading parquet needs pyarrow: pip install 'mmzoo[parquet]'") from e
    path = Path(path)
    rows = pq.read_table(path).to_pylist()
    out: list[RefSegSample] = []
    for k, row in enumerate(rows):
        where = f"{path}:{k}"
        image = _require(row, "image", where)
        data = image.get("bytes") if isinstance(image, dict) else image
        if not isinstance(data, bytes | bytearray):
            raise ValueError(f"{where}: field 'image' holds no encoded image bytes")
        answers = _require(row, "answer", where)
        if isinstance(answers, str):
            answers = [answers]
        if not answers:
            raise ValueError(f"{where}: field 'answer' is empty")
        seg = _require(row, "segmentation", where)

        def mask(seg: Any = seg, data: bytes = data, where: str = where) -> np.ndarray:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            return _segmentation_mask(list(seg), h, w, where)

        for j, text in enumerate(answers if per_sentence else answers[:1]):
            out.append(RefSegSample(
                sample_id=f"{row.get('question_id', k)}" + (f":{j}" if per_sentence else ""),
                image=bytes(data), text=text, mask=mask,
                fields={"bbox": row.get("bbox"), "file_name": row.get("file_name"), "sentences": list(answers)},
                source=where,
            ))  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------
# Panoptic Narrative Grounding
# ----------------------------------------------------------------------------------------------------------------


def _segment_ids(png_path: Path) -> np.ndarray:
    with Image.open(png_path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.int32)  # int32 first: uint8 * 256 overflows
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def read_png(
    narratives: str | Path, panoptic_json: str | Path, panoptic_dir: str | Path, image_root: str | Path
) -> list[RefSegSample]:
    """One sample per narrative segment with panoptic ``segment_ids`` (F-LMM's unit); see the module docstring."""
    narratives, panoptic_json = Path(narratives), Path(panoptic_json)
    records = json.loads(narratives.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{narratives}: expected a list of narratives, got {type(records).__name__}")
    panoptic = json.loads(panoptic_json.read_text())
    isthing = {int(c["id"]): bool(c.get("isthing", 1)) for c in _require(panoptic, "categories", str(panoptic_json))}
    per_image: dict[int, dict[str, Any]] = {}
    for k, ann in enumerate(_require(panoptic, "annotations", str(panoptic_json))):
        where = f"{panoptic_json}:annotations[{k}]"
        per_image[int(_require(ann, "image_id", where))] = {
            "file_name": _require(ann, "file_name", where),
            "categories": {int(s["id"]): int(s["category_id"]) for s in _require(ann, "segments_info", where)},
        }
    out: list[RefSegSample] = []
    for k, rec in enumerate(records):
        where = f"{narratives}:{k}"
        image_id = int(_require(rec, "image_id", where))
        if image_id not in per_image:
            raise ValueError(f"{where}: image_id {image_id} has no annotation in {panoptic_json}")
        ann = per_image[image_id]
        for j, seg in enumerate(_require(rec, "segments", where)):
            swhere = f"{where}:segments[{j}]"
            ids = [int(x) for x in _require(seg, "segment_ids", swhere)]
            if not ids:
                continue
            unknown = [i for i in ids if i not in ann["categories"]]
            if unknown:
                raise ValueError(f"{swhere}: segment_ids {unknown} are not segments of image {image_id}")
            plural = bool(seg.get("plural", False))
            thing = plural or isthing.get(ann["categories"][ids[0]], True)
            png_path = Path(panoptic_dir) / ann["file_name"]

            def mask(ids: list[int] = ids, png_path: Path = png_path, where: str = swhere) -> np.ndarray:
                if not png_path.is_file():
                    raise FileNotFoundError(f"{where}: panoptic PNG {png_path} does not exist")
                return np.isin(_segment_ids(png_path), ids)

            out.append(RefSegSample(
                sample_id=f"{image_id}:{j}", image=Path(image_root) / f"{image_id:012d}.jpg",
                text=_require(seg, "utterance", swhere), mask=mask, kind="thing" if thing else "stuff",
                fields={"plural": plural, "segment_ids": ids, "noun": bool(seg.get("noun", True))},
                source=swhere,
            ))  # fmt: skip
    return out

