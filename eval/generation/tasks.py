"""Generation eval tasks for the ``eval.run`` runner: class-conditional sampling scored by FID/KID/IS and class
accuracy, with the sample grid and (for DiT-MoE) the expert-routing heatmaps as artifacts.

Registered here (importing this module registers them):

* reader ``class_labels``: one document per image to generate, classes interleaved (0, 1, ..., C-1, 0, ...) so
  that ``--limit`` keeps the classes balanced; ``reader_args = {num_classes, per_class}``.
* output type ``class_conditional_sample``: ``model.sample(labels, num_steps, cfg_scale, generator)`` per batch;
  for a model with MoE blocks (``model.blocks[i].is_moe``) the same sampler runs with a
  :class:`~eval.generation.routing.RoutingCollector` callback and each output carries the image's routing counts.
  The generator is seeded per batch from ``generation.seed`` and the batch's first document id, so a run repeats
  exactly for the same batch size.
* scorer ``class_conditional_generation``: FID, KID, IS (torchmetrics) in the feature space named by
  ``scorer_args.features`` (``digit_cnn``: the shipped classifier, optionally ``classifier_weights`` = a directory;
  ``inception``: ``inception_weights`` = a local torch-fidelity / pytorch-fid file) against a real reference set
  (``reference``: ``sklearn_digits`` with ``reference_split`` all | train | heldout, or an ADM-style ``.npz``
  with ``arr_0`` uint8 NHWC), the share of samples
  classified as their conditioning class, and for MoE models mutual information between expert choice and
  step / position / class. Artifacts (:meth:`GenerationScorer.write_artifacts`, or ``scorer_args.artifacts_dir``):
  ``samples_<task>.png`` and ``routing_{step,position,class,position_maps}.png`` + ``routing_counts.npz``.
* task ``digits_gen``: 100 samples per digit, 50 steps, guidance 1.5, FID-digits against all 1797 real digits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from eval.generation.digit_classifier import DigitClassifierExtractor, load_digit_classifier
from eval.generation.grid import save_sample_grid
from eval.generation.metrics import GenerationMetrics, GenerationMetricsConfig
from eval.generation.routing import RoutingCollector, RoutingCounts
from eval.registry import Doc, TaskSpec, register_output_type, register_reader, register_scorer, register_task
from eval.scorers import Scorer

__all__ = [
    "class_labels_reader",
    "class_conditional_sample",
    "GenerationScorer",
    "routing_mutual_information",
    "DIGITS_GEN",
]


# ---------------------------------------------------------------------------------------------------------------
# reader and output type
# ---------------------------------------------------------------------------------------------------------------


@register_reader("class_labels")
def class_labels_reader(spec: TaskSpec, files: dict[str, Path], limit: int | None = None) -> list[Doc]:
    args = dict(spec.reader_args)
    unknown = sorted(set(args) - {"num_classes", "per_class"})
    if unknown:
        raise ValueError(
            f"task {spec.name!r}: unknown reader_args {unknown}; allowed: num_classes, per_class"
        )
    num_classes, per_class = int(args.get("num_classes", 10)), int(args.get("per_class", 100))
    if num_classes < 1 or per_class < 1:
        raise ValueError(
            f"task {spec.name!r}: num_classes and per_class must be >= 1, got {num_classes}, {per_class}"
        )
    n = num_classes * per_class if limit is None else min(limit, num_classes * per_class)
    return [
        Doc(
            doc_id=str(i),
            question=f"class {i % num_classes}",
            target=i % num_classes,
            source=f"{spec.name}:{i}",
        )
        for i in range(n)
    ]


def _has_moe(model: Any) -> bool:
    return any(getattr(b, "is_moe", False) for b in getattr(model, "blocks", ()))


_GENERATION_KEYS = {"num_steps", "cfg_scale", "seed", "sampler", "record_routing"}


@register_output_type("class_conditional_sample")
def class_conditional_sample(
    model: Any, docs: Sequence[Doc], prompts: list[str], spec: TaskSpec
) -> list[dict]:
    """Sample one image per document for class ``doc.target``; outputs ``{"image", "label", "routing"}``."""
    gen = dict(spec.generation)
    unknown = sorted(set(gen) - _GENERATION_KEYS)
    if unknown:
        raise ValueError(
            f"task {spec.name!r}: unknown generation keys {unknown}; allowed: {sorted(_GENERATION_KEYS)}"
        )
    labels = torch.tensor([int(d.target) for d in docs], dtype=torch.long)
    params = getattr(model, "parameters", None)
    device = next(params()).device if callable(params) else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(
        int(gen.get("seed", 0)) * 1_000_003 + int(docs[0].doc_id)
    )
    kwargs = {"num_steps": int(gen.get("num_steps", 50)), "cfg_scale": float(gen.get("cfg_scale", 1.0)),
              "generator": generator}  # fmt: skip
    if gen.get("sampler") is not None:
        kwargs["sampler"] = gen["sampler"]
    routing = None
    if gen.get("record_routing", True) and _has_moe(model):
        from zoo.diffusion import sample

        collector = RoutingCollector.for_dit(model)
        collector.begin(labels)
        images = sample(model, labels.to(device), callback=collector, **kwargs)
        routing = collector.end()
    else:
        images = model.sample(labels.to(device), **kwargs)
    if not isinstance(images, Tensor) or images.shape[0] != len(docs) or images.dim() != 4:
        raise ValueError(
            f"{type(model).__name__}.sample returned {getattr(images, 'shape', type(images))} for {len(docs)} "
            "labels; expected a tensor (N, C, H, W) in [-1, 1]"
        )
    # Clamp as the reference protocol does when it writes uint8 (clamp(127.5 x + 128, 0, 255)): an under-trained
    # model's out-of-range pixels must not reach the feature network as values no real image has.
    images = images.detach().float().cpu().clamp(-1.0, 1.0)
    return [
        {
            "image": images[i],
            "label": int(labels[i]),
            "routing": None if routing is None else (routing.by_step[i], routing.by_position[i]),
        }
        for i in range(len(docs))
    ]


# ---------------------------------------------------------------------------------------------------------------
# scorer
# ---------------------------------------------------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _reference_images(name: str, image_size: int, split: str = "all") -> Tensor:
    if name == "sklearn_digits":
        from eval.generation.digits_data import load_real_digits

        return load_real_digits(image_size, split)[0]
    path = Path(name)
    if path.suffix != ".npz" or not path.is_file():
        raise FileNotFoundError(
            f"reference {name!r}: use 'sklearn_digits' or the path of an ADM-style .npz (key arr_0, uint8 NHWC)"
        )
    with np.load(path) as z:
        if "arr_0" not in z.files:
            raise ValueError(f"{path}: no 'arr_0' array (keys {z.files}); expected ADM's uint8 NHWC images")
        arr = z["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def routing_mutual_information(counts: np.ndarray) -> np.ndarray:
    """Per layer, I(Y; E) in bits from a (layers, Y, experts) count table (0 = choice independent of Y).

    A plug-in estimate: with few counts per cell it is biased upwards, so compare models at equal sample counts.
    """
    c = np.asarray(counts, dtype=np.float64)
    p = c / np.maximum(c.sum(axis=(1, 2), keepdims=True), 1e-300)
    py, pe = p.sum(axis=2, keepdims=True), p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (py * pe)), 0.0)
    return terms.sum(axis=(1, 2))


class _Prefixes(tuple):
    """A ``neutral`` list matching metric names by prefix (per-class accuracies are open-ended)."""

    def __new__(cls, *prefixes: str) -> _Prefixes:
        return super().__new__(cls, prefixes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(name.startswith(p) for p in self)


@register_scorer("class_conditional_generation")
class GenerationScorer(Scorer):
    """FID/KID/IS + class accuracy of class-conditional samples (and routing statistics of MoE samplers)."""

    primary = "fid"
    higher_is_better = False
    # The runner records one direction per scorer; these metrics go the other way (IS, class accuracy) or have
    # none (spreads, sizes, routing statistics), so they are reported as neutral.
    neutral = _Prefixes("is_", "kid_std", "kid_subset_size", "class_acc", "routing_")

    _ARGS = {"features", "classifier_weights", "inception_weights", "reference", "grid_per_class", "artifacts_dir",
             "kid_subsets", "kid_subset_size", "is_splits", "device", "reference_image_size",
             "reference_split"}  # fmt: skip

    def build_metric(self, docs: Sequence[Doc]):
        unknown = sorted(set(self.args) - self._ARGS)
        if unknown:
            raise ValueError(
                f"task {self.spec.name!r}: unknown scorer_args {unknown}; allowed: {sorted(self._ARGS)}"
            )
        device = self.args.get("device", "cpu")
        features = self.args.get("features", "digit_cnn")
        if features == "digit_cnn":
            classifier = load_digit_classifier(self.args.get("classifier_weights"))
            extractor = DigitClassifierExtractor(classifier, device=device)
            image_size = classifier.cfg.image_size
        elif features == "inception":
            from eval.generation.inception import InceptionExtractor

            if not self.args.get("inception_weights"):
                raise ValueError(
                    f"task {self.spec.name!r}: features 'inception' needs scorer_args.inception_weights"
                )
            extractor = InceptionExtractor(self.args["inception_weights"], device=device)
            image_size = int(self.args.get("reference_image_size", 16))
        else:
            raise ValueError(
                f"task {self.spec.name!r}: scorer_args.features must be 'digit_cnn' or 'inception'"
            )
        self.metrics = GenerationMetrics(
            extractor,
            GenerationMetricsConfig(
                kid_subsets=int(self.args.get("kid_subsets", 100)),
                kid_subset_size=int(self.args.get("kid_subset_size", 1000)),
                is_splits=int(self.args.get("is_splits", 10)),
            ),
        )
        reference = _reference_images(
            self.args.get("reference", "sklearn_digits"), image_size, self.args.get("reference_split", "all")
        )
        # Under torch.distributed each rank adds its strided share of the reference, as the runner shards the
        # documents, so the reduced statistics are those of the whole reference set counted once.
        rank, world = _dist()
        for chunk in reference[rank::world].split(512):
            self.metrics.update_real(chunk)
        self.grid_per_class = int(self.args.get("grid_per_class", 10))
        self.grid_images: dict[int, list[Tensor]] = {}
        self.routing_rows: list[tuple[np.ndarray, np.ndarray, int]] = []
        self.routing_meta: dict[str, Any] = {}
        self.feature_name = extractor.name
        return self.metrics.fid

    def score(self, predictions: Sequence[dict], docs: Sequence[Doc]) -> list[dict[str, Any]]:
        images = torch.stack([p["image"] for p in predictions])
        labels = torch.tensor([int(d.target) for d in docs])
        preds = self.metrics.update_fake(images, labels).cpu()
        for p, label in zip(predictions, labels.tolist()):
            kept = self.grid_images.setdefault(label, [])
            if len(kept) < self.grid_per_class:
                kept.append(p["image"])
            if p.get("routing") is not None:
                by_step, by_position = p["routing"]
                self.routing_rows.append((by_step, by_position, label))
        return [
            {"parsed": int(pr), "score": float(pr == lab), "unparsed": False}
            for pr, lab in zip(preds.tolist(), labels.tolist())
        ]

    def routing_counts(self) -> RoutingCounts | None:
        if not self.routing_rows:
            return None
        from eval.generation.routing import counts_from_images

        num_classes = self.metrics.extractor.num_classes
        n_pos = self.routing_rows[0][1].shape[1]
        side = int(round(n_pos**0.5))
        return counts_from_images(
            self.routing_rows,
            num_classes,
            grid=(side, side) if side * side == n_pos else (0, 0),
        )

    def compute(self) -> dict[str, float]:
        out = self.metrics.compute()
        counts = self.routing_counts()
        if counts is not None:
            out["routing_mi_step"] = float(routing_mutual_information(counts.by_step).mean())
            out["routing_mi_position"] = float(routing_mutual_information(counts.by_position).mean())
            out["routing_mi_class"] = float(routing_mutual_information(counts.by_class).mean())
            load = counts.by_position.sum(axis=1)
            out["routing_max_expert_share"] = float((load.max(axis=1) / load.sum(axis=1)).mean())
        if self.args.get("artifacts_dir"):
            self.write_artifacts(self.args["artifacts_dir"])
        return {k: int(v) if k.startswith("n_") else float(v) for k, v in out.items()}

    def write_artifacts(self, out_dir: str | os.PathLike) -> dict[str, str]:
        """The sample grid (rows = classes) and, for MoE samplers, routing heatmaps and the raw counts."""
        out = Path(out_dir)
        written: dict[str, str] = {}
        if self.grid_images:
            classes = sorted(self.grid_images)
            ncol = max(len(self.grid_images[c]) for c in classes)
            imgs, labs = [], []
            for c in classes:
                row = self.grid_images[c]
                # pad short rows with blank (-1 = background) tiles so each class keeps its own row
                imgs += row + [torch.full_like(row[0], -1.0)] * (ncol - len(row))
                labs += [c] * ncol
            written["samples"] = str(save_sample_grid(torch.stack(imgs), labs, out / f"samples_{self.spec.name}.png",
                                                      nrow=ncol))  # fmt: skip
        counts = self.routing_counts()
        if counts is not None:
            from eval.generation.plots import save_all_routing_plots

            note = f" ({counts.num_images} images, {counts.by_step.shape[1]} steps)"
            written |= {
                f"routing_{k}": str(v) for k, v in save_all_routing_plots(counts, out, note=note).items()
            }
            written["routing_counts"] = str(counts.save(out / "routing_counts.npz"))
        return written


# ---------------------------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------------------------

DIGITS_GEN = register_task(
    TaskSpec(
        name="digits_gen",
        reader="class_labels",
        reader_args={"num_classes": 10, "per_class": 100},
        prompt="question",
        output_type="class_conditional_sample",
        generation={"num_steps": 50, "cfg_scale": 1.5, "seed": 0},
        scorer="class_conditional_generation",
        scorer_args={"features": "digit_cnn", "reference": "sklearn_digits", "grid_per_class": 10},
        group="generation",
        description="class-conditional digits (16x16): FID/KID/IS in the shipped digit classifier's feature space "
        "against all 1797 sklearn digits, share of samples classified as their class; routing heatmaps for MoE",
        source=__name__,
    )
)
