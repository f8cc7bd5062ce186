"""Every accuracy-like number a user reads is a percentage (0-100): eval reports, stage summaries, shipped records.

Each check feeds perfect (or hand-counted) predictions (the eval scorers: ``test_every_fixture_task_with_oracle`` in
``tests/eval/test_runner.py``, with :func:`accuracy_like` from here), so a metric reported as a fraction shows up as 1.0 where
100.0 is expected. Which names are accuracy-like: accuracy, acc, F1, precision, recall, IoU (cIoU, mIoU, gIoU),
precision at an IoU threshold and PNG's average recall. FID / KID / IS, losses, MME's 0-200 scores and counts are
not, and keep their own units.
"""

from __future__ import annotations

import re
import typing

import pytest
import torch

ACCURACY_LIKE = re.compile(r"(^|[_/])(acc|accuracy|f1|precision|recall|ciou|miou|giou|iou|ar|prec@[0-9.]+)(_|$)")


def accuracy_like(metrics: dict[str, float]) -> dict[str, float]:
    """The accuracy-like entries of a metrics dict (``,none`` suffixes of eval results dropped)."""
    out = {k.split(",")[0]: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return {k: v for k, v in out.items() if ACCURACY_LIKE.search(k.rsplit("/", 1)[-1]) and "_stderr" not in k}


def test_the_name_rule_picks_accuracies_and_leaves_the_rest() -> None:
    names = {"accuracy": 1, "f1": 1, "artwork_acc_plus": 1, "circular_accuracy_l2_x": 1, "relation/ciou": 1,
             "prec@0.5": 1, "ar": 1, "class_acc_3": 1, "fid": 1, "kid_mean": 1, "is_mean": 1, "val_loss": 1,
             "artwork_score": 1, "perception": 1, "n_samples": 1, "yes_ratio": 1, "params_total_M": 1}  # fmt: skip
    assert set(accuracy_like(names)) == {"accuracy", "f1", "artwork_acc_plus", "circular_accuracy_l2_x",
                                         "relation/ciou", "prec@0.5", "ar", "class_acc_3"}  # fmt: skip


def test_refseg_metric_reports_percent() -> None:
    from eval.refseg import RefSegMetric

    m = RefSegMetric(groups=("attribute",))
    m.update([12, 30], [12, 30], [["attribute"], []])  # two perfect masks
    out = accuracy_like({k: float(v) for k, v in m.compute().items()})
    assert {"ciou", "miou", "giou", "ar", "prec@0.5", "attribute/ciou"} <= set(out)
    for key, value in out.items():  # AR's official integral stops one 1e-5 step short of 1
        assert value == pytest.approx(100.0 if key != "ar" else 100 * (1 - 1e-5)), key


def test_generation_class_accuracy_is_percent() -> None:
    from data.digits import DigitsConfig, DigitsDataset
    from eval.generation.digit_classifier import load_digit_classifier
    from zoo.stages.dit import digits_metrics

    # The config classes are taken from digits_metrics' own signature, wherever they are defined.
    hints = typing.get_type_hints(digits_metrics)
    eval_cfg = hints["e"](samples_per_class=30, reference_split="heldout")
    data_cfg = hints["d"]()
    real = DigitsDataset(DigitsConfig(source="sklearn", image_size=16, split="heldout"))
    images, labels = real.images[:100], real.labels[:100]
    classifier = load_digit_classifier()
    with torch.no_grad():
        right = int((classifier(images).argmax(1) == labels).sum())
    # Real held-out digits as "samples", labelled with their true classes: class accuracy = the judge's accuracy.
    out = digits_metrics(images, labels, eval_cfg, data_cfg, None)
    assert out["class_acc"] == pytest.approx(100 * right / len(labels))
    assert out["class_acc"] > 90.0


def test_shipped_records_are_percent() -> None:
    """The recorded metrics of the shipped weights use the same units as the scorers that re-check them."""
    import json

    from zoo.weights_table import SHIPPED

    for name, cfg in SHIPPED.items():
        for key, value in accuracy_like(cfg.metrics).items():
            assert 1.0 < value <= 100.0, (name, key, value)  # every shipped model scores well above 1 %
    from eval.generation.digit_classifier import SHIPPED_DIR

    config = json.loads((SHIPPED_DIR / "config.json").read_text())
    assert config["metrics"]["heldout_acc"] == SHIPPED["digit_cnn.digits"].metrics["heldout_acc"]

