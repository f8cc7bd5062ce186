"""Tokenizer and conversation templates: exact strings per MoE-LLaVA's conversation.py, round trips, determinism."""

from __future__ import annotations

import dataclasses

import pytest

from zoo.conversation import Turn, get_template, list_templates
from zoo.tokenizers import (
    SPECIAL_TOKENS,
    build_tokenizer,
    split_words,
    tokenizer_from_json,
    tokenizer_to_json,
)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def test_phi_template_matches_reference_format():
    turns = [Turn("human", "<image>\nWhat colour?"), Turn("gpt", "red"), Turn("human", "Shape?"), Turn("gpt", "star")]
    text = get_template("phi").render(turns)
    assert text == (
        SYSTEM + " USER: <image>\nWhat colour? ASSISTANT: red<|endoftext|>USER: Shape? ASSISTANT: star<|endoftext|>"
    )
    assert get_template("vicuna_v1").render(turns).endswith("ASSISTANT: star</s>")
    assert get_template("phi").prompt("Shape?", turns[:2]).endswith("<|endoftext|>USER: Shape? ASSISTANT:")


def test_plain_template_keeps_only_image_and_caption():
    segs = get_template("plain").segments([Turn("human", "<image>\nDescribe."), Turn("gpt", "a red star")])
    assert segs == [("<image>", False), ("a red star\n", True)]


def test_templates_are_frozen_and_validate_turn_order():
    assert {"plain", "phi", "qwen", "stablelm", "vicuna_v1"} <= set(list_templates())
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_template("phi").sep2 = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="turn 1 is from 'human'"):
        get_template("phi").render([Turn("human", "a"), Turn("human", "b")])
    with pytest.raises(KeyError, match="known"):
        get_template("nope")


def test_tokenizer_is_deterministic_and_round_trips():
    texts = ["There is a RED circle left of the blue square.", "How many stars?"]
    a, b = build_tokenizer(texts), build_tokenizer(list(reversed(texts)))
    assert a.get_vocab() == b.get_vocab()
    assert [a.convert_ids_to_tokens(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert a.pad_token_id == 0 and a.eos_token == "<|endoftext|>"
    text = get_template("phi").render([Turn("human", "<image>\nWhat colour is the circle?"), Turn("gpt", "Red")])
    ids = a(text, add_special_tokens=False).input_ids
    assert a.unk_token_id not in ids
    assert ids.count(a.convert_tokens_to_ids("<image>")) == 1 and ids[-1] == a.eos_token_id
    c = tokenizer_from_json(tokenizer_to_json(a))
    assert c(text, add_special_tokens=False).input_ids == ids
    assert c.decode(ids, skip_special_tokens=True).endswith("assistant : red")
    assert split_words("Left-of, it's") == ["left", "-", "of", ",", "it", "'", "s"]
