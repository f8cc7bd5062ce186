"""Conversation templates: how a list of (human, gpt) turns becomes one training or prompt string.

Templates are frozen registered objects (names as in MoE-LLaVA's ``conv_templates``), so a recipe or a checkpoint's
config names a template and nothing else decides the format. Two separator styles cover MoE-LLaVA:

* ``plain`` (stage I alignment): ``<image>`` + caption + ``"\\n"``; the human turn is reduced to its image placeholder
  and only the caption and the separator are supervised.
* ``two`` (stages II/III; ``phi``, ``qwen``, ``stablelm``, ``vicuna_v1``): ``system + sep + "USER: q" + sep +
  "ASSISTANT: a" + sep2 + ...`` with sep=" " and sep2 the end-of-turn token, which is also what the assistant learns
  to emit and what generation stops on.

``Template.segments`` returns the rendered conversation as (text, supervised) pieces, so that masking is exact by
construction: the data pipeline tokenizes each piece and sets labels only on supervised pieces, instead of
re-tokenizing a rendered string and counting lengths (the source of MoE-LLaVA's "tokenization mismatch" samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "IMAGE_PLACEHOLDER",
    "SeparatorStyle",
    "Template",
    "Turn",
    "register_template",
    "get_template",
    "list_templates",
]

IMAGE_PLACEHOLDER = "<image>"

# MoE-LLaVA's (and Vicuna v1.1's) system prompt for the chat templates.
_CHAT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class SeparatorStyle(str, Enum):
    PLAIN = "plain"
    TWO = "two"


@dataclass(frozen=True, slots=True)
class Turn:
    """One message: ``role`` is ``"human"`` or ``"gpt"`` (LLaVA JSON's ``from`` values)."""

    role: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Template:
    name: str
    style: SeparatorStyle
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = ""

    @property
    def stop_str(self) -> str:
        """The string the assistant emits at the end of its answer (generation stops on it)."""
        return self.sep if self.style is SeparatorStyle.PLAIN else self.sep2

    def segments(self, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
        """Render ``turns`` as ``(text, supervised)`` pieces whose concatenation is the full conversation string."""
        _check_alternation(turns, self.name)
        out: list[tuple[str, bool]] = []
        if self.style is SeparatorStyle.PLAIN:
            # LLaVA's plain format keeps only the image of the human turn (captions carry no question).
            for i in range(0, len(turns), 2):
                human, gpt = turns[i], turns[i + 1] if i + 1 < len(turns) else None
                out.append((IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in human.text else "", False))
                if gpt is not None:
                    out.append((gpt.text + self.sep, True))
            return [s for s in out if s[0]]
        user, assistant = self.roles
        prefix = self.system + self.sep if self.system else ""
        for i in range(0, len(turns), 2):
            human = turns[i]
            gpt = turns[i + 1] if i + 1 < len(turns) else None
            out.append((f"{prefix}{user}: {human.text}{self.sep}{assistant}:", False))
            prefix = ""
            if gpt is not None:
                out.append((f" {gpt.text}{self.sep2}", True))
        return out

    def render(self, turns: Sequence[Turn]) -> str:
        return "".join(text for text, _ in self.segments(turns))

    def prompt(self, question: str, history: Sequence[Turn] = ()) -> str:
        """The generation prompt for ``question`` after ``history``: ends where the assistant's answer starts."""
        return self.render([*history, Turn("human", question)])


def _check_alternation(turns: Sequence[Turn], name: str) -> None:
    for i, t in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if t.role != want:
            raise ValueError(
                f"template {name!r}: turn {i} is from {t.role!r}, expected {want!r} "
                "(conversations alternate human, gpt, human, ... starting with human)"
            )


_TEMPLATES: dict[str, Template] = {}


def register_template(template: Template) -> Template:
    if template.name in _TEMPLATES and _TEMPLATES[template.name] != template:
        raise ValueError(f"conversation template {template.name!r} is registered twice")
    _TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> Template:
    if name not in _TEMPLATES:
        raise KeyError(f"unknown conversation template {name!r}; known: {', '.join(list_templates())}")
    return _TEMPLATES[name]


def list_templates() -> list[str]:
    return sorted(_TEMPLATES)


PLAIN = register_template(Template(name="plain", style=SeparatorStyle.PLAIN, roles=("", ""), sep="\n"))
PHI = register_template(
    Template(name="phi", style=SeparatorStyle.TWO, system=_CHAT_SYSTEM, sep=" ", sep2="<|endoftext|>")
)
# MoE-LLaVA maps the ``qwen`` conv mode to the phi template object.
QWEN = register_template(
    Template(name="qwen", style=SeparatorStyle.TWO, system=_CHAT_SYSTEM, sep=" ", sep2="<|endoftext|>")
)
STABLELM = register_template(
    Template(name="stablelm", style=SeparatorStyle.TWO, system=_CHAT_SYSTEM, sep=" ", sep2="<|endoftext|>")
)
# The tiny CPU recipes: phi's roles and separators without the 33-token system prompt, which carries no information
# for a model trained from scratch and would cost a sixth of every training sequence.
PHI_NOSYSTEM = register_template(
    Template(name="phi_nosystem", style=SeparatorStyle.TWO, system="", sep=" ", sep2="<|endoftext|>")
)
VICUNA_V1 = register_template(
    Template(name="vicuna_v1", style=SeparatorStyle.TWO, system=_CHAT_SYSTEM, sep=" ", sep2="</s>")
)
