"""The official VQA evaluator's accuracy and normalisation, hand-worked (eval_metrics.md 1.2-1.5)."""

from __future__ import annotations

import pytest

from eval.vqa import (
    CONTRACTIONS,
    PUNCTUATION,
    leave_one_out_accuracy,
    llava_answer_processor,
    mmf_vqa_accuracy,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)


@pytest.mark.parametrize("k,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_table(k, expected):
    # k matching annotators of 10: (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
    answers = ["cat"] * k + [f"other{i}" for i in range(10 - k)]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_leave_one_out_is_by_index_not_value():
    # Excluding "every annotator with this value" would give 0 for a single match; by index it is 0.3.
    assert leave_one_out_accuracy("a", ["a", "a", "b", "b", "b", "b", "b", "b", "b", "b"]) == pytest.approx(
        0.6
    )
    assert leave_one_out_accuracy("x", []) == 0.0


def test_unanimity_gate_skips_normalisation():
    yes10 = ["yes"] * 10
    assert vqa_accuracy("Yes", yes10) == 0.0  # raw, case-sensitive comparison when annotators agree
    assert vqa_accuracy("yes.", yes10) == 0.0
    assert vqa_accuracy(" yes\n", yes10) == 1.0  # only newline/tab -> space and strip are applied
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    # LLaVA pre-normalises predictions, which is what makes the official number meaningful.
    assert vqa_accuracy(llava_answer_processor("Yes."), yes10) == 1.0
    assert vqa_accuracy(llava_answer_processor("Two"), ["2"] * 10) == 1.0


def test_disagreeing_answers_normalise_both_sides():
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == pytest.approx(1.0)
    assert vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("the dog", ["a dog"] * 5 + ["dog"] * 5) == pytest.approx(1.0)
    assert vqa_accuracy("dont know", ["don't know"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("none", ["0"] * 3 + ["1"] * 7) == pytest.approx(0.9)


def test_punctuation_list_is_the_official_21():
    assert "".join(PUNCTUATION) == ';/[]"{}()=+\\_-><@`,?!'
    assert len(PUNCTUATION) == 21


@pytest.mark.parametrize(
    "text,expected",
    [
        ("red - white-blue", "red  whiteblue"),  # " -" somewhere: every "-" deleted, per character type
        ("t-shirt", "t shirt"),  # embedded: replaced by a space
        ("1,2-3", "123"),  # digit-comma-digit: *all* listed characters deleted
        ("1,000 dollars", "1000 dollars"),
        ("hi, there", "hi there"),
        ("yes!", "yes "),
        ("it's 5:30 #1 $2 50% a&b", "it's 5:30 #1 $2 50% a&b"),  # apostrophe, colon, # $ % & are kept
        ("3.5", "3.5"),  # a decimal point stays
        (".5 liters.", ".5 liters"),  # no leading zero added; final period removed
        ("mr. t.", "mr t"),
        ("." * 40, "." * 8),  # re.UNICODE lands in `count`: at most 32 periods removed
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Two Dogs", "2 dogs"),
        ("none", "0"),  # none -> 0
        ("ten eleven", "10 eleven"),  # nothing above ten
        ("A dog and the cat", "dog and cat"),  # articles dropped anywhere
        ("an", ""),
        ("dont know", "don't know"),
        ("whats up", "what's up"),
        ("oclock", "o'clock"),
        ("Im here", "im here"),  # key "Im" has a capital: can never match after lowercasing
        ("somebody'd", "somebodyd"),  # the table's wrong-way entry
        ("red   and    blue", "red and blue"),  # whitespace collapsed
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_contraction_table_size_and_quirks():
    assert len(CONTRACTIONS) == 120
    assert {"Im", "Ive", "Id've", "I'dve"} <= set(CONTRACTIONS)
    assert CONTRACTIONS["somebody'd"] == "somebodyd"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes", "yes"),
        ("What?", "what"),
        ("It's red.", "it 's red"),  # word_tokenize splits 's
        (
            "1,2-3",
            "12 3",
        ),  # comma removed first, so the digit-comma-digit rule no longer fires (differs from official)
        ("Two, three", "2 3"),
        ("Unanswerable", "unanswerable"),
        ("\tThe  answer\n", "answer"),
    ],
)
def test_llava_answer_processor(text, expected):
    assert llava_answer_processor(text) == expected


def test_official_and_llava_diverge_on_digit_comma():
    gts = ["123"] * 4 + ["x"] * 6
    assert vqa_accuracy("1,2-3", gts) == pytest.approx(1.0)
    assert vqa_accuracy(llava_answer_processor("1,2-3"), gts) == 0.0


def test_mmf_accuracy_has_no_gate():
    assert mmf_vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    assert mmf_vqa_accuracy("Dakota", ["dakota"] * 5 + ["dakota digital"] * 3 + ["x", "y"]) == pytest.approx(
        1.0
    )
    assert mmf_vqa_accuracy(
        "dakota digital", ["dakota"] * 5 + ["dakota digital"] * 3 + ["x", "y"]
    ) == pytest.approx(0.9)
