"""Golden prompts: the exact text each task sends for a frozen document. A change here must be deliberate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from eval.registry import PROMPTS, READERS, Doc, get_task, list_tasks, resolve_files

FIXTURES = Path(__file__).parent / "fixtures"
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."

# task -> {doc_id: prompt}, for documents read from the task's fixture.
GOLDEN: dict[str, dict[str, str]] = {
    "vqav2_val": {"42000": "What color is the bus?" + SHORT},
    "gqa_testdev_balanced": {"20968379": "Is the sky blue or white?" + SHORT},
    "textvqa_val": {
        "34602": "what is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use"
        + SHORT,
        "34603": "what number is on the jersey?" + SHORT,
    },
    "vizwiz_val": {
        "VizWiz_val_00000001.jpg": "Which one is the blue one?\nWhen the provided information is insufficient, "
        "respond with 'Unanswerable'.\nAnswer the question using a single word or phrase."
    },
    "scienceqa_img": {
        "10": "Which of these states is farthest north?\nA. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma"
        + LETTER,
        "11": "Context: Read the text about an animal.\nTree frogs live in rain forests.\n"
        "Which animal's feet are also adapted for sticking to smooth surfaces?\nA. tiger\nB. Madagascar day gecko\n"
        "C. fox" + LETTER,
    },
    "pope_random": {"1": "Is there a dining table in the image?" + SHORT},
    "pope_popular": {"2": "Is there a car in the image?" + SHORT},
    "pope_adversarial": {"4": "Is there a cup in the image?" + SHORT},
    "mme": {
        "existence/000000006040/0": "Is there a train in this image?" + SHORT,
        "code_reasoning/0020/1": "The image shows a python code. Is the output of the code 'World'?" + SHORT,
    },
    "mmbench_en_dev": {
        "0": "What is the main color of the image?\nA. red\nB. green\nC. blue\nD. yellow" + LETTER,
        "1000000": "What is the main color of the image?\nA. green\nB. blue\nC. yellow\nD. red" + LETTER,
        "1": "The picture is a synthetic drawing.\nWhich shape is shown?\nA. circle\nB. square" + LETTER,
    },
}

# Generated benchmarks: frozen on a hand-made document, so a change of the world does not look like a prompt change.
SYNTHETIC_GOLDEN = {
    "shapes_vqa": ("How many stars are there?", "How many stars are there?" + SHORT),
    "shapes_pope_random": (
        "Is there a red circle in the image?",
        "Is there a red circle in the image?" + SHORT,
    ),
    "shapes_pope_popular": (
        "Is there a blue star in the image?",
        "Is there a blue star in the image?" + SHORT,
    ),
    "shapes_pope_adversarial": (
        "Is there a cyan cross in the image?",
        "Is there a cyan cross in the image?" + SHORT,
    ),
}


def test_every_text_task_has_a_golden_prompt():
    from tests.eval.test_av_prompts import AV_GOLDEN, AV_SYNTHETIC_GOLDEN

    text_tasks = {t for t in list_tasks() if get_task(t).output_type == "generate_until"}
    assert set(GOLDEN) | set(SYNTHETIC_GOLDEN) | set(AV_GOLDEN) | set(AV_SYNTHETIC_GOLDEN) == text_tasks


@pytest.mark.parametrize("task", sorted(GOLDEN))
def test_prompt_snapshot(task):
    spec = get_task(task)
    if task == "mme":
        spec = dataclasses.replace(spec, reader_args={"subtasks": ["existence", "code_reasoning"]})
    docs = {d.doc_id: d for d in READERS[spec.reader](spec, resolve_files(spec, data_root=FIXTURES))}
    for doc_id, expected in GOLDEN[task].items():
        assert PROMPTS[spec.prompt](docs[doc_id], spec) == expected


@pytest.mark.parametrize("task", sorted(SYNTHETIC_GOLDEN))
def test_synthetic_prompt_snapshot(task):
    spec = get_task(task)
    question, expected = SYNTHETIC_GOLDEN[task]
    assert PROMPTS[spec.prompt](Doc(doc_id="0", question=question, target="x"), spec) == expected


def test_generation_settings_are_frozen():
    expected = {"max_new_tokens": 16, "do_sample": False}
    for task in GOLDEN:
        assert dict(get_task(task).generation) == expected, task
    for task in SYNTHETIC_GOLDEN:
        assert dict(get_task(task).generation) == {"max_new_tokens": 8, "do_sample": False}, task
