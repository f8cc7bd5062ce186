"""Answer parsers of the official / LLaVA-1.5 scorers: raw model text -> the label the scorer compares.

Every parser returns ``None`` when the text parses to nothing; the scorers count those as wrong and report how many
there were (``n_unparsed``). Where the official parser has no "nothing" outcome (POPE maps anything without a
negation to "yes") the official label is kept and the separate ``is_unparsed`` predicate only feeds the count.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

__all__ = [
    "pope_parse",
    "pope_is_unparsed",
    "mme_parse",
    "scienceqa_extract",
    "mmbench_infer_option",
    "mmbench_infer_text",
    "mmbench_extract",
    "gqa_process",
]


# ---------------------------------------------------------------------------------------------------------------- POPE
def pope_parse(text: str) -> str:
    """POPE ``evaluate.py`` / LLaVA ``eval_pope.py``: first sentence, drop commas, "no" iff a token is No/not/no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")  # split on single spaces, as the original does
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_is_unparsed(text: str) -> bool:
    """True when the first sentence holds neither a yes nor a no token (any case); POPE still scores it as "yes"."""
    first = text.split(".")[0] if "." in text else text
    tokens = {t.strip(string.punctuation).lower() for t in first.replace(",", " ").split()}
    return not (tokens & {"yes", "no", "not"})


# ----------------------------------------------------------------------------------------------------------------- MME
def mme_parse(text: str) -> str | None:
    """MME ``calculation.py``: lowercase; exactly yes/no, else "yes" / "no" inside the first 4 characters."""
    pred = text.lower()
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return None  # the official "other": always wrong


# ----------------------------------------------------------------------------------------------------------- ScienceQA
_SQA_OPTIONS = ("A", "B", "C", "D", "E")
# The '.' is unescaped in LLaVA's pattern, so any character may follow the letter.
_SQA_PATTERN = re.compile(r"The answer is ([A-Z]).")


def scienceqa_extract(text: str, num_choices: int) -> int | None:
    """LLaVA ``eval_science_qa.py``: the predicted choice index, or None (``FAILED``, scored wrong)."""
    if text in _SQA_OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in _SQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _SQA_PATTERN.findall(text)
        if len(found) != 1:
            return None
        letter = found[0]
    if letter not in _SQA_OPTIONS[:num_choices]:
        return None
    return _SQA_OPTIONS.index(letter)


# ------------------------------------------------------------------------------------------------------------- MMBench
_MMB_FORMS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
              (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))  # fmt: skip


def mmbench_infer_option(answer: str, num_choices: int = 5) -> str | None:
    """lmms-eval / VLMEvalKit ``can_infer_option``: one bare letter among whitespace tokens, or one ``A.``-like form.

    A bare ``A`` in an answer of more than 3 tokens may be the article, so then only the punctuated forms count.
    """
    letters = string.ascii_uppercase[:num_choices]
    tokens = [t.strip() for t in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(1 for c in letters if prefix + c + suffix in tokens)

    if count() == 1 and not ("A" in tokens and len(tokens) > 3):
        return next(c for c in letters if c in tokens)
    for prefix, suffix in _MMB_FORMS:
        if count(prefix, suffix) == 1:
            return next(c for c in letters if prefix + c + suffix in tokens)
    return None


def mmbench_infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    """``can_infer_text``: exactly one option's text occurs (lowercased) in the answer."""
    low = answer.lower()
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def mmbench_extract(answer: str, options: Mapping[str, str]) -> str | None:
    """Letter by option form first, then by option text. No GPT judge and no random fallback: None is wrong."""
    return mmbench_infer_option(answer) or mmbench_infer_text(answer, options)


# ----------------------------------------------------------------------------------------------------------------- GQA
def gqa_process(text: str) -> str:
    """LLaVA ``convert_gqa_for_eval.py``: drop trailing periods, lowercase; GQA ``eval.py`` then compares exactly."""
    return text.rstrip(".").lower()


def option_letters(n: int) -> Sequence[str]:
    return string.ascii_uppercase[:n]
