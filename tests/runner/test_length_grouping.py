"""Length-grouped batches (`group_by_length`): same samples as random batches, less padding, still resumable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import yaml

from zoo.stages.base import LengthGroupedBatchSampler, StepBatchSampler

LENGTHS = np.random.default_rng(0).integers(80, 170, size=103)  # 103: epochs end mid-batch and mid-megabatch


def batches(sampler, n: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), n))


def padding_share(lengths: np.ndarray, stream: list[list[int]]) -> float:
    padded = sum(int(lengths[b].max()) * len(b) for b in stream)
    return 1.0 - sum(int(lengths[b].sum()) for b in stream) / padded


def test_a_megabatch_holds_the_random_stream_samples_and_pads_less():
    B, G, n = 8, 4, 40
    plain = batches(StepBatchSampler(len(LENGTHS), B, seed=5), n)
    grouped = batches(LengthGroupedBatchSampler(len(LENGTHS), B, 5, LENGTHS, G), n)
    for m in range(n // G):  # megabatch m: the same multiset of samples, regrouped
        same = sorted(i for b in plain[m * G : (m + 1) * G] for i in b)
        assert sorted(i for b in grouped[m * G : (m + 1) * G] for i in b) == same
    assert all(len(b) == B for b in grouped)
    # sorted within a megabatch: each batch's lengths are a contiguous slice of the sorted megabatch
    for m in range(n // G):
        mega = grouped[m * G : (m + 1) * G]
        spans = sorted((int(LENGTHS[b].min()), int(LENGTHS[b].max())) for b in mega)
        assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:], strict=False))
    random_pad, grouped_pad = padding_share(LENGTHS, plain), padding_share(LENGTHS, grouped)
    assert random_pad > 0.15 and grouped_pad < random_pad / 2, (random_pad, grouped_pad)


def test_batch_order_within_a_megabatch_is_shuffled_not_longest_first():
    stream = batches(LengthGroupedBatchSampler(len(LENGTHS), 4, 1, LENGTHS, 8), 80)
    firsts = [int(LENGTHS[stream[m * 8]].max()) for m in range(10)]
    maxima = [max(int(LENGTHS[b].max()) for b in stream[m * 8 : (m + 1) * 8]) for m in range(10)]
    assert firsts != maxima  # a sorted order would start every megabatch with its longest batch


def test_a_batch_is_a_pure_function_of_its_position_for_resume_and_sharding():
    B, G = 6, 3
    stream = batches(LengthGroupedBatchSampler(len(LENGTHS), B, 9, LENGTHS, G), 30)
    # resumed at micro-batch 7 (inside a megabatch): the same batches from there on
    assert batches(LengthGroupedBatchSampler(len(LENGTHS), B, 9, LENGTHS, G, start=7), 23) == stream[7:]
    # two ranks with half the batch see the two halves of the one-process global batch
    r0 = batches(LengthGroupedBatchSampler(len(LENGTHS), B // 2, 9, LENGTHS, G, rank=0, world_size=2), 30)
    r1 = batches(LengthGroupedBatchSampler(len(LENGTHS), B // 2, 9, LENGTHS, G, rank=1, world_size=2), 30)
    assert [a + b for a, b in zip(r0, r1, strict=True)] == stream
    # another seed, other batches
    assert batches(LengthGroupedBatchSampler(len(LENGTHS), B, 10, LENGTHS, G), 30) != stream


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="lengths has 3 entries for a dataset of 103"):
        LengthGroupedBatchSampler(103, 4, 0, [1, 2, 3], 2)
    with pytest.raises(ValueError, match="group is 0"):
        LengthGroupedBatchSampler(len(LENGTHS), 4, 0, LENGTHS, 0)


def test_recipe_validation_refuses_grouping_for_a_stage_type_without_lengths(tmp_path, tiny_stage):
    from zoo.recipe import RecipeError, load_recipe

    stage = {"name": "a", "type": "runner_tiny_regression", "batch_size": 4, "group_by_length": 8,
             "trainer": {"max_steps": 2}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"recipe": "r", "stages": [stage]}))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.group_by_length.*does not report sample lengths"):
        load_recipe(path)
    stage["type"] = "runner_tiny_lengths"
    path.write_text(yaml.safe_dump({"recipe": "r", "stages": [stage]}))
    assert load_recipe(path).stages[0].group_by_length == 8
