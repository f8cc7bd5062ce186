"""Stateful benchmark metrics as torchmetrics ``Metric`` s: they accumulate over batches and sum across processes.

States are tensors (sums and counts) or concatenated tensor lists, never Python strings, so ``compute()`` after
``update()`` on several ranks gives the same number as one pass over everything. Categorical keys (answer types,
MME subtasks, MMBench categories) come from a vocabulary fixed at construction, identical on every rank.

All accuracy-like outputs are percentages (0-100), as the official tools print them; MME scores are the official
``100 * acc + 100 * acc+`` per subtask and their sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from eval.parsers import pope_is_unparsed, pope_parse

__all__ = [
    "GroupedAccuracy",
    "PopeMetric",
    "MMEScore",
    "CircularAccuracy",
    "MME_PERCEPTION",
    "MME_COGNITION",
]

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _pct(num: Tensor, den: Tensor) -> Tensor:
    # An empty group reports 0 rather than NaN so that results.json stays valid JSON.
    return torch.where(den > 0, 100.0 * num / den.clamp(min=1), torch.zeros_like(num))


def _is_empty(state: list[Tensor] | Tensor) -> bool:
    # A list state is a list before synchronisation and may be a single tensor after it.
    return len(state) == 0 if isinstance(state, list) else state.numel() == 0


class GroupedAccuracy(Metric):
    """Mean of per-sample scores in [0, 1] (VQA soft scores or 0/1), overall and per group, plus unparsed count.

    Args:
        groups: names of the breakdowns (e.g. VQA answer types); a sample may belong to several or none.
        name: the key of the overall number in ``compute()``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, groups: Sequence[str] = (), name: str = "accuracy", **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups = tuple(groups)
        self.name = name
        self._index = {g: i + 1 for i, g in enumerate(self.groups)}  # slot 0 is "overall"
        n = len(self.groups) + 1
        self.add_state("score", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("unparsed", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        scores: Sequence[float],
        groups: Sequence[Sequence[str]] | None = None,
        unparsed: Sequence[bool] | None = None,
    ) -> None:
        # Sum in Python, then one tensor update per batch (per-sample tensor ops dominate on large splits).
        score = [0.0] * (len(self.groups) + 1)
        count = [0] * (len(self.groups) + 1)
        for i, s in enumerate(scores):
            score[0] += float(s)
            count[0] += 1
            for g in groups[i] if groups is not None else ():
                if g not in self._index:
                    raise KeyError(f"group {g!r} is not one of {self.groups} declared for this metric")
                score[self._index[g]] += float(s)
                count[self._index[g]] += 1
        self.score += torch.tensor(score, dtype=torch.float64, device=self.score.device)
        self.count += torch.tensor(count, dtype=torch.float64, device=self.count.device)
        if unparsed is not None:
            self.unparsed += float(sum(bool(u) for u in unparsed))

    def compute(self) -> dict[str, Tensor]:
        pct = _pct(self.score, self.count)
        out = {self.name: pct[0]}
        for g, i in self._index.items():
            out[f"{self.name}_{g}"] = pct[i]
        out["n_samples"] = self.count[0]
        out["n_unparsed"] = self.unparsed
        return out


class PopeMetric(Metric):
    """POPE accuracy, precision, recall, F1 and yes-ratio (of the *predictions*), positive class = "yes".

    ``update(predictions, labels)`` parses raw text with the official POPE/LLaVA rule. Precision, recall or F1 whose
    denominator is zero (e.g. a model that never says yes) are reported as 0 where the original script would raise.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for key in ("tp", "fp", "tn", "fn", "unparsed"):
            self.add_state(key, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], labels: Sequence[str]) -> None:
        tp = fp = tn = fn = unparsed = 0
        for text, label in zip(predictions, labels, strict=True):
            pred_yes = pope_parse(text) == "yes"
            # POPE's label files say "no" for negatives and anything else is positive.
            gold_yes = label != "no"
            tp += pred_yes and gold_yes
            fp += pred_yes and not gold_yes
            fn += gold_yes and not pred_yes
            tn += not pred_yes and not gold_yes
            unparsed += pope_is_unparsed(text)
        self.tp += tp
        self.fp += fp
        self.tn += tn
        self.fn += fn
        self.unparsed += unparsed

    def compute(self) -> dict[str, Tensor]:
        tp, fp, tn, fn = self.tp, self.fp, self.tn, self.fn
        n = tp + fp + tn + fn
        precision = _pct(tp, tp + fp)
        recall = _pct(tp, tp + fn)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                         torch.zeros_like(precision))  # fmt: skip
        return {
            "accuracy": _pct(tp + tn, n),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": _pct(tp + fp, n),
            "n_samples": n,
            "n_unparsed": self.unparsed,
        }


class MMEScore(Metric):
    """MME acc and acc+ per subtask (acc+ = both questions of an image right), score = 100 acc + 100 acc+.

    ``update(correct, subtasks, pair_ids)``: ``pair_ids`` identify the image within its subtask. The official data has
    two questions per image; a pair with more raises naming it, a pair with one (cut by ``--limit``) counts for acc
    only and is reported in ``n_incomplete_pairs``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, subtasks: Sequence[str] = MME_PERCEPTION + MME_COGNITION, **kwargs) -> None:
        super().__init__(**kwargs)
        self.subtasks = tuple(subtasks)
        self._index = {s: i for i, s in enumerate(self.subtasks)}
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("subtask", default=[], dist_reduce_fx="cat")
        self.add_state("pair", default=[], dist_reduce_fx="cat")
        self.add_state("unparsed", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        correct: Sequence[bool],
        subtasks: Sequence[str],
        pair_ids: Sequence[int],
        unparsed: Sequence[bool] | None = None,
    ) -> None:
        unknown = sorted({s for s in subtasks if s not in self._index})
        if unknown:
            raise KeyError(f"MME subtasks {unknown} are not among {self.subtasks}")
        self.correct.append(torch.tensor([bool(c) for c in correct], dtype=torch.bool))
        self.subtask.append(torch.tensor([self._index[s] for s in subtasks], dtype=torch.long))
        self.pair.append(torch.tensor(list(pair_ids), dtype=torch.long))
        if unparsed is not None:
            self.unparsed += float(sum(bool(u) for u in unparsed))

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if _is_empty(self.correct):
            zero = torch.tensor(0.0)
            return {"perception": zero, "cognition": zero, "n_samples": zero, "n_unparsed": self.unparsed,
                    "n_incomplete_pairs": zero}  # fmt: skip
        correct, subtask, pair = (dim_zero_cat(x) for x in (self.correct, self.subtask, self.pair))
        totals = {"perception": 0.0, "cognition": 0.0}
        incomplete = 0
        for name, idx in self._index.items():
            sel = subtask == idx
            if not bool(sel.any()):
                continue
            c, p = correct[sel], pair[sel]
            pairs, counts = torch.unique(p, return_counts=True)
            if bool((counts > 2).any()):
                bad = pairs[counts > 2]
                raise ValueError(
                    f"MME {name}: image pair(s) {bad.tolist()[:5]} have more than two answers; "
                    "acc+ needs exactly two questions per image"
                )
            acc = c.double().mean()
            # A pair cut in half (by --limit) counts for acc but not for acc+.
            complete = pairs[counts == 2]
            incomplete += int((counts == 1).sum())
            both = (
                torch.stack([c[p == q].all() for q in complete]).double().mean()
                if len(complete)
                else torch.tensor(0.0, dtype=torch.float64)
            )
            score = 100 * acc + 100 * both
            out[f"{name}_acc"] = 100 * acc
            out[f"{name}_acc_plus"] = 100 * both
            out[f"{name}_score"] = score
            out[f"n_{name}"] = torch.tensor(float(len(c)))  # the subtask's questions, for the summed groups' counts
            if name in MME_PERCEPTION:
                totals["perception"] += float(score)
            elif name in MME_COGNITION:
                totals["cognition"] += float(score)
        out["perception"] = torch.tensor(totals["perception"])
        out["cognition"] = torch.tensor(totals["cognition"])
        out["n_samples"] = torch.tensor(float(len(correct)))
        out["n_unparsed"] = self.unparsed
        out["n_incomplete_pairs"] = torch.tensor(float(incomplete))
        return out


class CircularAccuracy(Metric):
    """MMBench circular evaluation: a question counts only if every rotated copy of it is answered correctly.

    ``update(correct, question_ids, categories, l2_categories)``: ``question_ids`` are the original indices
    (``index % 1e6``); category names come from the vocabularies given at construction, and hit rates are reported
    per ``category`` (``circular_accuracy_<name>``) and per ``l2-category`` (``circular_accuracy_l2_<name>``).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, categories: Sequence[str] = (), l2_categories: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self._vocab = {
            "": {c: i for i, c in enumerate(categories)},
            "l2_": {c: i for i, c in enumerate(l2_categories)},
        }
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("question", default=[], dist_reduce_fx="cat")
        self.add_state("category", default=[], dist_reduce_fx="cat")
        self.add_state("l2_category", default=[], dist_reduce_fx="cat")
        self.add_state("unparsed", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        correct: Sequence[bool],
        question_ids: Sequence[int],
        categories: Sequence[str] | None = None,
        l2_categories: Sequence[str] | None = None,
        unparsed: Sequence[bool] | None = None,
    ) -> None:
        n = len(correct)
        self.correct.append(torch.tensor([bool(c) for c in correct], dtype=torch.bool))
        self.question.append(torch.tensor(list(question_ids), dtype=torch.long))
        for state, prefix, names in (("category", "", categories), ("l2_category", "l2_", l2_categories)):
            vocab = self._vocab[prefix]
            ids = [vocab.get(c, -1) for c in names] if names is not None else [-1] * n
            getattr(self, state).append(torch.tensor(ids, dtype=torch.long))
        if unparsed is not None:
            self.unparsed += float(sum(bool(u) for u in unparsed))

    def compute(self) -> dict[str, Tensor]:
        zero = torch.tensor(0.0)
        if _is_empty(self.correct):
            return {
                "circular_accuracy": zero,
                "n_questions": zero,
                "n_samples": zero,
                "n_unparsed": self.unparsed,
            }
        correct, question = dim_zero_cat(self.correct), dim_zero_cat(self.question)
        qids = torch.unique(question)
        first = torch.stack(
            [(question == q).nonzero()[0, 0] for q in qids]
        )  # a question's copies share labels
        hit = torch.stack([correct[question == q].all() for q in qids]).double()
        out = {"circular_accuracy": 100 * hit.mean()}
        for state, prefix in (("category", ""), ("l2_category", "l2_")):
            of_question = dim_zero_cat(getattr(self, state))[first]
            for name, i in self._vocab[prefix].items():
                sel = of_question == i
                if bool(sel.any()):
                    out[f"circular_accuracy_{prefix}{name}"] = 100 * hit[sel].mean()
        out["n_questions"] = torch.tensor(float(len(qids)))
        out["n_samples"] = torch.tensor(float(len(correct)))
        out["n_unparsed"] = self.unparsed
        return out
