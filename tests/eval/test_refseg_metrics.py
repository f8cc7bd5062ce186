"""Referring-segmentation metrics: against a direct NumPy computation, against pycocotools' mask IoU, PNG's average
recall against the official numerical integral, and batch-split / merge equal to one pass."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_api

from eval.refseg import PREC_THRESHOLDS, RefSegMetric, average_recall, decode_mask, encode_mask, mask_iou


def _f(d):
    return {k: float(v) for k, v in d.items()}


def _random_pairs(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Overlapping random blobs of varied sizes, with an empty prediction and an empty pair among them."""
    rng = np.random.default_rng(seed)
    preds, targets, kinds = [], [], []
    yy, xx = np.mgrid[:40, :48]
    for k in range(n):
        cx, cy, r = rng.uniform(8, 40), rng.uniform(8, 32), rng.uniform(2, 14)
        target = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        dx, dy, dr = rng.normal(0, 3), rng.normal(0, 3), rng.uniform(0.6, 1.4)
        pred = (xx - cx - dx) ** 2 + (yy - cy - dy) ** 2 < (r * dr) ** 2
        if k == 3:
            pred[:] = False
        if k == 5:
            pred[:], target[:] = False, False
        preds.append(pred)
        targets.append(target)
        kinds.append(("attribute", "relation")[k % 2])
    return preds, targets, kinds


def _numpy_reference(preds, targets, kinds) -> dict[str, float]:
    inter = np.array([np.logical_and(p, t).sum() for p, t in zip(preds, targets)], dtype=np.float64)
    union = np.array([np.logical_or(p, t).sum() for p, t in zip(preds, targets)], dtype=np.float64)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    ref = {"ciou": inter.sum() / union.sum(), "miou": iou.mean(),
           "giou": np.where(union > 0, iou, 1.0).mean()}  # fmt: skip
    for t in PREC_THRESHOLDS:
        ref[f"prec@{t}"] = (iou >= t).mean()
    for kind in ("attribute", "relation"):
        sel = np.array([k == kind for k in kinds])
        ref[f"{kind}/ciou"] = inter[sel].sum() / union[sel].sum()
        ref[f"{kind}/miou"] = iou[sel].mean()
    return ref


def test_metric_equals_a_direct_numpy_computation() -> None:
    preds, targets, kinds = _random_pairs(24)
    m = RefSegMetric(groups=("attribute", "relation"))
    counts = [mask_iou(p, t) for p, t in zip(preds, targets)]
    m.update([c[0] for c in counts], [c[1] for c in counts], [[k] for k in kinds])
    out = _f(m.compute())
    ref = _numpy_reference(preds, targets, kinds)
    for key, value in ref.items():  # the metric reports percent
        assert out[key] == pytest.approx(100 * value, abs=1e-10), key
    assert out["n_samples"] == 24 and out["n_attribute"] == 12 and out["n_relation"] == 12
    assert 30 < out["ciou"] < 95 and out["giou"] > out["miou"]  # the empty pair counts 1 only in gIoU


def test_per_sample_iou_equals_pycocotools() -> None:
    preds, targets, _ = _random_pairs(12, seed=1)
    for pred, target in zip(preds, targets):
        i, u = mask_iou(pred, target)
        rle_p = mask_api.encode(np.asfortranarray(pred.astype(np.uint8)))
        rle_t = mask_api.encode(np.asfortranarray(target.astype(np.uint8)))
        coco = float(mask_api.iou([rle_p], [rle_t], [0])[0, 0])  # empty vs empty: pycocotools gives 0, as mIoU
        assert (i / u if u else 0.0) == pytest.approx(coco, abs=1e-12)
        assert i == int(mask_api.area(mask_api.merge([rle_p, rle_t], intersect=True)))
        assert u == int(mask_api.area(mask_api.merge([rle_p, rle_t])))


def test_rle_round_trip_through_pycocotools() -> None:
    preds, _, _ = _random_pairs(4, seed=2)
    for pred in preds:
        rle = encode_mask(pred)
        assert isinstance(rle["counts"], str) and rle["size"] == [40, 48]
        assert np.array_equal(decode_mask(rle), pred)


def test_batch_split_and_merge_equal_one_pass() -> None:
    preds, targets, kinds = _random_pairs(20, seed=3)
    counts = [mask_iou(p, t) for p, t in zip(preds, targets)]
    inter, union, groups = [c[0] for c in counts], [c[1] for c in counts], [[k] for k in kinds]
    whole = RefSegMetric(groups=("attribute", "relation"))
    whole.update(inter, union, groups)
    batched = RefSegMetric(groups=("attribute", "relation"))
    for s in range(0, 20, 7):
        batched.update(inter[s : s + 7], union[s : s + 7], groups[s : s + 7])
    a, b = RefSegMetric(groups=("attribute", "relation")), RefSegMetric(groups=("attribute", "relation"))
    a.update(inter[::2], union[::2], groups[::2])  # two "processes" with strided shards
    b.update(inter[1::2], union[1::2], groups[1::2])
    a.merge_state(b)
    assert _f(batched.compute()) == pytest.approx(_f(whole.compute()), abs=1e-12)
    assert _f(a.compute()) == pytest.approx(_f(whole.compute()), abs=1e-12)


def test_average_recall_equals_the_official_integral() -> None:
    """PNG: thresholds np.arange(0, 1, 1e-5), recall(t) = mean(IoU >= t), left Riemann sum over all but the last."""
    ious = np.array([0.0, 1.0, 0.5, 0.73210, 0.123456789, 0.99999, 0.3333333])
    thresholds = np.arange(0, 1, 1e-5)
    recall = (ious[None, :] >= thresholds[:, None]).mean(1)
    official = float(sum(1e-5 * recall[k] for k in range(len(thresholds) - 1)))
    assert average_recall(ious) == pytest.approx(official, abs=1e-9)
    assert abs(average_recall(ious) - ious.mean()) < 2e-5
    m = RefSegMetric()
    m.update([int(round(x * 10**7)) for x in ious], [10**7] * len(ious))
    assert float(m.compute()["ar"]) == pytest.approx(100 * official, abs=1e-7)  # percent


def test_hand_worked_numbers() -> None:
    m = RefSegMetric()
    m.update([3, 0, 8], [4, 5, 10])  # IoUs 0.75, 0, 0.8
    out = _f(m.compute())
    assert out["ciou"] == pytest.approx(100 * 11 / 19)  # percent
    assert out["miou"] == pytest.approx(100 * (0.75 + 0.8) / 3)
    assert out["prec@0.5"] == pytest.approx(100 * 2 / 3) and out["prec@0.8"] == pytest.approx(100 / 3)
    assert out["prec@0.9"] == 0.0


def test_bad_input_is_refused() -> None:
    m = RefSegMetric(groups=("relation",))
    with pytest.raises(ValueError, match="unknown group"):
        m.update([1], [2], [["colour"]])
    with pytest.raises(ValueError, match="exceeds union"):
        m.update([3], [2])
    with pytest.raises(ValueError, match="differ in size"):
        mask_iou(np.zeros((2, 3), bool), np.zeros((3, 2), bool))
