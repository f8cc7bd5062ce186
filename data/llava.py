"""LLaVA conversation data: records, readers, template application, masking, image-token expansion, batching.

Records follow LLaVA's JSON: ``{"id", "image": "rel/path.png" | [paths] (absent for text-only records),
"conversations": [{"from": "human" | "gpt", "value": "..."}, ...]}``; a human turn holds one ``<image>`` placeholder
per image. They come from a JSON file + an image folder, or from webdataset shards (``<key>.json`` holding the record,
``<key>.png``/``.jpg`` the image).

Encoding (per record): the conversation template renders ``(text, supervised)`` pieces; each piece is tokenized on its
own and labels are the token ids on supervised pieces (the answers and their end-of-turn token) and ``-100``
elsewhere, so masking never depends on re-counting a rendered string. Every ``<image>`` token is expanded to
``num_image_tokens`` copies, which the model replaces with the projected patch features. Sequences longer than
``max_length`` are truncated from the right (counted), unless truncation would cut an image or leave no supervised
token: then the record is over-long.

Bad input (missing, truncated or corrupt image, decompression bombs, ``<image>`` without an image or an image
without ``<image>``, malformed fields, over-long records, a truncated shard) raises ``LlavaDataError`` naming the
file, the record and the field, or, with ``on_error="skip"``, is skipped and counted. JSON files, images and shards
are checked by ``data.validation`` (the same checks ``data.formats`` uses), and every image is decoded while the
dataset is built, so with ``on_error="raise"`` bad input fails before step 1. A record whose image breaks after
that (the file changed on disk) is dropped by the collator: ``LlavaDataset.__getitem__`` returns a
:class:`SkippedSample`, the collator lists it under ``batch["skipped"]``, and whoever consumes the batches (the
training stage, in the main process, so DataLoader worker processes lose nothing) hands them to
``LlavaDataset.note_dropped``. ``LlavaDataset.summary()`` and ``LlavaDataset.skipped_total()`` report the counts.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from data.validation import (
    DataFileError,
    ImageError,
    ShardError,
    decode_image,
    iter_shard,
    read_json_file,
    to_rgb8,
)
from zoo.components.modality import PlaceholderSpec, expand_placeholders
from zoo.conversation import IMAGE_PLACEHOLDER, Template, Turn

__all__ = [
    "IGNORE_INDEX",
    "LlavaDataError",
    "SkippedSample",
    "Record",
    "Encoded",
    "parse_record",
    "read_llava_json",
    "read_llava_webdataset",
    "encode_conversation",
    "build_image_transform",
    "LlavaDataset",
    "LlavaCollator",
]

IGNORE_INDEX = -100
_ROLES = ("human", "gpt")
_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class LlavaDataError(ValueError):
    """A record that cannot be used; the message names the file, the record and the field.

    ``reason`` is a short category (``image``, ``placeholder``, ``overlong``, ``format``, ``shard``) used for skip
    counts.
    """

    def __init__(self, message: str, reason: str = "format") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    conversations: tuple[Turn, ...]
    images: tuple[str, ...] = ()  # paths relative to the image folder, or shard member names
    source: str = "<memory>"  # the file the record came from, for error messages
    image_bytes: tuple[bytes, ...] | None = None  # webdataset records carry their images in memory

    @property
    def where(self) -> str:
        return f"{self.source}: record {self.id!r}"


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def parse_record(obj: Any, source: str, index: int) -> Record:
    """Validate one LLaVA JSON record; errors name ``source``, the record (id or index) and the field."""
    rid = obj.get("id", f"#{index}") if isinstance(obj, dict) else f"#{index}"
    where = f"{source}: record {rid!r} (index {index})"
    if not isinstance(obj, dict):
        raise LlavaDataError(f"{where}: expected an object with 'id' and 'conversations', got {type(obj).__name__}")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise LlavaDataError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} turns")
    turns = []
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise LlavaDataError(
                f"{where}: field 'conversations[{j}]' must be {{\"from\": \"human\"|\"gpt\", \"value\": str}}, "
                f"got {turn!r}"
            )
        turns.append(Turn(turn["from"], turn["value"]))
    for j, t in enumerate(turns):
        if t.role != _ROLES[j % 2]:
            raise LlavaDataError(
                f"{where}: field 'conversations[{j}].from' is {t.role!r}; turns must alternate human, gpt, ..."
            )
    image = obj.get("image")
    if image is None:
        images: tuple[str, ...] = ()
    elif isinstance(image, str):
        images = (image,)
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = tuple(image)
    else:
        raise LlavaDataError(f"{where}: field 'image' must be a path or a list of paths, got {image!r}")
    return Record(id=str(rid), conversations=tuple(turns), images=images, source=source)


OnError = Literal["raise", "skip"]


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def read_llava_json(path: str | os.PathLike, on_error: OnError = "raise") -> list[Record | LlavaDataError]:
    """Read a LLaVA conversation JSON file (a list of records).

    A malformed record raises ``LlavaDataError``; with ``on_error="skip"`` it stays in the list as its
    ``LlavaDataError`` (in file order), which ``LlavaDataset`` counts as skipped. A file that is missing, not UTF-8,
    not JSON or not a list always raises: there is no record to skip.
    """
    _check_on_error(on_error)
    path = Path(path)
    try:
        items = read_json_file(path)
    except FileNotFoundError:
        raise LlavaDataError(f"{path}: no such LLaVA JSON file (relative paths start at {Path.cwd()})") from None
    except DataFileError as e:
        raise LlavaDataError(str(e)) from None
    if not isinstance(items, list):
        raise LlavaDataError(f"{path}: expected a JSON list of records, got {type(items).__name__}")
    out: list[Record | LlavaDataError] = []
    for i, obj in enumerate(items):
        try:
            out.append(parse_record(obj, str(path), i))
        except LlavaDataError as e:
            if on_error == "raise":
                raise
            out.append(e)
    return out


def read_llava_webdataset(urls: str | Sequence[str], on_error: OnError = "raise") -> list[Record | LlavaDataError]:
    """Read local webdataset shards whose samples hold ``json`` (the LLaVA record) and optionally an image member.

    Malformed samples behave as in :func:`read_llava_json`. A truncated or corrupt shard raises naming the shard;
    with ``on_error="skip"`` the samples before the damage are kept and the damage counts as one skipped record
    (reason ``shard``; the message names the shard and the byte where it breaks).
    """
    _check_on_error(on_error)
    urls = [urls] if isinstance(urls, str) else list(urls)
    for url in urls:
        if not Path(url).is_file():
            raise LlavaDataError(f"{url}: shard not found (data.shards)")
    out: list[Record | LlavaDataError] = []
    index = 0
    for url in urls:
        samples = iter_shard(url)
        while True:
            try:
                key, sample = next(samples)
            except StopIteration:
                break
            except ShardError as e:
                err = LlavaDataError(f"{e} (data.shards; samples after the damage are lost)", "shard")
                if on_error == "raise":
                    raise err from None
                out.append(err)
                break
            try:
                out.append(_shard_record(url, key, sample, index))
            except LlavaDataError as e:
                if on_error == "raise":
                    raise
                out.append(e)
            index += 1
    return out


def _shard_record(url: str, key: str, sample: dict[str, bytes], index: int) -> Record:
    source = f"{url}[{key}]"
    if "json" not in sample:
        raise LlavaDataError(f"{source}: sample {key!r} has no .json member with the record")
    try:
        obj = json.loads(sample["json"].decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LlavaDataError(f"{source}: field 'json' is not UTF-8 (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise LlavaDataError(f"{source}: field 'json' is not valid JSON ({e})") from None
    except RecursionError:
        raise LlavaDataError(f"{source}: field 'json' is nested too deeply to parse") from None
    rec = parse_record(obj, source, index)
    data = [sample[ext] for ext in _IMAGE_EXTS if ext in sample]
    if rec.images and len(data) != len(rec.images):
        raise LlavaDataError(
            f"{rec.where}: field 'image' names {len(rec.images)} image(s) but the shard sample holds "
            f"{len(data)} image member(s) ({', '.join(_IMAGE_EXTS)})",
            "image",
        )
    if data and not rec.images:
        return Record(rec.id, rec.conversations, (f"{key}.image",), source, tuple(data))
    if data:
        return Record(rec.id, rec.conversations, rec.images, source, tuple(data))
    return rec


def encode_conversation(
    record: Record,
    template: Template,
    tokenizer: Any,
    num_image_tokens: int,
    max_length: int,
    truncate: bool = True,
    image_token_id: int | None = None,
) -> Encoded:
    """Token ids and labels for ``record`` (see the module docstring); raises ``LlavaDataError`` on bad input.

    ``image_token_id``: the id image positions get (default: the tokenizer's ``<image>`` token; official MoE-LLaVA
    checkpoints use -200, which no tokenizer has).
    """
    n_placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in record.conversations)
    if any(IMAGE_PLACEHOLDER in t.text for t in record.conversations if t.role == "gpt"):
        raise LlavaDataError(
            f"{record.where}: field 'conversations': {IMAGE_PLACEHOLDER} in a gpt turn", "placeholder"
        )
    if n_placeholders != len(record.images):
        what = (
            f"has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(record.images)} image(s)"
            if record.images
            else f"has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but no 'image' field"
        )
        raise LlavaDataError(
            f"{record.where}: field 'conversations' {what}; put one {IMAGE_PLACEHOLDER} in a human turn per image",
            "placeholder",
        )
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) if image_token_id is None else image_token_id
    if image_id is None or (image_token_id is None and image_id == tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer has no {IMAGE_PLACEHOLDER} token; pass image_token_id")
    image = PlaceholderSpec(
        name="image", placeholder=IMAGE_PLACEHOLDER, token_id=image_id, tokens_per_item=num_image_tokens
    )
    ids: list[int] = []
    labels: list[int] = []
    for text, supervised in template.segments(record.conversations):
        toks, is_media = expand_placeholders(
            text, [image], lambda piece: tokenizer(piece, add_special_tokens=False).input_ids
        )
        ids += toks
        # Media positions are never supervised; text is on the answer pieces only.
        labels += [t if supervised and not m else IGNORE_INDEX for t, m in zip(toks, is_media)]
    if not any(lab != IGNORE_INDEX for lab in labels):
        raise LlavaDataError(f"{record.where}: field 'conversations' has no gpt answer to supervise")
    if len(ids) <= max_length:
        return Encoded(ids, labels, truncated=False)
    cut_ids, cut_labels = ids[:max_length], labels[:max_length]
    cuts_image = cut_ids.count(image_id) != ids.count(image_id)
    if not truncate or cuts_image or all(lab == IGNORE_INDEX for lab in cut_labels):
        why = "it would cut an image" if cuts_image else "no answer token would remain"
        raise LlavaDataError(
            f"{record.where}: field 'conversations' is {len(ids)} tokens long (with {num_image_tokens} tokens per "
            f"image), over max_length={max_length}; "
            + ("truncation is off" if not truncate else f"truncating is not possible because {why}")
            + "; raise max_length or shorten the record",
            "overlong",
        )
    return Encoded(cut_ids, cut_labels, truncated=True)


def build_image_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    pad_to_square: bool = True,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor [3, S, S]; LLaVA's ``pad`` aspect mode pads to a square with the mean."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    fill = tuple(int(round(m * 255)) for m in mean)

    def transform(img: Image.Image) -> torch.Tensor:
        img = to_rgb8(img)  # not img.convert("RGB"): that clips 16-bit images to white
        w, h = img.size
        if pad_to_square and w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
        return (x.permute(2, 0, 1).float() / 255.0 - mean_t) / std_t

    return transform


@dataclass
class DataStats:
    """What building and training on a ``LlavaDataset`` read, truncated, skipped and dropped."""

    total: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> records skipped while the dataset was built
    skipped_records: set[str] = field(default_factory=set)  # Record.where of the parsed records among them
    dropped: dict[str, str] = field(default_factory=dict)  # Record.where -> reason, dropped later by the collator
    examples: list[str] = field(default_factory=list)  # first few skip messages

    def skip(self, reason: str, message: str, record: str | None = None) -> None:
        self.skipped[reason] += 1
        if record is not None:
            self.skipped_records.add(record)
        self._example(message)

    def drop(self, record: str, reason: str, message: str) -> None:
        # Keyed by record, not by dataset index: the stream cycles through the data, the same drop may be reported
        # by a worker and by the main process, and a resumed run (whose dataset may skip the record up front and so
        # number the rest differently) brings the drops before it; each record counts once.
        if record not in self.dropped:
            self.dropped[record] = reason
            self._example(message)

    def total_skipped(self) -> int:
        """Records skipped while building plus records dropped since that were not also skipped while building."""
        return sum(self.skipped.values()) + len(self.dropped.keys() - self.skipped_records)

    def _example(self, message: str) -> None:
        if message and len(self.examples) < 5:
            self.examples.append(message)


class SkippedSample(NamedTuple):
    """What ``LlavaDataset.__getitem__`` returns, with ``on_error="skip"``, for a record whose image broke after the
    dataset was built; the collator moves it to ``batch["skipped"]`` so the count survives DataLoader workers.

    A NamedTuple, not a frozen dataclass: Lightning rebuilds dataclasses in a batch when moving it to the device,
    which frozen ones refuse."""

    record: str  # Record.where: the file and the record id
    reason: str
    message: str


class LlavaDataset(Dataset):
    """Map-style dataset of encoded LLaVA records.

    Text is validated and encoded up front (cheap, and it gives exact truncation and skip counts before training);
    images are decoded up front too when ``verify_images`` (JPEGs at reduced scale, which still reads every byte),
    so a missing, truncated or corrupt file fails before step 1, and decoded again in ``__getitem__``. ``records``
    may hold the ``LlavaDataError`` items that the readers return for malformed records with ``on_error="skip"``;
    they are counted as skipped.
    """

    def __init__(
        self,
        records: Iterable[Record | LlavaDataError],
        *,
        tokenizer: Any,
        template: Template,
        num_image_tokens: int,
        image_transform: Callable[[Image.Image], torch.Tensor],
        image_folder: str | os.PathLike | None = None,
        max_length: int = 2048,
        truncate: bool = True,
        on_error: OnError = "raise",
        verify_images: bool = True,
        image_token_id: int | None = None,
        progress: bool = False,
    ) -> None:
        from tqdm.auto import tqdm

        _check_on_error(on_error)
        self.template, self.tokenizer = template, tokenizer
        self.image_transform = image_transform
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.on_error = on_error
        self.stats = DataStats()
        self.records: list[Record] = []
        self.encoded: list[Encoded] = []
        # Decoding every image takes a while on real datasets (LLaVA-665K): show it.
        for rec in tqdm(records, desc="checking records and images", unit="rec", disable=not progress, mininterval=1):
            self.stats.total += 1
            try:
                if isinstance(rec, LlavaDataError):
                    raise rec
                enc = encode_conversation(
                    rec, template, tokenizer, num_image_tokens, max_length, truncate, image_token_id
                )
                if verify_images:
                    for k in range(len(rec.images)):
                        self._decode(rec, k, reduced=True)
            except LlavaDataError as e:
                self._fail(e, rec.where if isinstance(rec, Record) else None)
                continue
            self.stats.truncated += enc.truncated
            self.records.append(rec)
            self.encoded.append(enc)
        if not self.records:
            raise LlavaDataError(f"no usable records (of {self.stats.total}); {self.summary()}")

    def _fail(self, err: LlavaDataError, record: str | None) -> None:
        if self.on_error == "raise":
            raise err
        self.stats.skip(err.reason, str(err), record)

    def _decode(self, rec: Record, k: int, reduced: bool = False) -> Image.Image:
        if rec.image_bytes is not None:
            where, source = f"{rec.where}: field 'image' ({rec.images[k]})", rec.image_bytes[k]
        else:
            path = (self.image_folder / rec.images[k]) if self.image_folder is not None else Path(rec.images[k])
            where = f"{rec.where}: field 'image': {path}"
            if not path.is_file():
                raise LlavaDataError(f"{where} not found (check data.image_folder)", "image")
            source = path
        try:
            return decode_image(source, reduced=reduced)
        except (ImageError, FileNotFoundError) as e:
            raise LlavaDataError(f"{where} is not a readable image: {e}", "image") from None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedSample:
        rec, enc = self.records[i], self.encoded[i]
        try:
            images = [self.image_transform(self._decode(rec, k)) for k in range(len(rec.images))]
        except LlavaDataError as e:
            if self.on_error == "raise":
                raise
            self.stats.drop(rec.where, e.reason, str(e))
            return SkippedSample(rec.where, e.reason, str(e))  # the collator drops it and reports it in the batch
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "images": images,
            "id": rec.id,
        }

    def note_dropped(self, skipped: Iterable[SkippedSample]) -> None:
        """Count the drops a batch reports (``batch["skipped"]``); call it in the process that consumes batches."""
        for item in skipped:
            self.stats.drop(item.record, item.reason, item.message)

    def skipped_total(self) -> int:
        """Records skipped while building plus distinct records dropped since (as noted in this process)."""
        return self.stats.total_skipped()

    def summary(self) -> str:
        s = self.stats
        parts = [f"{len(self.records)}/{s.total} records used", f"{s.truncated} truncated"]
        if s.skipped:
            parts.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(s.skipped.items())))
        if s.dropped:
            reasons = Counter(s.dropped.values())
            parts.append("dropped during training: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
        return "; ".join(parts)

    def num_supervised_tokens(self) -> int:
        return sum(sum(lab != IGNORE_INDEX for lab in e.labels) for e in self.encoded)


@dataclass(frozen=True, slots=True)
class LlavaCollator:
    """Pads a list of dataset items into ``input_ids``, ``attention_mask``, ``labels`` and ``pixel_values``.

    ``pixel_values`` stacks the images of the batch in order of appearance ([N_images, 3, H, W]) or is ``None`` for
    a text-only batch; the model fills the image-token positions of the batch with them in the same order.
    ``skipped`` lists the :class:`SkippedSample` items it dropped, for ``LlavaDataset.note_dropped``.
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"

    def __call__(self, items: Sequence[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        skipped = [it for it in items if isinstance(it, SkippedSample)]
        items = [it for it in items if not isinstance(it, SkippedSample)]
        if not items:
            raise LlavaDataError(
                "a whole batch was skipped (every record in it is bad): " + "; ".join(s.message for s in skipped)
            )
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for b, it in enumerate(items):
            k = len(it["input_ids"])
            sl = slice(0, k) if self.padding_side == "right" else slice(n - k, n)
            ids[b, sl], labels[b, sl], mask[b, sl] = it["input_ids"], it["labels"], 1
        images = [img for it in items for img in it["images"]]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": torch.stack(images) if images else None,
            "ids": [it["id"] for it in items],
            "skipped": skipped,
        }
