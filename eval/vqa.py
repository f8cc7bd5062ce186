"""VQA accuracy exactly as the official VQA evaluator computes it, and the answer processors around it.

Three scorers share the same leave-one-out formula and differ only in which text processing runs first
(see ``shared/reference/eval_metrics.md`` 1.2-1.5):

* :func:`vqa_accuracy`: the official ``vqaEval.py`` (GT-Vision-Lab/VQA @ a013f00) for one question. Newlines and tabs
  become spaces and both sides are stripped; *only if the human answers disagree* are punctuation, digit words,
  articles and contractions normalised on both sides (the unanimity gate), so ``"Yes"`` scores 0 against ten
  ``"yes"``.
* :func:`llava_answer_processor`: the EvalAI/MMF answer processor LLaVA-1.5 runs over every prediction before
  writing a VQAv2 / VizWiz submission (lowercase, delete ``,`` and ``?``, split ``'s``, then the official steps).
  The VQAv2 task feeds ``vqa_accuracy(llava_answer_processor(pred), answers)``, which is what the EvalAI server
  returns for LLaVA's submission file.
* :func:`mmf_vqa_accuracy`: MMF's ``TextVQAAccuracyEvaluator`` used by LLaVA for TextVQA (and by lmms-eval for
  TextVQA / VizWiz): the processor on both sides, no unanimity gate.

Quirks reproduced on purpose (each has a test):

* the digit-comma-digit test (``1,000``) switches *every* listed punctuation character to deletion for the whole
  string, otherwise a listed character touching a space is deleted and an embedded one becomes a space;
* the period rule deletes every ``.`` not followed by a digit (the look-behind in the official regex is malformed)
  and deletes at most 32 of them (``re.UNICODE`` lands in ``count``);
* ``none`` maps to ``0``; only ``zero``..``ten`` are mapped; articles are dropped anywhere in the phrase;
* the contraction keys ``Im``, ``Ive``, ``Id've``, ``I'dve`` contain capitals and never match after lowercasing, and
  ``somebody'd`` maps to ``somebodyd``;
* leave-one-out is by annotator index, not by answer value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "CONTRACTIONS",
    "NUMBER_MAP",
    "ARTICLES",
    "PUNCTUATION",
    "process_punctuation",
    "process_digit_article",
    "llava_answer_processor",
    "leave_one_out_accuracy",
    "vqa_accuracy",
    "mmf_vqa_accuracy",
]

# The 21 characters of the official punctuation list. Apostrophe, colon, '#', '$', '%', '&', '*' and '.' are not in
# it ('.' has its own rule below).
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')
NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official table: apostrophe-less spelling -> the apostrophe form (120 entries, odd ones kept as they are).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Effective official rule: a period not followed by a digit. Written without the malformed look-behind.
_PERIOD = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_LIMIT = 32  # re.UNICODE passed positionally as `count` in vqaEval.py


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: per listed character, delete or replace by a space; then periods."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        # The test looks at the *original* text; the decision applies to every occurrence of this character.
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words -> digits, drop articles, add apostrophes."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def llava_answer_processor(text: str) -> str:
    """MMF's ``EvalAIAnswerProcessor`` (LLaVA ``m4c_evaluator.py``), applied by LLaVA-1.5 to every prediction."""
    # word_tokenize: the step the raw official functions do not have.
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean(text)
    return process_digit_article(process_punctuation(text))


def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over annotators i of min(1, #{j != i: answers[j] == prediction} / 3); exclusion is by index."""
    if not answers:
        return 0.0
    matches = sum(1 for a in answers if a == prediction)
    total = 0.0
    for a in answers:
        # Leaving annotator i out removes one match exactly when i's own answer matches.
        others = matches - (1 if a == prediction else 0)
        total += min(1.0, others / 3)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """What the official VQA evaluator scores for one question (0..1), raw prediction and human answers given."""
    gts = [_clean(a) for a in answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:  # the unanimity gate (vqaEval.py @ a013f00)
        gts = [process_digit_article(process_punctuation(g)) for g in gts]
        pred = process_digit_article(process_punctuation(pred))
    return leave_one_out_accuracy(pred, gts)


def mmf_vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """MMF ``TextVQAAccuracyEvaluator`` for one question: the processor on both sides, no unanimity gate."""
    gts = [llava_answer_processor(a) for a in answers]
    return leave_one_out_accuracy(llava_answer_processor(prediction), gts)
