"""The shapes world as LLaVA training data: the word-level vocabulary and the shuffled VQA conversations.

``shapes_tokenizer(world, n)`` builds the tiny models' word-level tokenizer from every word of ``n`` train scenes;
``write_shapes_vqa`` writes LLaVA JSON of the train scenes' questions in short shuffled conversations (the caption
export, ``data.formats.export_llava``, writes the images they point at).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from data.formats import CAPTION_PROMPTS, IMAGE_TOKEN, SHORT_ANSWER_PROMPT
from data.seeding import mix_seed
from data.shapes import QA_KINDS, ShapesWorld, WorldConfig

__all__ = ["shapes_tokenizer", "write_shapes_vqa"]


def shapes_tokenizer(world: WorldConfig, num_scenes: int):
    """The word-level tokenizer over every word of ``num_scenes`` train scenes (captions, questions, answers)."""
    from zoo.tokenizers import build_tokenizer

    w = ShapesWorld(world)
    texts: list[str] = [*CAPTION_PROMPTS, SHORT_ANSWER_PROMPT]
    for scene in w.iter_scenes("train", num_scenes):
        texts.append(scene.caption)
        texts += [f"{qa.question} {qa.answer}" for qa in scene.vqa]
        texts += [f"{p.question} {p.answer}" for p in scene.pope]
    return build_tokenizer(texts)


def write_shapes_vqa(world: Any, num_scenes: int, out: Path, turns: int, pope_probes: int, answer_prompt: bool,
                     seed: int, questions_per_kind: dict[str, int] | None = None, extra_spatial: int = 0,
                     answer_prompt_turns: str = "all") -> Path:
    """LLaVA JSON of the train scenes' questions, shuffled per scene and cut into conversations of ``turns``.

    The world lists a scene's questions in a fixed order (colour, shape, count, position, existence), and evaluation
    asks one question per conversation; trained on that order, a model learns "first question -> a colour" instead
    of reading the question. A seeded shuffle puts every kind in every position, short conversations make the
    first-turn case common, and ``pope_probes`` of the scene's POPE probes (present objects and random / popular /
    adversarial absent ones) add the existence questions POPE asks. ``questions_per_kind`` (e.g. ``{"color": 3}``)
    replaces the scene's one-per-kind list by that many distinct questions of each kind, gathered over fresh draws
    of the world's question generator (fewer where the scene has fewer to give: one object has few colour
    phrases); kinds not named get none. ``extra_spatial`` adds up to that many more questions per scene
    about where things are, drawn from every one the scene answers (``ShapesWorld.spatial_questions``: each
    object's side of the image, every clear relation between two objects, the colour and shape of an object named
    by its place), so that where objects are supervises more than one answer in six. ``answer_prompt_turns``
    ``"first"`` puts the short-answer instruction on a conversation's first question only (the one every benchmark
    prompt looks like), so later turns cost about 10 tokens less each. Images are
    ``images/<id>.png`` under ``out`` (written by the caption export).
    """
    from zoo.registry import atomic_write

    if answer_prompt_turns not in ("all", "first"):
        raise ValueError(f"answer_prompt_turns is {answer_prompt_turns!r}; expected 'all' or 'first'")

    records = []
    for scene in world.iter_scenes("train", num_scenes):
        rng = np.random.default_rng(mix_seed(seed, scene.index))
        qas = {qa.question: qa.answer for qa in _scene_questions(world, scene, questions_per_kind)}
        if extra_spatial:
            more = [qa for qa in world.spatial_questions(scene) if qa.question not in qas]
            for i in sorted(rng.permutation(len(more))[:extra_spatial]):
                qas[more[i].question] = more[i].answer
        probes = {p.question: p.answer for p in scene.pope if p.question not in qas}
        # As many "yes" as "no" probes: absent objects outnumber present ones, and a model fed the imbalance
        # learns to answer "no" to every existence question.
        for answer, share in (("yes", pope_probes // 2), ("no", pope_probes - pope_probes // 2)):
            pool = sorted(q for q, a in probes.items() if a == answer)
            for i in rng.permutation(len(pool))[:share]:
                qas[pool[i]] = answer
        items = list(qas.items())
        items = [items[i] for i in rng.permutation(len(items))]
        for c in range(0, len(items), turns):
            conv = []
            for k, (q, a) in enumerate(items[c : c + turns]):
                prompted = answer_prompt and (k == 0 or answer_prompt_turns == "all")
                q = f"{q}\n{SHORT_ANSWER_PROMPT}" if prompted else q
                conv += [{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if k == 0 else q}, {"from": "gpt", "value": a}]
            records.append({"id": f"{scene.id}-{c // turns}", "image": f"images/{scene.id}.png", "conversations": conv})
    path = out / "train_vqa_shuffled.json"
    text = "[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in records) + "\n]\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _scene_questions(world: Any, scene: Any, per_kind: dict[str, int] | None) -> list[Any]:
    if not per_kind:
        return list(scene.vqa)
    unknown = sorted(set(per_kind) - set(QA_KINDS))
    if unknown or min(per_kind.values(), default=0) < 0:
        raise ValueError(f"questions_per_kind={per_kind}: kinds must be among {list(QA_KINDS)} (unknown kinds "
                         f"{unknown}) with counts >= 0")
    picked: dict[str, Any] = {}
    counts = dict.fromkeys(per_kind, 0)
    # 4 draws per wanted question is plenty for every kind a scene can answer; kinds it cannot (a position question
    # for objects too close to the centre) simply stay short.
    for draw in range(4 * max(per_kind.values(), default=0) + 1):
        for qa in scene.vqa if draw == 0 else world.resample_vqa(scene, draw):
            if qa.question not in picked and counts.get(qa.kind, 0) < per_kind.get(qa.kind, 0):
                picked[qa.question] = qa
                counts[qa.kind] += 1
        if all(counts[k] >= n for k, n in per_kind.items()):
            break
    return list(picked.values())
