"""Prompt builders: a document -> the user-turn text (LLaVA-1.5 / lmms-eval wording).

The text is what LLaVA calls ``cur_prompt``: no image placeholder and no conversation template. The model adds its
own template and image tokens, so one task serves every model family. The exact strings are frozen in
``tests/eval/test_prompts.py``.
"""

from __future__ import annotations

from eval.registry import Doc, TaskSpec, register_prompt

__all__ = ["question_prompt", "textvqa_prompt", "scienceqa_prompt", "mmbench_prompt", "mme_prompt"]


@register_prompt("question")
def question_prompt(doc: Doc, spec: TaskSpec) -> str:
    return f"{spec.pre_prompt}{doc.question}{spec.post_prompt}"


@register_prompt("textvqa")
def textvqa_prompt(doc: Doc, spec: TaskSpec) -> str:
    """LLaVA's ``llava_textvqa_val_v051_ocr`` layout: question, then ``Reference OCR token: a, b, c``.

    The line is left out when a question has no OCR tokens (what LLaVA's file does then is unverified).
    """
    tokens = doc.fields.get("ocr_tokens") or []
    ocr = (
        f"\nReference OCR token: {', '.join(tokens)}" if spec.prompt_args.get("ocr", True) and tokens else ""
    )
    return f"{spec.pre_prompt}{doc.question}{ocr}{spec.post_prompt}"


@register_prompt("scienceqa")
def scienceqa_prompt(doc: Doc, spec: TaskSpec) -> str:
    """``Context: <hint>`` line when there is a hint, the question, ``A. choice`` lines, then the suffix."""
    hint = doc.fields.get("hint") or ""
    context = f"Context: {hint}\n" if hint else ""
    choices = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(doc.fields["choices"]))
    return f"{spec.pre_prompt}{context}{doc.question}\n{choices}{spec.post_prompt}"


@register_prompt("mmbench")
def mmbench_prompt(doc: Doc, spec: TaskSpec) -> str:
    """LLaVA ``model_vqa_mmbench.py``: ``hint\\n`` if any, question, ``\\nA. option`` per option, then the suffix."""
    hint = doc.fields.get("hint") or ""
    text = f"{hint}\n{doc.question}" if hint else doc.question
    for letter, option in doc.fields["options"].items():
        text += f"\n{letter}. {option}"
    return f"{spec.pre_prompt}{text}{spec.post_prompt}"


@register_prompt("mme")
def mme_prompt(doc: Doc, spec: TaskSpec) -> str:
    """lmms-eval ``mme``: the question's own " Please answer yes or no." is replaced by the task's post-prompt."""
    suffix = spec.prompt_args.get("replace_suffix", " Please answer yes or no.")
    question = doc.question
    if suffix and question.endswith(suffix):
        question = question[: -len(suffix)]
    return f"{spec.pre_prompt}{question}{spec.post_prompt}"
