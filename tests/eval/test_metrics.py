"""torchmetrics-based benchmark metrics: hand-worked numbers, batch and process aggregation, sklearn parity."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from eval.metrics import CircularAccuracy, GroupedAccuracy, MMEScore, PopeMetric


def _f(d):
    return {k: float(v) for k, v in d.items()}


def test_grouped_accuracy_hand_worked():
    m = GroupedAccuracy(groups=("yes/no", "number"))
    m.update([1.0, 0.3], [["yes/no"], ["number"]], [False, False])
    m.update([0.0, 0.6], [["number"], []], [True, False])
    out = _f(m.compute())
    assert out["accuracy"] == pytest.approx(100 * 1.9 / 4)
    assert out["accuracy_yes/no"] == pytest.approx(100.0)
    assert out["accuracy_number"] == pytest.approx(15.0)
    assert out["n_samples"] == 4 and out["n_unparsed"] == 1


def test_grouped_accuracy_rejects_undeclared_group():
    with pytest.raises(KeyError, match="'color'"):
        GroupedAccuracy(groups=("shape",)).update([1.0], [["color"]])


def test_grouped_accuracy_merges_like_processes():
    whole, a, b = (
        GroupedAccuracy(groups=("g",)),
        GroupedAccuracy(groups=("g",)),
        GroupedAccuracy(groups=("g",)),
    )
    scores, groups = [1.0, 0.0, 0.6, 0.3, 1.0], [["g"], [], ["g"], [], ["g"]]
    whole.update(scores, groups)
    a.update(scores[:2], groups[:2])
    b.update(scores[2:], groups[2:])
    a.merge_state(b)
    assert _f(a.compute()) == pytest.approx(_f(whole.compute()))


POPE_PREDS = ["Yes", "No.", "yes, there is", "There is no dog", "Sure", "not at all", "Yes", "no"]
POPE_LABELS = ["yes", "no", "no", "yes", "yes", "no", "yes", "yes"]


def test_pope_matches_sklearn():
    m = PopeMetric()
    m.update(POPE_PREDS, POPE_LABELS)
    out = _f(m.compute())
    # POPE parses: yes, no, yes, no, yes("Sure"), no, yes, no
    pred = [1, 0, 1, 0, 1, 0, 1, 0]
    gold = [1 if label == "yes" else 0 for label in POPE_LABELS]
    p, r, f1, _ = precision_recall_fscore_support(gold, pred, average="binary", pos_label=1)
    assert out["accuracy"] == pytest.approx(100 * accuracy_score(gold, pred))
    assert out["precision"] == pytest.approx(100 * p)
    assert out["recall"] == pytest.approx(100 * r)
    assert out["f1"] == pytest.approx(100 * f1)
    assert out["yes_ratio"] == pytest.approx(50.0)  # of predictions, not of labels
    assert out["n_unparsed"] == 1  # "Sure": no yes/no token, scored as POPE does (yes)


def test_pope_batches_and_merge_agree():
    whole = PopeMetric()
    whole.update(POPE_PREDS, POPE_LABELS)
    a, b = PopeMetric(), PopeMetric()
    for i in range(0, 8, 3):
        a.update(POPE_PREDS[i : i + 3], POPE_LABELS[i : i + 3])
    b.update([], [])
    a.merge_state(b)
    assert _f(a.compute()) == pytest.approx(_f(whole.compute()))


def test_pope_zero_denominators_are_zero():
    m = PopeMetric()
    m.update(["no", "no"], ["yes", "no"])
    out = _f(m.compute())
    assert out["precision"] == 0.0 and out["f1"] == 0.0 and out["yes_ratio"] == 0.0
    assert out["accuracy"] == 50.0


def test_mme_acc_plus_and_totals():
    m = MMEScore()
    # existence: image 0 both right, image 1 one right -> acc 75, acc+ 50, score 125
    m.update([True, True, True], ["existence"] * 3, [0, 0, 1])
    m.update([False], ["existence"], [1])
    # code_reasoning: one image, both wrong -> 0
    m.update([False, False], ["code_reasoning"] * 2, [0, 0])
    out = _f(m.compute())
    assert (
        out["existence_acc"] == 75.0 and out["existence_acc_plus"] == 50.0 and out["existence_score"] == 125.0
    )
    assert out["code_reasoning_score"] == 0.0
    assert out["perception"] == 125.0 and out["cognition"] == 0.0
    assert out["n_samples"] == 6


def test_mme_pair_with_three_answers_raises():
    m = MMEScore()
    m.update([True, True, True], ["count"] * 3, [4, 4, 4])
    with pytest.raises(ValueError, match="count.*\\[4\\]"):
        m.compute()


def test_mme_pair_cut_by_limit_counts_for_acc_only():
    m = MMEScore()
    m.update([True, True, True], ["scene"] * 3, [0, 0, 1])
    out = _f(m.compute())
    assert out["scene_acc"] == 100.0 and out["scene_acc_plus"] == 100.0 and out["n_incomplete_pairs"] == 1


def test_mme_merge_across_processes():
    a, b = MMEScore(), MMEScore()
    a.update([True], ["color"], [0])
    b.update([True, False, True], ["color"] * 3, [0, 1, 1])
    a.merge_state(b)
    out = _f(a.compute())
    assert out["color_acc"] == 75.0 and out["color_acc_plus"] == 50.0


def test_circular_accuracy_needs_every_copy():
    m = CircularAccuracy(categories=("ocr", "scene"), l2_categories=("perception",))
    # question 0: 4 copies all right; question 1: one copy wrong; question 2: 2 copies right
    m.update([True, True, True, True], [0, 0, 0, 0], ["ocr"] * 4, ["perception"] * 4)
    m.update([True, False, True], [1, 1, 1], ["scene"] * 3, ["perception"] * 3, unparsed=[False, True, False])
    m.update([True, True], [2, 2], ["scene"] * 2)
    out = _f(m.compute())
    assert out["circular_accuracy"] == pytest.approx(200 / 3)
    assert out["circular_accuracy_ocr"] == 100.0 and out["circular_accuracy_scene"] == 50.0
    assert out["circular_accuracy_l2_perception"] == 50.0  # questions 0 and 1
    assert out["n_questions"] == 3 and out["n_samples"] == 9 and out["n_unparsed"] == 1


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_empty_metrics_compute_zero():
    assert float(CircularAccuracy().compute()["circular_accuracy"]) == 0.0
    assert float(MMEScore().compute()["perception"]) == 0.0
    assert float(GroupedAccuracy().compute()["accuracy"]) == 0.0
    assert torch.isfinite(PopeMetric().compute()["f1"])
