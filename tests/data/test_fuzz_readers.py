"""Fuzzing the LLaVA readers (``data.formats.LlavaJsonReader``, ``data.llava.read_llava_json`` + ``LlavaDataset``) and
the webdataset readers (``data.formats.read_webdataset``, ``data.llava.read_llava_webdataset``) with random
truncations, wrong types, other encodings and random bytes as images.

Properties: nothing raises but the documented errors (``LlavaDataError``, ``RecordError``, ``DataFileError``), each
naming the file; with skipping on, every record is either read or counted as skipped (a truncated shard counts
once, for the samples lost after the damage). Examples are derandomized, so every run tries the same inputs.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data.formats import LlavaJsonReader, RecordError, read_webdataset
from data.llava import (
    LlavaDataError,
    LlavaDataset,
    build_image_transform,
    read_llava_json,
    read_llava_webdataset,
)
from data.validation import DataFileError
from zoo.conversation import get_template
from zoo.tokenizers import build_tokenizer

TOK = build_tokenizer()
TF = build_image_transform(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GOOD_PNG = _png(0)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["id", "image", "conversations", "meta"]


def _good(i: int) -> dict[str, Any]:
    return {"id": f"r{i}", "image": f"img{i}.png", "meta": {},
            "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}


@st.composite
def records(draw) -> list[Any]:
    """Good records, some with a field replaced by a random JSON value, a field removed, a turn broken, or the whole
    record replaced."""
    out: list[Any] = []
    for i in range(draw(st.integers(1, 4))):
        rec = _good(i)
        kind = draw(st.sampled_from(["keep", "keep", "replace", "drop", "turn", "record"]))
        if kind == "replace":
            rec[draw(st.sampled_from(FIELDS))] = draw(JSON_VALUES)
        elif kind == "drop":
            del rec[draw(st.sampled_from(FIELDS))]
        elif kind == "turn":
            rec["conversations"][draw(st.integers(0, 1))][draw(st.sampled_from(["from", "value"]))] = draw(JSON_VALUES)
        elif kind == "record":
            rec = draw(JSON_VALUES)
        out.append(rec)
    return out


IMAGES = st.one_of(
    st.just(GOOD_PNG),
    st.binary(max_size=64),  # random bytes
    st.integers(0, len(GOOD_PNG) - 1).map(lambda cut: GOOD_PNG[:cut]),  # truncated
)


def _documented(err: Exception, path: Path) -> None:
    assert isinstance(err, (LlavaDataError, RecordError, DataFileError)), repr(err)
    assert str(path) in str(err) or "no usable records" in str(err), str(err)


def _dataset(items: list[Any], folder: Path | None, on_error: str) -> LlavaDataset:
    return LlavaDataset(items, tokenizer=TOK, template=get_template("phi"), num_image_tokens=2, image_transform=TF,
                        image_folder=folder, max_length=64, on_error=on_error)


def _check_dataset(items: list[Any], folder: Path | None) -> None:
    """Skip mode: every item is used or counted; raise mode: only LlavaDataError."""
    try:
        ds = _dataset(items, folder, "skip")
    except LlavaDataError as err:
        assert "no usable records" in str(err)
    else:
        assert len(ds) + sum(ds.stats.skipped.values()) == ds.stats.total == len(items)
        for i in range(len(ds)):
            assert isinstance(ds[i], dict)  # the up-front check decoded every image that is kept
    try:
        _dataset(items, folder, "raise")
    except LlavaDataError:
        pass


@FUZZ
@given(
    recs=records(),
    images=st.lists(IMAGES, min_size=4, max_size=4),
    encoding=st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]),
    cut=st.none() | st.floats(0.0, 1.0),
)
def test_llava_json_readers_only_raise_documented_errors_and_count_every_skip(recs, images, encoding, cut):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i, payload in enumerate(images):
            (folder / f"img{i}.png").write_bytes(payload)
        data = json.dumps(recs, ensure_ascii=False).encode(encoding, errors="replace")
        if cut is not None:
            data = data[: int(len(data) * cut)]
        path = folder / "data.json"
        path.write_bytes(data)

        try:
            items = read_llava_json(path, on_error="skip")
        except LlavaDataError as err:
            _documented(err, path)  # a whole-file problem: truncated, not UTF-8, not a list
        else:
            assert len(items) == len(recs) or cut is not None
            _check_dataset(items, folder)
        try:
            read_llava_json(path)
        except LlavaDataError as err:
            _documented(err, path)

        reader = LlavaJsonReader(path, skip_bad=True)
        try:
            samples = list(reader)
        except DataFileError as err:
            _documented(err, path)
        else:
            assert len(samples) == reader.report.read
            assert reader.report.read + len(reader.report.skipped) == len(json.loads(data.decode("utf-8-sig")))
        try:
            list(LlavaJsonReader(path))
        except (RecordError, DataFileError) as err:
            _documented(err, path)


def _shard_bytes(recs: list[Any], images: list[bytes], json_bytes: list[bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, rec in enumerate(recs):
            payload = json_bytes[i] if json_bytes[i] is not None else json.dumps(rec).encode()
            for name, data in ((f"s{i}.png", images[i]), (f"s{i}.json", payload)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@FUZZ
@given(
    recs=records(),
    images=st.lists(IMAGES, min_size=4, max_size=4),
    json_bytes=st.lists(st.none() | st.none() | st.binary(max_size=24) | st.just("é".encode("latin-1")),
                        min_size=4, max_size=4),
    damage=st.sampled_from(["none", "cut", "flip"]),
    where=st.floats(0.0, 1.0),
    byte=st.integers(0, 255),
)
def test_webdataset_readers_only_raise_documented_errors_and_count_every_skip(recs, images, json_bytes, damage,
                                                                              where, byte):
    data = _shard_bytes(recs, images, json_bytes)
    at = min(int(len(data) * where), len(data) - 1)
    if damage == "cut":
        data = data[:at]
    elif damage == "flip":
        data = data[:at] + bytes([byte]) + data[at + 1 :]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-000000.tar"
        path.write_bytes(data)

        items = read_llava_webdataset(str(path), on_error="skip")  # skip mode never raises: damage is counted
        shard_errors = [x for x in items if isinstance(x, LlavaDataError) and x.reason == "shard"]
        assert len(shard_errors) <= 1 and (not shard_errors or items[-1] is shard_errors[0])
        for err in (x for x in items if isinstance(x, LlavaDataError)):
            _documented(err, path)
        if damage == "none":
            assert len(items) == len(recs) and not shard_errors
        _check_dataset(items, None)
        try:
            read_llava_webdataset(str(path))
        except LlavaDataError as err:
            _documented(err, path)

        reader = read_webdataset(str(path), skip_bad=True)
        samples = list(reader)
        assert len(samples) == reader.report.read
        if damage == "none":
            assert reader.report.read + len(reader.report.skipped) == len(recs)
        try:
            list(read_webdataset(str(path)))
        except RecordError as err:
            _documented(err, path)
