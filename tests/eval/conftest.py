"""Shared test doubles and fixture paths for the eval tests.

The doubles stand in for a zoo model behind the ``GenerativeModel`` protocol: an oracle that answers every fixture
question correctly (keyed by image pixels + prompt, since one question text can have different answers on
different images), a constant model, and a model that reports generation stats.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def _image_key(img) -> str:
    return "none" if img is None else hashlib.sha1(img.tobytes()).hexdigest()


def gold_answer(doc) -> str:
    """The text a perfect model would say for a document, whatever the task."""
    t = doc.target
    if isinstance(t, list):
        return Counter(t).most_common(1)[0][0]
    if isinstance(t, int):  # ScienceQA: index of the right choice
        return "ABCDE"[t]
    return str(t)


class OracleModel:
    """Answers from a table built with the same prompts and images the runner will send."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, str], str] = {}
        self.calls = 0

    def learn(self, spec, docs) -> None:
        from eval.registry import PROMPTS

        for doc in docs:
            prompt = PROMPTS[spec.prompt](doc, spec)
            self.table[(_image_key(doc.load_image()), prompt)] = gold_answer(doc)

    def generate(self, images, prompts, max_new_tokens=16, **gen):
        self.calls += 1
        return [self.table.get((_image_key(im), p), "") for im, p in zip(images, prompts, strict=True)]


class ConstantModel:
    def __init__(self, answer: str = "Yes") -> None:
        self.answer = answer

    def generate(self, images, prompts, max_new_tokens=16, **gen):
        return [self.answer] * len(prompts)


class TimedModel(ConstantModel):
    """Reports stats the way a real model would, and parameter counts with fewer active than total."""

    def generate(self, images, prompts, max_new_tokens=16, **gen):
        from zoo.components.generation import GenerationStats

        self.last_generation_stats = GenerationStats(
            prefill_seconds=0.02, decode_seconds=0.03, generated_tokens=2 * len(prompts), decode_steps=3,
            prompt_tokens=10 * len(prompts), batch_size=len(prompts),
        )  # fmt: skip
        return super().generate(images, prompts, max_new_tokens, **gen)

    def num_parameters(self):
        return {"total": 4_000_000, "active": 1_500_000}


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def doubles():
    return {"oracle": OracleModel, "constant": ConstantModel, "timed": TimedModel, "gold": gold_answer}
