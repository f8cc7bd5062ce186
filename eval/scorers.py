"""Scorers: raw predictions + documents -> per-sample records and a torchmetrics ``Metric`` per task.

A scorer is built once per task run from the task spec and its documents (so vocabularies such as MMBench categories
are the same on every rank), then fed batch by batch. ``score`` returns one record per sample for the predictions
file (``parsed``, ``score``, ``unparsed``) and updates the metric; ``compute`` returns plain floats.

Registered scorers (name -> what it reproduces):
  vqav2       LLaVA-1.5: ``llava_answer_processor(pred)`` then the official evaluator (``vqa_accuracy``), per
              answer type. Equals what EvalAI reports for LLaVA's submission file.
  vqa_mmf     MMF ``TextVQAAccuracyEvaluator`` (LLaVA's TextVQA script): processor on both sides, no gate.
  vizwiz      as vqav2 (LLaVA normalises, the VizWiz server applies the VQA evaluator); "unanswerable" is an
              ordinary answer.
  gqa         LLaVA ``convert_gqa_for_eval`` (rstrip "." + lower) then GQA ``eval.py`` exact match; binary/open.
  scienceqa   LLaVA ``eval_science_qa.py`` letter extraction; ``FAILED`` is wrong; IMG / no-image breakdown.
  pope        POPE ``evaluate.py`` (= LLaVA ``eval_pope.py``): acc, precision, recall, F1, yes-ratio of predictions.
  mme         MME ``calculation.py``: acc, acc+, score per subtask, perception and cognition totals (also the groups
              ``mme_perception`` / ``mme_cognition`` of ``results.json``, sums over the subtasks as lmms-eval's).
  mmbench     circular accuracy with ``can_infer_option`` / ``can_infer_text`` extraction; where lmms-eval would ask
              a GPT judge (or finally pick a random letter) we count the copy as unparsed and wrong.
  shapes_vqa  the synthetic ShapesVQA: vqav2's pipeline with the single ground truth repeated 10 times, which makes
              the score 1 iff the LLaVA-normalised prediction equals the (already normalised) answer, else 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from torchmetrics import Metric

from eval.metrics import (
    MME_COGNITION,
    MME_PERCEPTION,
    CircularAccuracy,
    GroupedAccuracy,
    MMEScore,
    PopeMetric,
)
from eval.parsers import (
    gqa_process,
    mmbench_extract,
    mme_parse,
    pope_is_unparsed,
    pope_parse,
    scienceqa_extract,
)
from eval.registry import Doc, TaskSpec, register_scorer
from eval.vqa import llava_answer_processor, mmf_vqa_accuracy, vqa_accuracy

__all__ = ["Scorer"]


class Scorer(ABC):
    """Base class: subclasses set ``primary`` (the headline metric) and implement ``build_metric`` / ``score``."""

    primary: str = "accuracy"
    higher_is_better: bool = True
    neutral: tuple[str, ...] = ()  # metrics with no better direction (left out of higher_is_better)
    # Groups scored as the sum of per-subtask scores inside this one task (MME's perception and cognition totals,
    # summed over subtasks as MME's calculation.py and lmms-eval's aggregation do): group name -> subtask names.
    # The runner reports each as a group of ``results.json`` from the ``<subtask>_score`` and ``n_<subtask>`` metrics.
    summed_groups: Mapping[str, tuple[str, ...]] = MappingProxyType({})

    def __init__(self, spec: TaskSpec, docs: Sequence[Doc], **args: Any) -> None:
        self.spec = spec
        self.args = args
        # The documents the run report shows with their media (``TaskSpec.examples``, eval/examples.py).
        self.example_docs = list(docs[: spec.examples])
        self.metric: Metric = self.build_metric(docs)

    @abstractmethod
    def build_metric(self, docs: Sequence[Doc]) -> Metric:
        """The task's metric, built from all its documents (identical on every rank)."""

    @abstractmethod
    def score(self, predictions: Sequence[str], docs: Sequence[Doc]) -> list[dict[str, Any]]:
        """Update the metric with a batch; return one record per sample (parsed, score, unparsed)."""

    def compute(self) -> dict[str, float]:
        # Counts are integers in the results; everything else a float.
        return {k: int(v) if k.startswith("n_") else float(v) for k, v in self.metric.compute().items()}


def _require_target(doc: Doc) -> Any:
    if doc.target is None:
        raise ValueError(f"{doc.source}: no ground truth for this sample (a test split without annotations?)")
    return doc.target


class _VQAFamily(Scorer):
    """Soft VQA accuracy with a choice of processing, grouped by the document's answer type."""

    groups: tuple[str, ...] = ("yes/no", "number", "other")

    def build_metric(self, docs):
        return GroupedAccuracy(groups=self.groups)

    def _one(self, prediction: str, answers: list[str]) -> tuple[str, float]:
        processed = llava_answer_processor(prediction)
        return processed, vqa_accuracy(processed, answers)

    def score(self, predictions, docs):
        records, scores, groups, unparsed = [], [], [], []
        for pred, doc in zip(predictions, docs, strict=True):
            parsed, s = self._one(pred, _require_target(doc))
            kind = doc.fields.get("answer_type")
            records.append({"parsed": parsed, "score": s, "unparsed": parsed == ""})
            scores.append(s)
            groups.append([kind] if kind in self.groups else [])
            unparsed.append(parsed == "")
        self.metric.update(scores, groups, unparsed)
        return records


@register_scorer("vqav2")
class VQAv2Scorer(_VQAFamily):
    pass


@register_scorer("vizwiz")
class VizWizScorer(_VQAFamily):
    groups = ("yes/no", "number", "other", "unanswerable")


@register_scorer("vqa_mmf")
class MMFVQAScorer(_VQAFamily):
    groups = ()

    def _one(self, prediction, answers):
        return llava_answer_processor(prediction), mmf_vqa_accuracy(prediction, answers)


@register_scorer("gqa")
class GQAScorer(Scorer):
    def build_metric(self, docs):
        return GroupedAccuracy(groups=("binary", "open"))

    def score(self, predictions, docs):
        records, scores, groups = [], [], []
        for pred, doc in zip(predictions, docs, strict=True):
            parsed = gqa_process(pred)
            s = float(parsed == _require_target(doc))
            records.append({"parsed": parsed, "score": s, "unparsed": parsed == ""})
            scores.append(s)
            groups.append(["open" if doc.fields.get("structural") == "query" else "binary"])
        self.metric.update(scores, groups, [r["unparsed"] for r in records])
        return records


@register_scorer("scienceqa")
class ScienceQAScorer(Scorer):
    def build_metric(self, docs):
        return GroupedAccuracy(groups=("img", "no_img"))

    def score(self, predictions, docs):
        records, scores, groups = [], [], []
        for pred, doc in zip(predictions, docs, strict=True):
            idx = scienceqa_extract(pred, len(doc.fields["choices"]))
            s = float(idx is not None and idx == _require_target(doc))
            records.append(
                {"parsed": None if idx is None else "ABCDE"[idx], "score": s, "unparsed": idx is None}
            )
            scores.append(s)
            groups.append(["img" if doc.fields.get("has_image") else "no_img"])
        self.metric.update(scores, groups, [r["unparsed"] for r in records])
        return records


@register_scorer("pope")
class PopeScorer(Scorer):
    primary = "f1"
    neutral = ("yes_ratio",)  # about 50 is ideal on balanced splits

    def build_metric(self, docs):
        return PopeMetric()

    def score(self, predictions, docs):
        labels = [_require_target(d) for d in docs]
        self.metric.update(list(predictions), labels)
        out = []
        for pred, label in zip(predictions, labels, strict=True):
            parsed = pope_parse(pred)
            out.append(
                {"parsed": parsed, "score": float(parsed == label), "unparsed": pope_is_unparsed(pred)}
            )
        return out


@register_scorer("mme")
class MMEScorer(Scorer):
    primary = "perception"
    summed_groups = MappingProxyType({"mme_perception": MME_PERCEPTION, "mme_cognition": MME_COGNITION})

    def build_metric(self, docs):
        names = list(dict.fromkeys([*MME_PERCEPTION, *MME_COGNITION, *(d.fields["subtask"] for d in docs)]))
        return MMEScore(subtasks=names)

    def score(self, predictions, docs):
        records, correct = [], []
        for pred, doc in zip(predictions, docs, strict=True):
            parsed = mme_parse(pred)
            ok = parsed is not None and parsed == _require_target(doc).lower()
            records.append({"parsed": parsed, "score": float(ok), "unparsed": parsed is None})
            correct.append(ok)
        self.metric.update(correct, [d.fields["subtask"] for d in docs], [d.fields["pair_id"] for d in docs],
                           [r["unparsed"] for r in records])  # fmt: skip
        return records


@register_scorer("mmbench")
class MMBenchScorer(Scorer):
    primary = "circular_accuracy"

    def build_metric(self, docs):
        cats = sorted({d.fields.get("category", "") for d in docs} - {""})
        l2 = sorted({d.fields.get("l2_category", "") for d in docs} - {""})
        return CircularAccuracy(categories=cats, l2_categories=l2)

    def score(self, predictions, docs):
        records, correct = [], []
        for pred, doc in zip(predictions, docs, strict=True):
            letter = mmbench_extract(pred, doc.fields["options"])
            ok = letter is not None and letter == _require_target(doc)
            records.append({"parsed": letter, "score": float(ok), "unparsed": letter is None})
            correct.append(ok)
        self.metric.update(
            correct,
            [d.fields["question_index"] for d in docs],
            categories=[d.fields.get("category", "") for d in docs],
            l2_categories=[d.fields.get("l2_category", "") for d in docs],
            unparsed=[r["unparsed"] for r in records],
        )
        return records


@register_scorer("shapes_vqa")
class ShapesVQAScorer(_VQAFamily):
    def build_metric(self, docs):
        kinds = sorted({d.fields.get("kind") for d in docs if d.fields.get("kind")})
        self.groups = tuple(kinds)
        return GroupedAccuracy(groups=self.groups)

    def score(self, predictions, docs):
        records, scores, groups, unparsed = [], [], [], []
        for pred, doc in zip(predictions, docs, strict=True):
            parsed = llava_answer_processor(pred)
            s = vqa_accuracy(parsed, [_require_target(doc)] * 10)
            records.append({"parsed": parsed, "score": s, "unparsed": parsed == ""})
            scores.append(s)
            kind = doc.fields.get("kind")
            groups.append([kind] if kind else [])
            unparsed.append(parsed == "")
        self.metric.update(scores, groups, unparsed)
        return records
