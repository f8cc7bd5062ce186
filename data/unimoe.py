"""Uni-MoE's data format (JSON and webdataset shards) and batching of samples with any subset of modalities.

Uni-MoE JSON is a list of records (facts: ``shared/reference/moe_llava_unimoe.md`` B3)::

    {"id": "...", "image": "images/x.png", "video": ["videos/x/000.png", ...], "voice": ["audio/x_0.wav", ...],
     "conversations": [{"from": "human", "value": "<image>\\n<audio>\\n..."}, {"from": "gpt", "value": "..."}]}

``image`` / ``video`` / ``voice`` are optional; ``video`` is a list of frame images and ``voice`` a list of audio
files (speech and non-speech alike). Human turns hold one ``<image>`` per image (0 or 1), one ``<video>`` per video
(0 or 1) and one ``<audio>`` per ``voice`` file, in textual order. Paths are relative to the media root (default:
the JSON's folder). Audio must be 16 kHz 16-bit PCM WAV.

Webdataset shards carry the same samples: ``<key>.json`` (the record as in the JSON file) plus ``<key>.image.png``,
``<key>.frame000.png`` ..., ``<key>.voice000.wav`` ... members (webdataset groups members by the name before the
first dot). Reading a JSON export and the shards written from the same samples gives identical samples.

Bad input (missing or undecodable media, unreadable audio, a wrong sample rate, a placeholder count that does not
match the media) raises :class:`data.formats.RecordError` naming the file, the record and the field; with
``skip_bad=True`` the record is skipped and counted in ``reader.report``.

Batching (:func:`collate_media`): no dummy tensors. Each modality's items in the batch are stacked along a new first
dimension with an ``owner`` vector giving each item's row in the batch; a modality no sample has is ``None``. This
is the ``zoo.components.modality`` contract (items stacked per modality, absent = None); Uni-MoE's own code instead
feeds a zero image, a zero 8-frame video and a ones Mel per sample and masks them, which we do not reproduce.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data.audio import SAMPLE_RATE, AudioClip, whisper_features
from data.formats import RecordError, _expand_urls, _Reader, png_bytes
from data.shapes import Scene
from data.speech import SPOKEN_INSTRUCTIONS, read_wav, speak, write_wav
from data.video import VideoClip

__all__ = [
    "UniMoESample",
    "MediaBatch",
    "PLACEHOLDERS",
    "export_unimoe_json",
    "export_unimoe_webdataset",
    "UniMoEJsonReader",
    "UniMoEWebDatasetReader",
    "collate_media",
    "video_qa_sample",
    "audio_qa_sample",
    "audio_caption_sample",
    "speech_vqa_sample",
    "spoken_video_qa_sample",
    "spoken_instruction_sample",
]

PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass(eq=False)
class UniMoESample:
    """One sample with its media decoded: an RGB image, a list of RGB frames, a list of 16 kHz waveforms."""

    id: str
    conversations: list[dict[str, str]]
    image: Image.Image | None = None
    video: list[Image.Image] | None = None
    voice: list[np.ndarray] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Samples from the synthetic world.
# ----------------------------------------------------------------------------------------------------------------


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def video_qa_sample(clip: VideoClip, k: int) -> UniMoESample:
    qa = clip.qa[k]
    return UniMoESample(
        id=f"{clip.id}_q{k}", conversations=_turns(f"<video>\n{qa.question}\n{SHORT_ANSWER}", qa.answer),
        video=list(clip.frames), meta={"kind": qa.kind, "task": "video_qa"},
    )  # fmt: skip


def audio_qa_sample(clip: AudioClip, k: int) -> UniMoESample:
    qa = clip.qa[k]
    return UniMoESample(
        id=f"{clip.id}_q{k}", conversations=_turns(f"<audio>\n{qa.question}\n{SHORT_ANSWER}", qa.answer),
        voice=[clip.waveform], meta={"kind": qa.kind, "task": "audio_qa"},
    )  # fmt: skip


def audio_caption_sample(clip: AudioClip) -> UniMoESample:
    return UniMoESample(
        id=f"{clip.id}_cap", conversations=_turns("<audio>\nGenerate audio caption.", clip.caption),
        voice=[clip.waveform], meta={"task": "audio_caption"},
    )  # fmt: skip


def speech_vqa_sample(scene: Scene, k: int) -> UniMoESample:
    """The image question asked by voice: Uni-MoE's inference order, ``<image>`` then ``<audio>``."""
    qa = scene.vqa[k]
    return UniMoESample(
        id=f"{scene.id}_sq{k}", conversations=_turns(f"<image>\n<audio>\n{SHORT_ANSWER}", qa.answer),
        image=scene.image, voice=[speak(qa.question)],
        meta={"kind": qa.kind, "task": "speech_vqa", "transcript": qa.question},
    )  # fmt: skip


def spoken_video_qa_sample(clip: VideoClip, k: int) -> UniMoESample:
    """The video question asked by voice: ``<audio>`` then ``<video>``, the order of Uni-MoE's data samples."""
    qa = clip.qa[k]
    return UniMoESample(
        id=f"{clip.id}_sq{k}", conversations=_turns(f"<audio>\n<video>\n{SHORT_ANSWER}", qa.answer),
        video=list(clip.frames), voice=[speak(qa.question)],
        meta={"kind": qa.kind, "task": "spoken_video_qa", "transcript": qa.question},
    )  # fmt: skip


def spoken_instruction_sample(scene: Scene, instruction: str) -> UniMoESample:
    """A spoken instruction about an image (``SPOKEN_INSTRUCTIONS`` of ``data.speech``), answered by the caption."""
    if SPOKEN_INSTRUCTIONS.get(instruction) != "caption":
        raise ValueError(f"{instruction!r} is not an image instruction; choose from "
                         f"{[k for k, v in SPOKEN_INSTRUCTIONS.items() if v == 'caption']}")  # fmt: skip
    return UniMoESample(
        id=f"{scene.id}_si", conversations=_turns("<image>\n<audio>", scene.caption), image=scene.image,
        voice=[speak(instruction)], meta={"task": "spoken_instruction", "transcript": instruction},
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Writers.
# ----------------------------------------------------------------------------------------------------------------


def _check_id(sample_id: str) -> None:
    # Ids become file names and webdataset keys (grouped at the first dot).
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", sample_id):
        raise ValueError(f"sample id {sample_id!r} must be letters, digits, '_' or '-' (it names files)")


def _record(sample: UniMoESample, image: str | None, frames: list[str] | None, voice: list[str] | None) -> dict:
    record: dict[str, Any] = {"id": sample.id}
    if image is not None:
        record["image"] = image
    if frames is not None:
        record["video"] = frames
    if voice is not None:
        record["voice"] = voice
    record["conversations"] = sample.conversations
    if sample.meta:
        record["meta"] = sample.meta
    return record


def _media_payloads(sample: UniMoESample) -> tuple[bytes | None, list[bytes] | None, list[bytes] | None]:
    image = None if sample.image is None else png_bytes(sample.image)
    frames = None if sample.video is None else [png_bytes(f) for f in sample.video]
    voice = None if sample.voice is None else [write_wav(None, w) for w in sample.voice]
    return image, frames, voice


def _atomic_bytes(path: Path, payload: bytes) -> None:
    from zoo.registry import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def export_unimoe_json(samples: Sequence[UniMoESample], out_dir: str | os.PathLike, name: str) -> Path:
    """Write ``out_dir/<name>.json`` with media under ``images/``, ``videos/<id>/``, ``audio/``; return the JSON."""
    out = Path(out_dir)
    records = []
    for sample in samples:
        _check_id(sample.id)
        image, frames, voice = _media_payloads(sample)
        image_rel = frame_rels = voice_rels = None
        if image is not None:
            image_rel = f"images/{sample.id}.png"
            _atomic_bytes(out / image_rel, image)
        if frames is not None:
            frame_rels = [f"videos/{sample.id}/{t:03d}.png" for t in range(len(frames))]
            for rel, payload in zip(frame_rels, frames):
                _atomic_bytes(out / rel, payload)
        if voice is not None:
            voice_rels = [f"audio/{sample.id}_{k}.wav" for k in range(len(voice))]
            for rel, payload in zip(voice_rels, voice):
                _atomic_bytes(out / rel, payload)
        records.append(_record(sample, image_rel, frame_rels, voice_rels))
    path = out / f"{name}.json"
    _atomic_bytes(path, ("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n").encode())
    return path


def export_unimoe_webdataset(samples: Sequence[UniMoESample], out_dir: str | os.PathLike, name: str,
                             shard_size: int = 1000) -> list[Path]:  # fmt: skip
    """Write ``out_dir/<name>-NNNNNN.tar`` shards of the same samples (fixed tar metadata: same samples, same bytes)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    paths = []
    for shard, first in enumerate(range(0, len(samples), shard_size)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples[first: first + shard_size]:
                _check_id(sample.id)
                image, frames, voice = _media_payloads(sample)
                members = [] if image is None else [("image.png", image)]
                members += [(f"frame{t:03d}.png", p) for t, p in enumerate(frames or [])]
                members += [(f"voice{k:03d}.wav", p) for k, p in enumerate(voice or [])]
                record = _record(
                    sample, None if image is None else f"{sample.id}.image.png",
                    None if frames is None else [f"{sample.id}.{m}" for m, _ in members if m.startswith("frame")],
                    None if voice is None else [f"{sample.id}.{m}" for m, _ in members if m.startswith("voice")],
                )  # fmt: skip
                for ext, payload in [("json", json.dumps(record).encode()), *members]:
                    info = tarfile.TarInfo(f"{sample.id}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        path = out / f"{name}-{shard:06d}.tar"
        _atomic_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Readers.
# ----------------------------------------------------------------------------------------------------------------


def _check_unimoe_record(record: Any, file: str, name: str) -> None:
    if not isinstance(record, dict):
        raise RecordError(file, name, "<record>", f"expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError(file, name, "conversations", "missing or empty; expected a list of {'from', 'value'}")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in (
            "human", "gpt"
        ):  # fmt: skip
            raise RecordError(file, name, f"conversations[{k}]", "expected {'from': 'human'|'gpt', 'value': str}")
    human = "".join(t["value"] for t in turns if t["from"] == "human")
    for key, kind in (("image", str), ("video", list), ("voice", list)):
        if key in record and not isinstance(record[key], kind):
            raise RecordError(file, name, key, f"expected a {kind.__name__}, got {type(record[key]).__name__}")
    expected = {
        "image": 1 if "image" in record else 0,
        "video": 1 if "video" in record else 0,
        "audio": len(record.get("voice", [])),
    }
    for modality, want in expected.items():
        got = human.count(PLACEHOLDERS[modality])
        if got != want:
            where = {"image": "image", "video": "video", "audio": "voice"}[modality]
            raise RecordError(file, name, where, f"{want} item(s) but {got} '{PLACEHOLDERS[modality]}' "
                              "placeholder(s) in the human turns; they must match")  # fmt: skip


def _decode_image(data: bytes | Path, file: str, name: str, where: str) -> Image.Image:
    if isinstance(data, Path) and not data.is_file():
        raise RecordError(file, name, where, f"file {data} not found (check the media root)")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise RecordError(file, name, where, f"cannot decode the image ({err})") from err


def _decode_audio(data: bytes | Path, file: str, name: str, where: str) -> np.ndarray:
    if isinstance(data, Path) and not data.is_file():
        raise RecordError(file, name, where, f"file {data} not found (check the media root)")
    try:
        return read_wav(io.BytesIO(data) if isinstance(data, bytes) else data, expect_rate=SAMPLE_RATE)
    except ValueError as err:
        raise RecordError(file, name, where, str(err)) from err


def _name(index: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{index} (id={rid!r})" if rid is not None else str(index)


class UniMoEJsonReader(_Reader):
    """Samples (media decoded) from a Uni-MoE JSON file; media paths resolve against ``media_root``."""

    def __init__(self, json_path: str | os.PathLike, media_root: str | os.PathLike | None = None,
                 skip_bad: bool = False) -> None:  # fmt: skip
        self.path = Path(json_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such Uni-MoE JSON file")
        self.media_root = Path(media_root) if media_root is not None else self.path.parent
        super().__init__(str(self.path), skip_bad)

    def _items(self) -> Iterator[UniMoESample | RecordError]:
        file = str(self.path)
        try:
            records = json.loads(self.path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path}: not valid JSON ({err}); expected a list of Uni-MoE records") from err
        if not isinstance(records, list):
            raise ValueError(f"{self.path}: expected a JSON list of records, got {type(records).__name__}")
        root = self.media_root
        for index, record in enumerate(records):
            name = _name(index, record)
            try:
                _check_unimoe_record(record, file, name)
                yield _sample(
                    record,
                    None if "image" not in record else _decode_image(root / record["image"], file, name, "image"),
                    None if "video" not in record else [
                        _decode_image(root / p, file, name, f"video[{t}]") for t, p in enumerate(record["video"])
                    ],
                    None if "voice" not in record else [
                        _decode_audio(root / p, file, name, f"voice[{k}]") for k, p in enumerate(record["voice"])
                    ],
                    index,
                )  # fmt: skip
            except RecordError as err:
                yield err


class UniMoEWebDatasetReader(_Reader):
    """The same samples from shards written by :func:`export_unimoe_webdataset` (a dir, a brace pattern or a list)."""

    def __init__(self, urls: str | os.PathLike | Sequence[str | os.PathLike], skip_bad: bool = False) -> None:
        self.urls = _expand_urls(urls)
        super().__init__(", ".join(self.urls), skip_bad)

    def _items(self) -> Iterator[UniMoESample | RecordError]:
        for url in self.urls:
            # Tar members in order, grouped by key; read with tarfile so a bad member is reported, not swallowed.
            groups: dict[str, dict[str, bytes]] = {}
            with tarfile.open(url) as tar:
                for member in tar:
                    if member.isfile():
                        key, _, ext = member.name.partition(".")
                        groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
            for index, (key, raw) in enumerate(groups.items()):
                name = f"{index} (key={key!r})"
                try:
                    if "json" not in raw:
                        raise RecordError(url, name, "json", "missing <key>.json member; each sample needs its record")
                    try:
                        record = json.loads(raw["json"])
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        raise RecordError(url, name, "json", f"not valid JSON ({err})") from err
                    _check_unimoe_record(record, url, name)

                    member = partial(_member, raw, url, name)
                    yield _sample(
                        record,
                        None if "image" not in record else _decode_image(
                            member(record["image"], "image"), url, name, "image"),
                        None if "video" not in record else [
                            _decode_image(member(p, f"video[{t}]"), url, name, f"video[{t}]")
                            for t, p in enumerate(record["video"])
                        ],
                        None if "voice" not in record else [
                            _decode_audio(member(p, f"voice[{k}]"), url, name, f"voice[{k}]")
                            for k, p in enumerate(record["voice"])
                        ],
                        index,
                    )  # fmt: skip
                except RecordError as err:
                    yield err


def _member(raw: dict[str, bytes], url: str, name: str, ref: str, where: str) -> bytes:
    """The bytes of the shard member a record field names (``<key>.<ext>``)."""
    ext = ref.partition(".")[2]
    if ext not in raw:
        raise RecordError(url, name, where, f"the record names {ref!r} but the shard has no such member")
    return raw[ext]


def _sample(record: dict, image, video, voice, index: int) -> UniMoESample:
    return UniMoESample(
        id=str(record.get("id", index)), conversations=record["conversations"], image=image, video=video,
        voice=voice, meta=record.get("meta", {}),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Batching.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MediaBatch:
    """The media of a batch, per modality: stacked items and the batch row each item belongs to.

    ``images [n_img, 3, H, W]`` and ``videos [n_vid, T, 3, H, W]`` are float in [0, 1] (the model's modality applies
    its own normalisation); ``audio [n_audio, 80, 3000]`` are Whisper log-Mel features of each ``voice`` file
    (30-s chunks, as Whisper encoders take them; clips here are shorter than one chunk). A modality no sample has is
    ``None`` with an empty owner vector.
    """

    images: torch.Tensor | None
    image_owner: torch.Tensor
    videos: torch.Tensor | None
    video_owner: torch.Tensor
    audio: torch.Tensor | None
    audio_owner: torch.Tensor


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def collate_media(samples: Sequence[UniMoESample]) -> MediaBatch:
    images = [(i, _pixels(s.image)) for i, s in enumerate(samples) if s.image is not None]
    videos = [(i, torch.stack([_pixels(f) for f in s.video])) for i, s in enumerate(samples) if s.video]
    voices = [(i, w) for i, s in enumerate(samples) for w in (s.voice or [])]
    for what, items in (("image", images), ("video", videos)):
        shapes = {tuple(x.shape) for _, x in items}
        if len(shapes) > 1:
            raise ValueError(f"collate_media: every {what} of a batch must have the same shape, got {sorted(shapes)}")
    audio = None
    if voices:
        audio = torch.from_numpy(whisper_features([w for _, w in voices], pad_to_30s=True))

    def owner(items: list) -> torch.Tensor:
        return torch.tensor([i for i, _ in items], dtype=torch.long)

    return MediaBatch(
        images=torch.stack([x for _, x in images]) if images else None, image_owner=owner(images),
        videos=torch.stack([x for _, x in videos]) if videos else None, video_owner=owner(videos),
        audio=audio, audio_owner=owner(voices),
    )  # fmt: skip
