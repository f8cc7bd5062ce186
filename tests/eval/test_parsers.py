"""Answer parsers of POPE, MME, ScienceQA, MMBench and GQA, on hand-worked cases."""

from __future__ import annotations

import pytest

from eval.parsers import (
    gqa_process,
    mmbench_extract,
    mmbench_infer_option,
    mmbench_infer_text,
    mme_parse,
    pope_is_unparsed,
    pope_parse,
    scienceqa_extract,
)


@pytest.mark.parametrize(
    "text,label",
    [
        ("Yes", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("no, there is none", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # only the exact tokens No / not / no
        ("Nope", "yes"),
        ("", "yes"),  # nothing -> yes (POPE's rule)
        ("There isn't", "yes"),
    ],
)
def test_pope_parse(text, label):
    assert pope_parse(text) == label


def test_pope_comma_deletion_glues_words():
    # Commas are deleted, not replaced: "no,dog" becomes the token "nodog", so no negation is seen.
    assert pope_parse("I see no,dog") == "yes"
    assert pope_parse("No, no dog") == "no"


def test_pope_unparsed_flag():
    assert pope_is_unparsed("")
    assert pope_is_unparsed("a dog")
    assert not pope_is_unparsed("Yes.")
    assert not pope_is_unparsed("NO")


@pytest.mark.parametrize(
    "text,label",
    [
        ("yes", "yes"),
        ("Yes", "yes"),
        ("No, it is not.", "no"),
        ("not sure", "no"),  # "no" inside the first 4 characters
        ("none", "no"),
        ("Yes\n", "yes"),
        ("i think yes", None),  # beyond the first 4 characters: "other"
        ("y", None),
        ("", None),
    ],
)
def test_mme_parse(text, label):
    assert mme_parse(text) == label


@pytest.mark.parametrize(
    "text,n,index",
    [
        ("A", 4, 0),
        ("C. Arizona", 4, 2),
        ("The answer is B.", 4, 1),
        ("The answer is BX", 4, 1),  # the '.' in LLaVA's regex is any character
        ("The answer is B", 4, None),  # ... but one must follow
        ("The answer is A. The answer is B.", 4, None),  # more than one match: FAILED
        ("E", 3, None),  # letter beyond the choices
        ("a", 4, None),  # lowercase is not a letter answer
        ("C.", 4, None),  # "C." without the space is not the "X. " form
        ("I think it's the first one", 4, None),
    ],
)
def test_scienceqa_extract(text, n, index):
    assert scienceqa_extract(text, n) == index


@pytest.mark.parametrize(
    "text,letter",
    [
        ("B", "B"),
        ("B. square", "B"),
        ("(C)", "C"),
        ("The answer is D).", "D"),
        ("A cat sits on it", None),  # a bare "A" in a >3-token answer may be the article
        ("A", "A"),
        ("A or B", None),  # two letters
        ("answer:C", None),  # not whitespace-separated
    ],
)
def test_mmbench_infer_option(text, letter):
    assert mmbench_infer_option(text) == letter


def test_mmbench_infer_text_and_extract():
    options = {"A": "red", "B": "green", "C": "blue"}
    assert mmbench_infer_text("It is Blue", options) == "C"
    assert mmbench_infer_text("red and blue", options) is None
    assert mmbench_extract("Mostly green, I think", options) == "B"
    assert mmbench_extract("no idea", options) is None


def test_gqa_process():
    assert gqa_process("Yes.") == "yes"
    assert gqa_process("T-shirt...") == "t-shirt"
    assert gqa_process("blue") == "blue"
