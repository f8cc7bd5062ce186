"""ShapesVQA and ShapesPOPE: held-out benchmarks generated from the seeded synthetic world (``data.shapes``).

Documents come from the world's ``test`` split (layouts disjoint from ``train``/``val`` by construction), scenes
``0 .. num_scenes-1``, so the benchmark is a pure function of the task's ``reader_args`` (``num_scenes``,
``image_size``, ``seed`` and any other ``WorldConfig`` field under ``world``).

Scoring, with the real benchmarks' scorers:
  shapes_vqa       every ``QA`` of every scene; VQAv2's pipeline (LLaVA answer processor, then the official VQA
                   accuracy) with the single ground truth repeated 10 times. The world's answers are already in the
                   normalised form (lowercase single words, counts as digits), so a sample scores 1 iff the
                   normalised prediction equals the answer, else 0: exact match after LLaVA normalisation.
                   Broken down by question kind (color/shape/count/position/exist).
  shapes_pope_*    the ``PopeProbe`` s of one strategy (random/popular/adversarial), POPE's parser and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eval.registry import Doc, TaskSpec, register_reader

__all__ = ["read_shapes_vqa", "read_shapes_pope"]


def _world(args: Mapping[str, Any]):
    from data.shapes import ShapesWorld, WorldConfig

    extra = dict(args.get("world") or {})
    return ShapesWorld(
        WorldConfig(image_size=int(args.get("image_size", 64)), seed=int(args.get("seed", 0)), **extra)
    )


def _scenes(spec: TaskSpec):
    n = int(spec.reader_args.get("num_scenes", 200))
    world = _world(spec.reader_args)
    for index in range(n):
        yield index, world.scene(index, split=spec.split)


@register_reader("shapes_vqa")
def read_shapes_vqa(spec: TaskSpec, files: Mapping[str, Path], limit: int | None = None) -> list[Doc]:
    docs: list[Doc] = []
    for index, scene in _scenes(spec):
        if limit is not None and len(docs) >= limit:
            break  # scenes are generated on demand, so --limit 8 renders a couple of scenes, not all of them
        for k, qa in enumerate(scene.vqa):
            docs.append(Doc(
                doc_id=f"{index}/{k}", question=qa.question, target=qa.answer, image=scene.image,
                fields={"kind": qa.kind, "scene": index}, source=f"shapes {spec.split} scene {index} vqa[{k}]",
            ))  # fmt: skip
    return docs


@register_reader("shapes_pope")
def read_shapes_pope(spec: TaskSpec, files: Mapping[str, Path], limit: int | None = None) -> list[Doc]:
    strategy = spec.reader_args.get("strategy")
    from data.shapes import POPE_STRATEGIES

    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"{spec.source or spec.name}: reader_args.strategy must be one of {POPE_STRATEGIES}, "
                         f"got {strategy!r}")  # fmt: skip
    docs: list[Doc] = []
    for index, scene in _scenes(spec):
        if limit is not None and len(docs) >= limit:
            break
        for k, probe in enumerate(p for p in scene.pope if p.strategy == strategy):
            docs.append(Doc(
                doc_id=f"{index}/{k}", question=probe.question, target=probe.answer, image=scene.image,
                fields={"category": strategy, "object": probe.target, "scene": index},
                source=f"shapes {spec.split} scene {index} pope[{strategy}][{k}]",
            ))  # fmt: skip
    return docs
