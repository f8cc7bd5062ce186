"""Ecosystem formats for the synthetic world: LLaVA conversation JSON + PNGs, and webdataset tar shards.

Both formats hold the same records, and both readers yield the same samples::

    {"id": str, "image": PIL.Image.Image | None, "conversations": [{"from": "human"|"gpt", "value": str}, ...],
     "meta": dict}

Writing::

    from data.formats import export_llava, export_webdataset
    json_path = export_llava(world, "train", 1000, "out/", kind="vqa")     # out/train_vqa.json + out/images/*.png
    shards = export_webdataset(world, "train", 1000, "out/wds", kind="caption", shard_size=500)

A LLaVA record is ``{"id", "image": "images/<id>.png", "conversations", "meta"}``. ``kind="vqa"`` makes one
multi-turn conversation of every question of the scene (``<image>\\n`` before the first question only);
``kind="caption"`` one "describe briefly" turn answered by the caption. ``answer_prompt`` (e.g.
``SHORT_ANSWER_PROMPT``, LLaVA-1.5's VQA instruction) is appended to every VQA question on its own line when given.
``meta`` is ``Scene.to_record()``: label, caption, objects (with COCO-style uncompressed RLE masks, decoded by
``decode_masks``), the VQA pairs, POPE probes and referring expressions. A webdataset sample is ``<id>.png`` +
``<id>.json``, the JSON being exactly the LLaVA record.

Reading::

    reader = LlavaJsonReader("out/train_vqa.json", image_root=None, skip_bad=False)   # decoded samples
    records = data.llava.read_llava_json("out/train_vqa.json")   # records (image paths) for training
    for sample in reader: ...
    reader = read_webdataset("out/wds/train-caption-{000000..000001}.tar")  # or a list of paths, or a directory

A malformed record raises ``RecordError`` naming the file, the record (index and id) and the field. With
``skip_bad=True`` such records are skipped, counted in ``reader.report`` (a ``ReadReport``) and summarised in a
warning at the end of each pass; nothing is dropped silently. Records without ``"image"`` are text-only
(``image`` is None). An ``<image>`` placeholder without an image, or an image without the placeholder, is malformed.
JSON files, images and shards go through ``data.validation``, the checks ``data.llava``'s training readers use too:
a non-UTF-8 or invalid JSON file raises ``DataFileError`` naming it; an image that does not decode completely (a
truncated file, a decompression bomb, random bytes) makes its record malformed; a truncated or corrupt shard yields
the samples before the damage and then a ``RecordError`` with field ``<shard>`` naming the shard and the byte where
it breaks (raised, or skipped and counted). Shards are read from local files only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.shapes import Scene, ShapesWorld, rle_decode
from data.validation import DataFileError, ImageError, ShardError, decode_image, iter_shard, read_json_file

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
# A few phrasings of the brief-description request (LLaVA's stage-1 data varies it too); which one a scene gets
# is fixed by its index, so exports stay deterministic.
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "What is in the image? Answer briefly.",
    "Write a brief caption for the image.",
)
EXPORT_KINDS: tuple[str, ...] = ("vqa", "caption")
_ROLES = ("human", "gpt")


# ----------------------------------------------------------------------------------------------------------------
# Records.
# ----------------------------------------------------------------------------------------------------------------


def scene_conversations(scene: Scene, kind: str, answer_prompt: str | None = None) -> list[dict[str, str]]:
    """The human/gpt turns for one scene, ``<image>`` leading the first human turn."""
    if kind == "vqa":
        turns = []
        for k, qa in enumerate(scene.vqa):
            question = f"{qa.question}\n{answer_prompt}" if answer_prompt else qa.question
            if k == 0:
                question = f"{IMAGE_TOKEN}\n{question}"
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": qa.answer}]
        return turns
    if kind == "caption":
        prompt = CAPTION_PROMPTS[scene.index % len(CAPTION_PROMPTS)]
        return [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
            {"from": "gpt", "value": scene.caption},
        ]
    raise ValueError(f"export kind must be one of {EXPORT_KINDS}, got {kind!r}")


def llava_record(scene: Scene, kind: str, answer_prompt: str | None = None) -> dict[str, Any]:
    return {
        "id": scene.id,
        "image": f"images/{scene.id}.png",
        "conversations": scene_conversations(scene, kind, answer_prompt),
        "meta": scene.to_record(),
    }


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_masks(meta: dict[str, Any]) -> list[np.ndarray]:
    """Per-object boolean masks from a record's ``meta`` (same order as ``meta["objects"]``)."""
    return [rle_decode(o["mask_rle"]) for o in meta["objects"]]


# ----------------------------------------------------------------------------------------------------------------
# Writers.
# ----------------------------------------------------------------------------------------------------------------


def _atomic_bytes(path: Path, payload: bytes) -> None:
    from zoo.registry import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def export_llava(
    world: ShapesWorld,
    split: str,
    n: int,
    out_dir: str | os.PathLike,
    kind: str = "vqa",
    *,
    start: int = 0,
    answer_prompt: str | None = None,
) -> Path:
    """Write ``out_dir/images/<id>.png`` and ``out_dir/<split>_<kind>.json``; return the JSON path."""
    if kind not in EXPORT_KINDS:
        raise ValueError(f"export kind must be one of {EXPORT_KINDS}, got {kind!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for scene in world.iter_scenes(split, n, start):
        record = llava_record(scene, kind, answer_prompt)
        image_path = out / record["image"]
        payload = png_bytes(scene.image)
        # Scenes are deterministic, so an identical file from an earlier export (say the caption one) is kept.
        if not (image_path.exists() and image_path.read_bytes() == payload):
            _atomic_bytes(image_path, payload)
        records.append(record)
    json_path = out / f"{split}_{kind}.json"
    # One record per line inside the array: still one JSON document, but diffable and greppable.
    text = "[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in records) + "\n]\n"
    _atomic_bytes(json_path, text.encode())
    return json_path


def export_webdataset(
    world: ShapesWorld,
    split: str,
    n: int,
    out_dir: str | os.PathLike,
    kind: str = "vqa",
    *,
    shard_size: int = 1000,
    start: int = 0,
    answer_prompt: str | None = None,
) -> list[Path]:
    """Write ``out_dir/<split>-<kind>-NNNNNN.tar`` shards of ``<id>.png`` + ``<id>.json``; return their paths.

    Tar members carry fixed metadata (mtime 0, uid 0, mode 0644), so the same world writes the same bytes.
    """
    if kind not in EXPORT_KINDS:
        raise ValueError(f"export kind must be one of {EXPORT_KINDS}, got {kind!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, first in enumerate(range(start, start + n, shard_size)):
        count = min(shard_size, start + n - first)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for scene in world.iter_scenes(split, count, first):
                record = llava_record(scene, kind, answer_prompt)
                members = (("png", png_bytes(scene.image)), ("json", json.dumps(record).encode()))
                for ext, payload in members:
                    # webdataset groups members by the name before the first dot; ids never contain one.
                    info = tarfile.TarInfo(f"{scene.id}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        path = out / f"{split}-{kind}-{shard:06d}.tar"
        _atomic_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Readers.
# ----------------------------------------------------------------------------------------------------------------


class RecordError(ValueError):
    """A malformed record: says which file, which record and which field, and how to fix it."""

    def __init__(self, file: str | os.PathLike, record: str, field: str, problem: str) -> None:
        self.file, self.record, self.field, self.problem = str(file), record, field, problem
        super().__init__(f"{file}: record {record}: field '{field}': {problem}")


@dataclass
class ReadReport:
    """What one pass of a reader read and skipped (each skip with its full reason)."""

    source: str
    read: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = f"{self.source}: read {self.read} records, skipped {len(self.skipped)}"
        return head if not self.skipped else head + ":\n  " + "\n  ".join(self.skipped)


def _record_name(index: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{index} (id={rid!r})" if rid is not None else str(index)


def _check_record(record: Any, file: str, name: str) -> None:
    """Validate the LLaVA record structure; raise RecordError on the first problem."""
    if not isinstance(record, dict):
        raise RecordError(file, name, "<record>", f"expected a JSON object, got {type(record).__name__}")
    if "id" not in record:
        raise RecordError(file, name, "id", "missing; every record needs a unique 'id'")
    if "conversations" not in record:
        raise RecordError(file, name, "conversations", "missing; expected a list of {'from', 'value'} turns")
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError(file, name, "conversations", "expected a non-empty list of {'from', 'value'} turns")
    for k, turn in enumerate(turns):
        where = f"conversations[{k}]"
        if not isinstance(turn, dict):
            raise RecordError(file, name, where, f"expected an object, got {type(turn).__name__}")
        for key in ("from", "value"):
            if key not in turn:
                raise RecordError(file, name, f"{where}.{key}", "missing; each turn needs 'from' and 'value'")
        if turn["from"] not in _ROLES:
            raise RecordError(file, name, f"{where}.from", f"got {turn['from']!r}, expected one of {_ROLES}")
        if not isinstance(turn["value"], str):
            raise RecordError(
                file, name, f"{where}.value", f"expected a string, got {type(turn['value']).__name__}"
            )
    has_token = any(IMAGE_TOKEN in t["value"] for t in turns if t["from"] == "human")
    if "image" in record and not isinstance(record["image"], str):
        raise RecordError(file, name, "image", f"expected a relative path string, got {record['image']!r}")
    if ("image" in record) != has_token:
        problem = (
            f"the record has an image but no '{IMAGE_TOKEN}' placeholder in a human turn; add it to the first one"
            if "image" in record
            else f"a human turn has the '{IMAGE_TOKEN}' placeholder but the record has no 'image'; add the image path "
            "or remove the placeholder"
        )
        raise RecordError(file, name, "image", problem)
    if "meta" in record and not isinstance(record["meta"], dict):
        raise RecordError(file, name, "meta", f"expected an object, got {type(record['meta']).__name__}")


def _open_image(data: bytes | Path, file: str, name: str, field_name: str) -> Image.Image:
    try:
        return decode_image(data)
    except (ImageError, FileNotFoundError) as err:
        raise RecordError(file, name, field_name, f"cannot decode the image: it {err}") from None


def _sample(record: dict[str, Any], image: Image.Image | None) -> dict[str, Any]:
    return {
        "id": record["id"],
        "image": image,
        "conversations": record["conversations"],
        "meta": record.get("meta", {}),
    }


class _Reader(ABC):
    """Shared skip-and-count logic; subclasses yield samples, or the RecordError of a bad record, from ``_items``."""

    def __init__(self, source: str, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.report = ReadReport(source)

    @abstractmethod
    def _items(self) -> Iterator[dict[str, Any] | RecordError]:
        """Samples in file order; a malformed record comes as its RecordError so ``__iter__`` can skip it."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.report = ReadReport(self.report.source)
        for item in self._items():
            if isinstance(item, RecordError):
                if not self.skip_bad:
                    raise item
                self.report.skipped.append(str(item))
                continue
            self.report.read += 1
            yield item
        if self.report.skipped:
            log.warning("%s", self.report.summary())


class LlavaJsonReader(_Reader):
    """Samples (images decoded) from a LLaVA JSON file; images resolve against ``image_root`` (default: its folder).

    Training reads the same files as records (image paths, images loaded lazily) with ``data.llava.read_llava_json``.
    """

    def __init__(
        self, json_path: str | os.PathLike, image_root: str | os.PathLike | None = None, skip_bad: bool = False
    ) -> None:
        self.path = Path(json_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such LLaVA JSON file")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        super().__init__(str(self.path), skip_bad)

    def _load(self) -> list[Any]:
        records = read_json_file(self.path)
        if not isinstance(records, list):
            raise DataFileError(f"{self.path}: expected a JSON list of records, got {type(records).__name__}")
        return records

    def __len__(self) -> int:
        return len(self._load())

    def _items(self) -> Iterator[dict[str, Any] | RecordError]:
        file = str(self.path)
        for index, record in enumerate(self._load()):
            name = _record_name(index, record)
            try:
                _check_record(record, file, name)
                image = None
                if "image" in record:
                    image_path = self.image_root / record["image"]
                    if not image_path.is_file():
                        raise RecordError(
                            file,
                            name,
                            "image",
                            f"file {image_path} not found (check image_root={self.image_root})",
                        )
                    image = _open_image(image_path, file, name, "image")
                yield _sample(record, image)
            except RecordError as err:
                yield err


class WebDatasetReader(_Reader):
    def __init__(self, urls: str | os.PathLike | Sequence[str | os.PathLike], skip_bad: bool) -> None:
        self.urls = _expand_urls(urls)
        super().__init__(
            ", ".join(self.urls) if len(self.urls) <= 3 else f"{self.urls[0]} (+{len(self.urls) - 1})",
            skip_bad,
        )

    def _items(self) -> Iterator[dict[str, Any] | RecordError]:
        # Every shard, in order: splitting shards across ranks or workers is the consumer's business.
        for url in self.urls:
            index = -1
            samples = iter_shard(url)
            while True:
                try:
                    key, raw = next(samples)
                except StopIteration:
                    break
                except ShardError as err:
                    # The shard as a whole is the record: what was read before the damage was yielded already.
                    where = f"{index + 1} (at byte {err.offset})"
                    yield RecordError(url, where, "<shard>", f"{err.problem}; the samples after it are lost")
                    break
                index += 1
                yield self._sample(url, index, key, raw)

    def _sample(self, url: str, index: int, key: str, raw: dict[str, bytes]) -> dict[str, Any] | RecordError:
        name = f"{index} (key={key!r})"
        try:
            if "json" not in raw:
                raise RecordError(url, name, "json", "missing <key>.json member; each sample needs its record")
            try:
                record = json.loads(raw["json"].decode("utf-8"))
            except UnicodeDecodeError as err:
                raise RecordError(url, name, "json", f"not UTF-8 (byte {err.start}: {err.reason})") from None
            except (json.JSONDecodeError, RecursionError) as err:
                raise RecordError(url, name, "json", f"not valid JSON ({err})") from None
            if isinstance(record, dict):
                name = f"{index} (key={key!r}, id={record.get('id')!r})"
            _check_record(record, url, name)
            image = None
            if "image" in record:
                if "png" not in raw:
                    raise RecordError(url, name, "png", "the record names an image but the sample has no .png")
                image = _open_image(raw["png"], url, name, "png")
            return _sample(record, image)
        except RecordError as err:
            return err


def _expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    import braceexpand

    if isinstance(urls, (str, os.PathLike)):
        path = Path(urls)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"{path}: no .tar shards in this directory")
            return found
        expanded = list(braceexpand.braceexpand(str(urls)))
    else:
        expanded = [str(u) for u in urls]
    if not expanded:
        raise ValueError("read_webdataset: no shard URLs given")
    remote = [u for u in expanded if "://" in u or u.startswith("pipe:")]
    if remote:
        raise ValueError(
            f"read_webdataset reads local shard files only (finding a truncated shard needs the whole file); copy "
            f"{remote[0]} to a local folder first"
        )
    missing = [u for u in expanded if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset shard(s) not found: {', '.join(missing)}")
    return expanded


def read_webdataset(
    urls: str | os.PathLike | Sequence[str | os.PathLike], skip_bad: bool = False
) -> WebDatasetReader:
    """Iterable of samples from webdataset shards (a brace pattern, a list of paths, or a directory of .tar)."""
    return WebDatasetReader(urls, skip_bad)
