"""Referring segmentation benchmarks: metrics, readers, the ``segment`` output type, the ``refseg`` scorer and
mask overlays.

Metrics (:class:`RefSegMetric`, a torchmetrics ``Metric`` whose states are sums, so batches split over processes or
steps merge exactly), for binary masks compared with their ground truth:

* ``ciou``: cumulative IoU, sum of intersections / sum of unions over the split (LISA, GLaMM, mmdet ``RefSegMetric``;
  LAVT's "overall IoU").
* ``miou``: mean per-sample IoU with IoU = 0 where the union is empty (mmdet ``RefSegMetric``, F-LMM's mIoU).
* ``giou``: LISA's name for the mean per-sample IoU, which counts an empty prediction of an empty target as 1.
* ``prec@0.5`` ... ``prec@0.9``: share of samples with IoU >= the threshold (LAVT).
* ``ar``: Panoptic Narrative Grounding's average recall, the area under "share of samples with IoU >= t" over
  ``t = np.arange(0, 1, 1e-5)`` summed as the official left Riemann sum (the last threshold unused). Summed per
  sample instead of per threshold: ``(1e-5 / N) * sum_i #{k <= 99998 : t_k <= IoU_i}``, counted on the same
  ``arange`` values so floating-point ties fall as in the official code (within 1e-5 of the mean IoU).
Each of cIoU and mIoU is also given per group (``<group>/ciou``, ``<group>/miou``, counts ``n_<group>``) for the groups fixed at construction (ShapesRefSeg's
``attribute`` / ``position`` / ``relation``; PNG's ``thing`` / ``stuff``, plurals counted as things). Values are
percentages (0-100), as the papers' tables print them and as every accuracy-like number in mmzoo is reported; the
overlay captions and ``zoo ground`` print the sample's IoU in percent too; only the per-sample ``score`` of the samples
file stays in [0, 1], as every task's per-sample score does.

Tasks (YAML under ``eval/tasks/refseg/``): ``shapes_refseg`` (the synthetic test split), ``refcoco_val`` and the
other RefCOCO / RefCOCO+ / RefCOCOg splits (the ``refer`` layout), ``refcoco_parquet`` (the harness copies) and
``png_val``. A model answers them through ``ground(images, expressions) -> [H x W probabilities]`` (F-LMM); the
prediction is ``probability > 0.5``. :class:`ObjectUnionBaseline` ignores the expression and predicts the union of
all objects of the scene: the floor a grounding model has to clear. The first ``overlays`` samples are drawn
(image, predicted mask in red, ground-truth outline in green, the expression and IoU) and written as PNGs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchmetrics import Metric

from eval.registry import Doc, TaskSpec, register_output_type, register_reader, register_scorer
from eval.scorers import Scorer

__all__ = [
    "RefSegMetric",
    "PREC_THRESHOLDS",
    "mask_iou",
    "average_recall",
    "encode_mask",
    "decode_mask",
    "overlay",
    "ObjectUnionBaseline",
]

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
_AR_STEP = 1e-5
# The official thresholds; the left Riemann sum uses all but the last.
_AR_THRESHOLDS = np.arange(0, 1, _AR_STEP)[:-1]


def _ar_steps(iou: float | np.ndarray) -> np.ndarray:
    """How many of the official thresholds each IoU reaches (its recall steps)."""
    return np.searchsorted(_AR_THRESHOLDS, iou, side="right")


def mask_iou(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts of two boolean masks of one shape."""
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in size")
    return int(np.logical_and(pred, target).sum()), int(np.logical_or(pred, target).sum())


def average_recall(ious: Sequence[float] | np.ndarray) -> float:
    """PNG's average recall of per-sample IoUs (closed form of the official numerical integral)."""
    ious = np.asarray(ious, dtype=np.float64)
    if ious.size == 0:
        return 0.0
    return float(_AR_STEP * _ar_steps(ious).sum() / ious.size)


class RefSegMetric(Metric):
    """cIoU, mIoU, gIoU, precision at IoU thresholds and PNG average recall, overall and per group (see module doc).

    ``update(intersections, unions, groups)`` takes per-sample pixel counts (``mask_iou``) and, per sample, the
    groups it belongs to (names from ``groups``; others are an error).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, groups: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups = tuple(groups)
        g = len(self.groups) + 1  # row 0: all samples
        for name in ("inter", "union", "iou_sum", "giou_sum", "ar_steps", "count"):
            self.add_state(name, default=torch.zeros(g, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hits", default=torch.zeros(g, len(PREC_THRESHOLDS), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, intersections: Sequence[int], unions: Sequence[int], groups: Sequence[Sequence[str]] = ()) -> None:
        groups = list(groups) or [()] * len(intersections)
        if not len(intersections) == len(unions) == len(groups):
            raise ValueError(f"{len(intersections)} intersections, {len(unions)} unions, {len(groups)} group lists")
        for i, u, names in zip(intersections, unions, groups):
            unknown = [n for n in names if n not in self.groups]
            if unknown:
                raise ValueError(f"unknown group(s) {unknown}; this metric was built with {list(self.groups)}")
            if i > u or i < 0:
                raise ValueError(f"intersection {i} exceeds union {u}")
            iou = i / u if u > 0 else 0.0
            rows = [0] + [1 + self.groups.index(n) for n in names]
            self.inter[rows] += float(i)
            self.union[rows] += float(u)
            self.iou_sum[rows] += iou
            self.giou_sum[rows] += iou if u > 0 else 1.0
            self.ar_steps[rows] += float(_ar_steps(iou))
            self.count[rows] += 1
            self.hits[rows] += torch.tensor([float(iou >= t) for t in PREC_THRESHOLDS], dtype=torch.float64)

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        n = self.count.clamp(min=1)
        for row, prefix in enumerate(["", *(f"{g}/" for g in self.groups)]):
            out[f"{prefix}ciou"] = 100 * self.inter[row] / self.union[row].clamp(min=1)
            out[f"{prefix}miou"] = 100 * self.iou_sum[row] / n[row]
            if not prefix:
                out["giou"] = 100 * self.giou_sum[0] / n[0]
                out["ar"] = 100 * _AR_STEP * self.ar_steps[0] / n[0]
                for k, t in enumerate(PREC_THRESHOLDS):
                    out[f"prec@{t}"] = 100 * self.hits[0, k] / n[0]
            out[f"n_{prefix.rstrip('/') or 'samples'}"] = self.count[row]
        return out


# ---------------------------------------------------------------------------------------------------------------
# masks as compressed COCO RLE (JSON-able targets) and overlays
# ---------------------------------------------------------------------------------------------------------------


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """``H x W`` bool -> compressed COCO RLE with ``counts`` as ASCII text (pycocotools)."""
    from pycocotools import mask as mask_api

    rle = mask_api.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    from data.refseg import rle_to_mask

    return rle_to_mask(rle)


def overlay(image: Image.Image, pred: np.ndarray, target: np.ndarray | None = None, text: str = "",
            scale: int = 1) -> Image.Image:  # fmt: skip
    """The image with the prediction filled in translucent red, the ground truth outlined in green and ``text``
    written underneath; ``scale`` enlarges small images (nearest neighbour, so pixels stay visible)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    pred = np.asarray(pred, dtype=bool)
    base[pred] = 0.45 * base[pred] + 0.55 * np.array([255.0, 0.0, 0.0])
    if target is not None:
        t = np.asarray(target, dtype=bool)
        inner = t.copy()
        inner[1:, :] &= t[:-1, :]
        inner[:-1, :] &= t[1:, :]
        inner[:, 1:] &= t[:, :-1]
        inner[:, :-1] &= t[:, 1:]
        base[t & ~inner] = (0.0, 255.0, 0.0)
    pic = Image.fromarray(base.astype(np.uint8))
    if scale > 1:
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.Resampling.NEAREST)
    if not text:
        return pic
    canvas = Image.new("RGB", (pic.width, pic.height + 14), (255, 255, 255))
    canvas.paste(pic, (0, 0))
    ImageDraw.Draw(canvas).text((2, pic.height + 1), text, fill=(0, 0, 0))
    return canvas


# ---------------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------------


def _docs(samples: Sequence[Any], task: str, union: bool = False) -> list[Doc]:
    """``data.refseg.RefSegSample`` s -> documents: the target is the mask as RLE and the sample's kind."""
    docs = []
    for s in samples:
        fields: dict[str, Any] = {"kind": s.kind, **{k: v for k, v in s.fields.items() if k != "all_objects"}}
        if union:
            fields["union_rle"] = encode_mask(np.logical_or.reduce(s.fields["all_objects"]))
        docs.append(Doc(doc_id=s.sample_id, question=s.text, target={"mask": encode_mask(s.mask()), "kind": s.kind},
                        image=s.image, fields=fields, source=f"{task}:{s.source}"))  # fmt: skip
    return docs


def _args(spec: TaskSpec, allowed: dict[str, Any]) -> dict[str, Any]:
    args = {**allowed, **dict(spec.reader_args)}
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(f"task {spec.name!r}: unknown reader_args {unknown}; allowed: {sorted(allowed)}")
    return args


@register_reader("shapes_refseg")
def shapes_refseg_reader(spec: TaskSpec, files: dict[str, Path]) -> list[Doc]:
    from data.refseg import ShapesRefSeg
    from data.shapes import WorldConfig

    args = _args(spec, {"num_scenes": 200, "image_size": 64, "seed": 0})
    ds = ShapesRefSeg(WorldConfig(image_size=int(args["image_size"]), seed=int(args["seed"])), spec.split,
                      int(args["num_scenes"]))  # fmt: skip
    return _docs([ds[i] for i in range(len(ds))], spec.name, union=True)


@register_reader("refcoco")
def refcoco_reader(spec: TaskSpec, files: dict[str, Path]) -> list[Doc]:
    from data.refseg import read_refcoco

    args = _args(spec, {"dataset": "refcoco", "split_by": None, "per_sentence": False})
    if "root" not in files or "images" not in files:
        raise ValueError(f"task {spec.name!r}: files needs 'root' (holding <dataset>/refs(*).p) and 'images'")
    samples = read_refcoco(files["root"], args["dataset"], spec.split, files["images"], args["split_by"],
                           bool(args["per_sentence"]))  # fmt: skip
    return _docs(samples, spec.name)


@register_reader("refcoco_parquet")
def refcoco_parquet_reader(spec: TaskSpec, files: dict[str, Path]) -> list[Doc]:
    from data.refseg import read_refcoco_parquet

    args = _args(spec, {"per_sentence": False})
    if "parquet" not in files:
        raise ValueError(f"task {spec.name!r}: files needs 'parquet'")
    return _docs(read_refcoco_parquet(files["parquet"], bool(args["per_sentence"])), spec.name)


@register_reader("png")
def png_reader(spec: TaskSpec, files: dict[str, Path]) -> list[Doc]:
    from data.refseg import read_png

    missing = sorted({"narratives", "panoptic_json", "panoptic_dir", "images"} - set(files))
    if missing:
        raise ValueError(f"task {spec.name!r}: files needs {missing}")
    samples = read_png(files["narratives"], files["panoptic_json"], files["panoptic_dir"], files["images"])
    return _docs(samples, spec.name)


# ---------------------------------------------------------------------------------------------------------------
# the model call and the scorer
# ---------------------------------------------------------------------------------------------------------------


class ObjectUnionBaseline:
    """Ignores the expression: predicts the union of every object in the scene (ShapesRefSeg documents carry it)."""

    def ground_docs(self, docs: Sequence[Doc]) -> list[np.ndarray]:
        missing = [d.source for d in docs if "union_rle" not in d.fields]
        if missing:
            raise ValueError(f"{missing[0]}: no 'union_rle' field; the union baseline runs on ShapesRefSeg only")
        return [decode_mask(d.fields["union_rle"]).astype(np.float32) for d in docs]


@register_output_type("segment")
def segment(model: Any, docs: Sequence[Doc], prompts: list[str], spec: TaskSpec) -> list[np.ndarray]:
    """Foreground probabilities per document from ``model.ground(images, expressions)``."""
    if hasattr(model, "ground_docs"):
        return model.ground_docs(docs)
    if not hasattr(model, "ground"):
        raise TypeError(f"task {spec.name!r} needs a grounding model (with ground(images, expressions)); "
                        f"got {type(model).__name__}")  # fmt: skip
    return model.ground([d.load_image() for d in docs], prompts)


@register_scorer("refseg")
class RefSegScorer(Scorer):
    """Binarises predictions at 0.5 and feeds :class:`RefSegMetric`; keeps the first ``overlays`` for pictures.

    ``groups``: the kinds reported separately (default: every kind among the documents); ``primary``: the headline
    metric (``ciou``; PNG: ``ar``); ``overlays``: how many pictures ``write_artifacts`` writes; ``overlay_scale``:
    their enlargement.
    """

    primary = "ciou"

    def build_metric(self, docs: Sequence[Doc]) -> Metric:
        self.primary = str(self.args.get("primary", "ciou"))
        groups = self.args.get("groups") or sorted({d.target["kind"] for d in docs if d.target})
        self.groups = tuple(groups)
        self._pictures: list[tuple[Doc, np.ndarray, np.ndarray, float]] = []
        return RefSegMetric(self.groups)

    def score(self, predictions: Sequence[np.ndarray], docs: Sequence[Doc]) -> list[dict[str, Any]]:
        inters, unions, groups, records = [], [], [], []
        for pred, doc in zip(predictions, docs, strict=True):
            if doc.target is None:
                raise ValueError(f"{doc.source}: no ground-truth mask")
            target = decode_mask(doc.target["mask"])
            binary = np.asarray(pred) > 0.5
            i, u = mask_iou(binary, target)
            iou = i / u if u else 0.0
            inters.append(i)
            unions.append(u)
            groups.append([doc.target["kind"]] if doc.target["kind"] in self.groups else [])
            records.append({"parsed": {"intersection": i, "union": u}, "score": iou})
            if len(self._pictures) < int(self.args.get("overlays", 8)):
                self._pictures.append((doc, binary, target, iou))
        self.metric.update(inters, unions, groups)
        return records

    def write_artifacts(self, out_dir: str | Path) -> dict[str, Any]:
        out = Path(out_dir) / f"overlays_{self.spec.name}"
        out.mkdir(parents=True, exist_ok=True)
        scale = int(self.args.get("overlay_scale", 4))
        paths = []
        for k, (doc, pred, target, iou) in enumerate(self._pictures):
            pic = overlay(doc.load_image(), pred, target, f"{doc.question} (IoU {100 * iou:.1f}%)", scale=scale)
            path = out / f"{k:02d}.png"
            pic.save(path)
            paths.append(str(path))
        return {"overlays": paths}
