"""Modalities of a LLaVA-like model: how a kind of media (images, video frames, audio, speech) enters the LM.

A prompt names media by placeholders (``<image>``, ``<audio>``...). Each placeholder is expanded to
``tokens_per_item`` copies of the modality's placeholder id in ``input_ids``; the model embeds the text, encodes the
media items and writes their features over those positions, item after item in order of appearance (row by row of
the batch, placeholder by placeholder within a row). One description serves every modality:

* ``PlaceholderSpec`` is the text side (what the data pipeline and prompt encoding need): the placeholder string,
  its id in ``input_ids`` and how many positions one item takes.
* ``Modality`` adds the model side: the keyword under which a batch of items reaches the model
  (``pixel_values``), how one raw item becomes a tensor (``prepare``) and the encoder + projector (``encode``:
  ``[N_items, ...] -> [N_items, tokens_per_item, D_lm]``).

Batching: the items of one modality in a batch are stacked along a new first dimension, so ``prepare`` must give
every item of a modality the same shape (images are resized to the tower's size; a family whose clips differ in
length resamples or pads them there, and its encoder keeps ``tokens_per_item`` fixed, as Uni-MoE's encoders do). A
modality with no item in the batch is simply absent (its tensor is None): no dummy tensors; which positions hold
which modality is read from ``input_ids`` (``media_mask``), never from a per-sample flag.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PlaceholderSpec",
    "Modality",
    "split_placeholders",
    "expand_placeholders",
    "count_placeholders",
    "media_mask",
    "fill_media",
    "check_distinct",
]


@dataclass(frozen=True, kw_only=True)
class PlaceholderSpec:
    """The text side of a modality.

    Attributes:
        name: ``image``, ``video``, ``audio``, ``speech``...; the key of its items in ``generate(media=...)``.
        placeholder: the string that stands for one item in a prompt (``<image>``).
        token_id: the id every position of an item gets in ``input_ids``; it may lie outside the vocabulary (official
            MoE-LLaVA uses -200), because media positions are masked before the embedding lookup.
        tokens_per_item: positions one item takes in the sequence.
    """

    name: str
    placeholder: str
    token_id: int
    tokens_per_item: int

    def __post_init__(self) -> None:
        if not self.placeholder:
            raise ValueError(f"modality {self.name!r}: the placeholder string is empty")
        if self.tokens_per_item < 1:
            raise ValueError(
                f"modality {self.name!r}: tokens_per_item must be >= 1, got {self.tokens_per_item}"
            )


@dataclass(frozen=True, kw_only=True)
class Modality(PlaceholderSpec):
    """A modality as the model runs it (see the module docstring).

    Attributes:
        input_key: the keyword of ``embed_multimodal`` / ``forward`` that carries the stacked items
            (``pixel_values`` for images).
        prepare: one raw item (a PIL image, a waveform) -> its tensor; every item of the modality gets the same shape.
        encode: ``[N_items, ...]`` -> features ``[N_items, tokens_per_item, D_lm]`` (encoder + projector).
    """

    input_key: str
    prepare: Callable[[Any], torch.Tensor]
    encode: Callable[[torch.Tensor], torch.Tensor]


def check_distinct(specs: Iterable[PlaceholderSpec]) -> None:
    """Raise unless names, placeholders, ids (and input keys) differ between modalities: each must be unambiguous."""
    specs = list(specs)
    fields = ["name", "placeholder", "token_id"] + (
        ["input_key"] if all(isinstance(s, Modality) for s in specs) else []
    )
    for f in fields:
        values = [getattr(s, f) for s in specs]
        dup = sorted({str(v) for v in values if values.count(v) > 1})
        if dup:
            raise ValueError(f"modalities share the {f} {dup}; every modality needs its own")
    for a in specs:
        for b in specs:
            if a is not b and a.placeholder in b.placeholder:
                raise ValueError(
                    f"placeholder {a.placeholder!r} ({a.name}) is part of {b.placeholder!r} ({b.name})"
                )


def split_placeholders(text: str, specs: Sequence[PlaceholderSpec]) -> list[str | PlaceholderSpec]:
    """``text`` cut at every placeholder of ``specs``: text pieces (non-empty) and the spec of each placeholder, in
    order. ``"<image>\\nWhat is <audio>?"`` -> ``[image_spec, "\\nWhat is ", audio_spec, "?"]``."""
    if not specs:
        return [text] if text else []
    by_placeholder = {s.placeholder: s for s in specs}
    pattern = "(" + "|".join(re.escape(p) for p in sorted(by_placeholder, key=len, reverse=True)) + ")"
    out: list[str | PlaceholderSpec] = []
    for k, piece in enumerate(re.split(pattern, text)):
        if k % 2:
            out.append(by_placeholder[piece])
        elif piece:
            out.append(piece)
    return out


def expand_placeholders(
    text: str, specs: Sequence[PlaceholderSpec], tokenize: Callable[[str], list[int]]
) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` with each placeholder expanded to ``tokens_per_item`` copies of its id, and per id
    whether it is a media position. ``tokenize`` turns a text piece into ids (no special tokens added)."""
    ids: list[int] = []
    is_media: list[bool] = []
    for piece in split_placeholders(text, specs):
        if isinstance(piece, str):
            toks = tokenize(piece)
            ids += toks
            is_media += [False] * len(toks)
        else:
            ids += [piece.token_id] * piece.tokens_per_item
            is_media += [True] * piece.tokens_per_item
    return ids, is_media


def count_placeholders(text: str, specs: Sequence[PlaceholderSpec]) -> dict[str, int]:
    """Placeholders of each modality in ``text`` (every modality of ``specs`` gets a count, 0 included)."""
    counts = {s.name: 0 for s in specs}
    for piece in split_placeholders(text, specs):
        if not isinstance(piece, str):
            counts[piece.name] += 1
    return counts


def media_mask(input_ids: torch.Tensor, specs: Iterable[PlaceholderSpec]) -> torch.Tensor:
    """``[B, T]`` bool: positions holding media features of any of ``specs``."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for s in specs:
        mask |= input_ids == s.token_id
    return mask


def fill_media(
    embed: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    modalities: Sequence[Modality],
    inputs: Mapping[str, torch.Tensor | None],
) -> torch.Tensor:
    """Token embeddings of ``input_ids`` with every modality's positions filled by its encoded items, in order.

    ``embed`` is the LM's embedding lookup; media positions are set to id 0 before it (their ids may be out of
    vocabulary) and then overwritten. ``inputs`` maps each modality's ``input_key`` to its stacked items or None (an
    input no modality takes is an error unless it is None).
    The number of positions of each modality must be ``items x tokens_per_item``; otherwise the error says how many
    of each were found, per sample.
    """
    unknown = sorted(
        k for k, v in inputs.items() if v is not None and k not in {m.input_key for m in modalities}
    )
    if unknown:
        raise TypeError(
            f"unexpected media input(s) {unknown}; this model takes {[m.input_key for m in modalities]}"
        )
    masks = {m.name: input_ids == m.token_id for m in modalities}
    any_media = torch.zeros_like(input_ids, dtype=torch.bool)
    for mask in masks.values():
        any_media |= mask
    embeds = embed(input_ids.masked_fill(any_media, 0))
    for m in modalities:
        values = inputs.get(m.input_key)
        mask = masks[m.name]
        n_pos = int(mask.sum())
        n_items = 0 if values is None else values.shape[0]
        if n_pos != n_items * m.tokens_per_item:
            raise ValueError(
                f"input_ids hold {n_pos} {m.name} tokens (id {m.token_id}; per sample {mask.sum(1).tolist()}) but "
                f"{m.input_key} has {n_items} {m.name}(s) x {m.tokens_per_item} tokens each; expand every "
                f"{m.placeholder} placeholder to {m.tokens_per_item} ids and pass one {m.name} per placeholder"
            )
        if n_items:
            feats = m.encode(values).to(embeds.dtype)
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
    return embeds
