"""A tiny deterministic word-level tokenizer for the synthetic world.

Real MoE-LLaVA checkpoints use their LLM's BPE tokenizer; the tiny recipes instead use a word-level vocabulary of a
few hundred entries built from the words that occur in the data and the conversation templates, so a 4-layer LM
learns the task in minutes on a CPU. It is a genuine ``transformers.PreTrainedTokenizerFast`` (built with the
``tokenizers`` library), so the data pipeline, the model and generation use the same API as for a hub tokenizer, and
it serialises to one JSON string that rides in a checkpoint's ``model_args``.

Text is lower-cased and split on whitespace and punctuation; every punctuation mark is its own token. Special tokens:
``<pad>`` (id 0), ``<unk>``, ``<s>`` (bos), ``<|endoftext|>`` (eos, the phi/stablelm end of turn), ``</s>`` (the
vicuna end of turn), ``<image>`` (the image placeholder, expanded by the collate to the vision tower's token count)
and ``"\\n"`` (the plain template's separator, kept as a token because whitespace splitting would drop it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from zoo.conversation import IMAGE_PLACEHOLDER, get_template, list_templates

__all__ = [
    "SPECIAL_TOKENS",
    "BASE_WORDS",
    "build_tokenizer",
    "split_words",
    "tokenizer_to_json",
    "tokenizer_from_json",
]

PAD, UNK, BOS, EOS, EOS_VICUNA, NEWLINE = "<pad>", "<unk>", "<s>", "<|endoftext|>", "</s>", "\n"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, EOS_VICUNA, IMAGE_PLACEHOLDER, NEWLINE)

# Words the synthetic world is known to use (colours, shapes, sizes, positions, counts, question forms), so that a
# tokenizer built without scanning a dataset still covers it; data-derived words are added on top.
BASE_WORDS: tuple[str, ...] = tuple(
    """
    a an the is are there any of in on at to and or with what which where how many color colour shape size
    object objects image picture scene this that it its left right top bottom above below middle center centre
    upper lower than next besides beside side of yes no not none zero one two three four five six seven eight nine
    ten 0 1 2 3 4 5 6 7 8 9 10 red green blue yellow purple orange cyan magenta white black gray grey pink brown
    circle circles square squares triangle triangles star stars cross crosses diamond diamonds hexagon hexagons
    rectangle rectangles ellipse ellipses shape shapes small large big medium tiny
    answer question using single word phrase please describe briefly
    . , ? ! : ; ' " - ( )
    """.split()
)

_SPLIT = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
_NORMALIZER = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def split_words(text: str) -> list[str]:
    """Split ``text`` exactly as the tokenizer does (lower-case, whitespace, isolated punctuation)."""
    return [w for w, _ in _SPLIT.pre_tokenize_str(_NORMALIZER.normalize_str(text))]


def _template_words() -> set[str]:
    words: set[str] = set()
    for name in list_templates():
        t = get_template(name)
        for text in (t.system, *t.roles):
            words.update(split_words(text))
    return words


def build_tokenizer(texts: Iterable[str] = (), extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer over ``BASE_WORDS`` + template words + the words of ``texts``.

    Deterministic: ids are the special tokens first, then the words in sorted order, so the same inputs give the same
    ids on every machine.
    """
    words = set(BASE_WORDS) | _template_words() | set(extra_words)
    for text in texts:
        for part in text.split(IMAGE_PLACEHOLDER):
            words.update(split_words(part))
    words -= set(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(words)])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = _NORMALIZER
    backend.pre_tokenizer = _SPLIT
    # No decoder: the backend then joins word-level tokens with single spaces, which is what we want.
    # Special tokens are matched on the raw text before normalisation, so `<image>` and `\n` survive splitting.
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return _wrap(backend)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[EOS_VICUNA, IMAGE_PLACEHOLDER, NEWLINE],
        padding_side="right",
        model_max_length=4096,
    )
    return tok


def tokenizer_to_json(tok: PreTrainedTokenizerFast) -> str:
    """One JSON string holding the whole tokenizer (fit for ``model_args``)."""
    return tok.backend_tokenizer.to_str()


def tokenizer_from_json(blob: str | dict) -> PreTrainedTokenizerFast:
    """Rebuild a tokenizer written by ``tokenizer_to_json`` (a JSON string or its parsed dict)."""
    text = blob if isinstance(blob, str) else json.dumps(blob)
    return _wrap(Tokenizer.from_str(text))
