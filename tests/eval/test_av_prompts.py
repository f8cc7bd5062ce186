"""Golden prompts and generation settings of the audio / video / speech tasks (see test_prompts.py)."""

from __future__ import annotations

import pytest

from eval.registry import PROMPTS, READERS, Doc, get_task, resolve_files
from tests.eval.conftest import FIXTURES

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."

# task -> ({doc_id: prompt} for documents read from the task's fixture, generation settings)
AV_GOLDEN: dict[str, tuple[dict[str, str], dict]] = {
    "clotho_aqa_test_all": ({"0/2": "Is it raining?\nAnswer the question using a single word only. "},
                            {"max_new_tokens": 8, "do_sample": False}),
    "clotho_aqa_test_majority": ({"3": "What animal is heard?\nAnswer the question using a single word only. "},
                                 {"max_new_tokens": 8, "do_sample": False}),
    "clotho_v2_eval": ({"traffic.wav": "Generate audio caption."}, {"max_new_tokens": 48, "do_sample": False}),
    "audiocaps_test": ({"xyz789_0": "Generate audio caption."}, {"max_new_tokens": 48, "do_sample": False}),
    "msvd_qa": ({"2": "what is running on the grass?" + SHORT}, {"max_new_tokens": 16, "do_sample": False}),
    "activitynet_qa": ({"v_def_1": "How many people are there? Answer the question using a single word or phrase."},
                       {"max_new_tokens": 64, "do_sample": False}),
    "mmbench_audio": ({"0": "A. blue\nB. red\nC. green\nD. yellow" + LETTER},
                      {"max_new_tokens": 16, "do_sample": False}),
    "english_listening": ({"l1": "What does the speaker ask you to do first?\nA. listen\nB. sing\nC. leave" + LETTER},
                          {"max_new_tokens": 16, "do_sample": False}),
}  # fmt: skip

# Generated benchmarks: a hand-made document, so a change of the world does not look like a prompt change.
AV_SYNTHETIC_GOLDEN = {
    "shapes_video_qa": ("Which direction does the red circle move?", "Which direction does the red circle move?" + SHORT),
    "shapes_audio_qa": ("How many sounds are there?", "How many sounds are there?" + SHORT),
    "shapes_speech_vqa": ("", "Answer the spoken question using a single word or phrase."),
}


@pytest.mark.parametrize("task", sorted(AV_GOLDEN))
def test_av_prompt_snapshot(task):
    spec = get_task(task)
    golden, generation = AV_GOLDEN[task]
    docs = {d.doc_id: d for d in READERS[spec.reader](spec, resolve_files(spec, data_root=FIXTURES))}
    for doc_id, expected in golden.items():
        assert PROMPTS[spec.prompt](docs[doc_id], spec) == expected
    assert dict(get_task(task).generation) == generation


@pytest.mark.parametrize("task", sorted(AV_SYNTHETIC_GOLDEN))
def test_av_synthetic_prompt_snapshot(task):
    spec = get_task(task)
    question, expected = AV_SYNTHETIC_GOLDEN[task]
    assert PROMPTS[spec.prompt](Doc(doc_id="0", question=question, target="x"), spec) == expected
    assert dict(spec.generation) == {"max_new_tokens": 8, "do_sample": False}
