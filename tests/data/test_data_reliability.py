"""Bad data is skipped and counted, or refused before step 1, the same way by every LLaVA reader (issue 19)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.formats import LlavaJsonReader, RecordError, read_webdataset
from data.llava import (
    LlavaCollator,
    LlavaDataError,
    LlavaDataset,
    build_image_transform,
    read_llava_json,
    read_llava_webdataset,
)
from data.validation import DataFileError, ImageError, ShardError, decode_image, iter_shard
from zoo.conversation import get_template
from zoo.tokenizers import build_tokenizer

TOK = build_tokenizer()
TF = build_image_transform(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _noise(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _record(i: int, image: str | None = "x.png") -> dict:
    rec = {"id": f"r{i}", "conversations": [{"from": "human", "value": "<image>\nWhat color?"},
                                            {"from": "gpt", "value": "red"}]}
    if image is None:
        rec["conversations"][0]["value"] = "Is red a color?"
    else:
        rec["image"] = image
    return rec


def _folder(tmp_path: Path, n: int, fmt: str = "PNG") -> Path:
    """``n`` records, each with its own noise image (``img<i>.png`` / ``.jpg``), in ``tmp_path/data.json``."""
    ext = "jpg" if fmt == "JPEG" else "png"
    for i in range(n):
        (tmp_path / f"img{i}.{ext}").write_bytes(_encoded(_noise(seed=i), fmt))
    (tmp_path / "data.json").write_text(json.dumps([_record(i, f"img{i}.{ext}") for i in range(n)]))
    return tmp_path


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _ds(records, folder, **kw) -> LlavaDataset:
    return LlavaDataset(records, tokenizer=TOK, template=get_template("phi"), num_image_tokens=4,
                        image_transform=TF, image_folder=folder, max_length=256, **kw)


# ---- images ------------------------------------------------------------------------------------------------------


def test_truncated_png_is_a_labelled_error_or_a_counted_skip(tmp_path):
    folder = _folder(tmp_path, 3)
    _truncate(folder / "img1.png")
    records = read_llava_json(folder / "data.json")
    with pytest.raises(LlavaDataError, match=r"data.json: record 'r1': field 'image': .*img1.png is not a "
                                             r"readable image: cannot be decoded \(OSError: .*truncated"):
        _ds(records, folder)
    ds = _ds(records, folder, on_error="skip")
    assert len(ds) == 2 and ds.stats.skipped == {"image": 1} and ds.skipped_total() == 1
    assert [ds[i]["id"] for i in range(2)] == ["r0", "r2"]
    reader = LlavaJsonReader(folder / "data.json", skip_bad=True)
    assert [s["id"] for s in reader] == ["r0", "r2"] and len(reader.report.skipped) == 1
    assert "field 'image'" in reader.report.skipped[0] and "truncated" in reader.report.skipped[0]


def test_truncated_jpeg_fails_before_step_one(tmp_path):
    folder = _folder(tmp_path, 2, "JPEG")
    _truncate(folder / "img0.jpg", 0.7)
    with Image.open(folder / "img0.jpg") as im:
        im.verify()  # the check the dataset used to make: it passes on a truncated JPEG
    records = read_llava_json(folder / "data.json")
    with pytest.raises(LlavaDataError, match=r"record 'r0'.*img0.jpg is not a readable image.*truncated"):
        _ds(records, folder)
    ds = _ds(records, folder, on_error="skip")
    assert len(ds) == 1 and ds.stats.skipped == {"image": 1}


@pytest.mark.parametrize("pixels,what", [(3000, "DecompressionBombWarning"), (1500, "DecompressionBombError")])
def test_decompression_bombs_are_skipped_and_counted(tmp_path, monkeypatch, pixels, what):
    folder = _folder(tmp_path, 2)
    Image.new("RGB", (8, 8)).save(folder / "img0.png")  # 64 pixels: fine
    Image.new("RGB", (64, 64)).save(folder / "img1.png")  # 4096 pixels: over the limit set below
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice it: 3000 < 4096 < 6000, and 4096 > 3000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with pytest.raises(ImageError, match=f"too large to decode safely \\({what}"):
        decode_image(folder / "img1.png")
    ds = _ds(read_llava_json(folder / "data.json"), folder, on_error="skip")
    assert len(ds) == 1 and ds.stats.skipped == {"image": 1}
    assert "too large to decode safely" in ds.stats.examples[0]
    with pytest.raises(LlavaDataError, match="record 'r1'.*too large"):
        _ds(read_llava_json(folder / "data.json"), folder)
    reader = LlavaJsonReader(folder / "data.json", skip_bad=True)
    assert [s["id"] for s in reader] == ["r0"] and "too large" in reader.report.skipped[0]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "img0.png")
    with Image.open(tmp_path / "img0.png") as im:
        assert im.mode == "I;16"
    (tmp_path / "data.json").write_text(json.dumps([_record(0, "img0.png")]))
    expected = np.repeat((np.arange(256).reshape(16, 16))[..., None], 3, axis=2).astype(np.uint8)
    sample = next(iter(LlavaJsonReader(tmp_path / "data.json")))
    assert np.array_equal(np.asarray(sample["image"]), expected)  # Pillow's convert("RGB") gives 255 almost everywhere
    ds = _ds(read_llava_json(tmp_path / "data.json"), tmp_path)
    pixels = ds[0]["images"][0]
    want = TF(Image.fromarray(expected))
    assert torch.allclose(pixels, want) and pixels.std() > 0.5
    # 32-bit images have no known range: refused with a message, not guessed.
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ImageError, match=r"32-bit floating-point pixels \(mode F\)"):
        decode_image(tmp_path / "float.tiff")


# ---- records and files -------------------------------------------------------------------------------------------


def test_malformed_json_record_is_skipped_not_the_file(tmp_path):
    folder = _folder(tmp_path, 3)
    records = json.loads((folder / "data.json").read_text())
    records[1]["conversations"] = "not a list"
    records.append(["not", "an", "object"])
    (folder / "data.json").write_text(json.dumps(records))
    with pytest.raises(LlavaDataError, match=r"data.json: record 'r1' \(index 1\): field 'conversations'"):
        read_llava_json(folder / "data.json")
    items = read_llava_json(folder / "data.json", on_error="skip")
    assert [type(x).__name__ for x in items] == ["Record", "LlavaDataError", "Record", "LlavaDataError"]
    ds = _ds(items, folder, on_error="skip")
    assert [ds[i]["id"] for i in range(len(ds))] == ["r0", "r2"]
    assert ds.stats.total == 4 and ds.stats.skipped == {"format": 2} and "skipped: format=2" in ds.summary()


def test_non_utf8_json_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([_record(0, None)]).replace("color", "col\u00f6r").encode("latin-1"))
    with pytest.raises(LlavaDataError, match=r"latin1.json: not UTF-8 text \(byte \d+: invalid") as info:
        read_llava_json(path)
    assert "\n" not in str(info.value)
    with pytest.raises(DataFileError, match=r"latin1.json: not UTF-8 text"):
        list(LlavaJsonReader(path))
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([_record(0, None)]).encode())
    assert [r.id for r in read_llava_json(bom)] == ["r0"]  # a UTF-8 byte-order mark is still UTF-8


# ---- DataLoader workers ------------------------------------------------------------------------------------------


def test_drops_in_dataloader_workers_are_counted(tmp_path):
    folder = _folder(tmp_path, 8)
    ds = _ds(read_llava_json(folder / "data.json"), folder, on_error="skip")
    for i in (1, 3, 4, 6):  # break after the up-front check: only training sees it
        _truncate(folder / f"img{i}.png")
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=LlavaCollator(TOK.pad_token_id))
    ids = []
    for batch in loader:
        ids += batch["ids"]
        ds.note_dropped(batch["skipped"])
    assert ids == ["r0", "r2", "r5", "r7"]
    assert ds.stats.dropped == {ds.records[i].where: "image" for i in (1, 3, 4, 6)} and ds.skipped_total() == 4
    assert "dropped during training: image=4" in ds.summary()
    for batch in loader:  # a second pass sees the same four: still four distinct records
        ds.note_dropped(batch["skipped"])
    assert ds.skipped_total() == 4
    with pytest.raises(LlavaDataError, match="record 'r1'.*img1.png is not a readable image"):
        _ds(read_llava_json(folder / "data.json"), folder, verify_images=False)[1]


# ---- webdataset shards -------------------------------------------------------------------------------------------


def _shard(path: Path, n: int = 4) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            for ext, payload in (("png", _encoded(_noise(seed=i), "PNG")),
                                 ("json", json.dumps(_record(i, f"r{i}.png")).encode())):
                info = tarfile.TarInfo(f"r{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def _member_offsets(path: Path) -> list[tuple[int, int, int]]:
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data, m.size) for m in tar.getmembers()]


@pytest.mark.parametrize("where", ["header", "data", "end"])
def test_truncated_shard_is_an_error_naming_it_or_a_counted_skip(tmp_path, where):
    good = _shard(tmp_path / "good.tar")
    offsets = _member_offsets(good)  # r0.png, r0.json, r1.png, ...
    cut = {
        "header": offsets[6][0] + 100,  # inside r3.png's header: tarfile alone reads r0..r2 and stops quietly
        "data": offsets[5][1] + offsets[5][2] // 2,  # inside r2.json's data: tarfile alone raises a bare ReadError
        "end": offsets[7][1] + 512,  # after r3.json's data (one block), before the end-of-archive marker
    }[where]
    bad = tmp_path / "cut.tar"
    bad.write_bytes(good.read_bytes()[:cut])
    with pytest.raises(ShardError, match=r"cut.tar: .*byte"):
        list(iter_shard(bad))
    with pytest.raises(LlavaDataError, match=r"cut.tar: .*data.shards"):
        read_llava_webdataset(str(bad))
    items = read_llava_webdataset(str(bad), on_error="skip")
    kept = [x.id for x in items if not isinstance(x, LlavaDataError)]
    lost = [x for x in items if isinstance(x, LlavaDataError)]
    assert len(lost) == 1 and lost[0].reason == "shard" and str(bad) in str(lost[0])
    # The sample being read when the shard broke may be incomplete: it is not used, the damage is the one skip.
    assert kept == {"header": ["r0", "r1"], "data": ["r0", "r1"], "end": ["r0", "r1", "r2"]}[where]
    ds = _ds(items, None, on_error="skip")
    assert len(ds) == len(kept) and ds.stats.skipped == {"shard": 1}
    with pytest.raises(RecordError) as info:
        list(read_webdataset(str(bad)))
    assert info.value.file == str(bad) and info.value.field == "<shard>"
    reader = read_webdataset(str(bad), skip_bad=True)
    assert len(list(reader)) == len(kept) and len(reader.report.skipped) == 1
    # The untouched shard reads completely through both readers.
    assert [r.id for r in read_llava_webdataset(str(good))] == ["r0", "r1", "r2", "r3"]
    assert len(list(read_webdataset(str(good)))) == 4


def test_empty_and_non_tar_shards_name_the_shard(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 2000)
    for name in ("empty.tar", "junk.tar"):
        with pytest.raises(LlavaDataError, match=f"{name}: not a readable tar file"):
            read_llava_webdataset(str(tmp_path / name))


def test_compressed_shards_read_and_truncation_is_found(tmp_path):
    import gzip

    data = gzip.compress(_shard(tmp_path / "good.tar").read_bytes())
    (tmp_path / "good.tar.gz").write_bytes(data)
    assert [r.id for r in read_llava_webdataset(str(tmp_path / "good.tar.gz"))] == ["r0", "r1", "r2", "r3"]
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) * 9 // 10])
    with pytest.raises(ShardError, match=r"cut.tar.gz: .*(Compressed file ended|truncated)"):
        list(iter_shard(tmp_path / "cut.tar.gz"))
    items = read_llava_webdataset(str(tmp_path / "cut.tar.gz"), on_error="skip")
    assert isinstance(items[-1], LlavaDataError) and items[-1].reason == "shard"
    assert all(not isinstance(x, LlavaDataError) for x in items[:-1])
