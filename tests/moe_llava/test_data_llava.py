"""LLaVA data pipeline: masking, image-token expansion, truncation, batching, both readers, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.llava import (
    IGNORE_INDEX,
    LlavaCollator,
    LlavaDataError,
    LlavaDataset,
    build_image_transform,
    encode_conversation,
    parse_record,
    read_llava_json,
    read_llava_webdataset,
)
from zoo.conversation import get_template
from zoo.tokenizers import build_tokenizer

TOK = build_tokenizer()
TF = build_image_transform(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
N_IMG = 4


def _records() -> list[dict]:
    return [
        {
            "id": "s0",
            "image": "s0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the circle?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "How many stars?"},
                {"from": "gpt", "value": "two"},
            ],
        },
        {"id": "t1", "conversations": [{"from": "human", "value": "Is red a color?"}, {"from": "gpt", "value": "yes"}]},
    ]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (20, 12), (255, 0, 0)).save(tmp_path / "s0.png")
    (tmp_path / "data.json").write_text(json.dumps(_records()))
    return tmp_path


def _ds(records, folder, **kw) -> LlavaDataset:
    kw = {"max_length": 256, **kw}
    return LlavaDataset(
        records, tokenizer=TOK, template=get_template("phi"), num_image_tokens=N_IMG, image_transform=TF,
        image_folder=folder, **kw,
    )


def test_labels_supervise_only_answers_and_end_of_turn():
    rec = parse_record(_records()[0], "x.json", 0)
    enc = encode_conversation(rec, get_template("phi"), TOK, N_IMG, 256)
    supervised = [TOK.convert_ids_to_tokens(i) for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert supervised == ["red", "<|endoftext|>", "two", "<|endoftext|>"]
    image_id = TOK.convert_tokens_to_ids("<image>")
    pos = [i for i, t in enumerate(enc.input_ids) if t == image_id]
    assert len(pos) == N_IMG and pos == list(range(pos[0], pos[0] + N_IMG))
    # Concatenating the pieces tokenizes exactly like the whole rendered conversation (after image expansion).
    whole = TOK(get_template("phi").render(rec.conversations), add_special_tokens=False).input_ids
    i0 = whole.index(image_id)
    assert enc.input_ids == whole[:i0] + [image_id] * N_IMG + whole[i0 + 1 :]


def test_plain_template_supervises_caption_and_newline():
    rec = parse_record(
        {"id": "c", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                        {"from": "gpt", "value": "a red star"}]}, "c.json", 0)
    enc = encode_conversation(rec, get_template("plain"), TOK, N_IMG, 64)
    assert TOK.convert_ids_to_tokens(enc.input_ids) == ["<image>"] * N_IMG + ["a", "red", "star", "\n"]
    assert enc.labels[:N_IMG] == [IGNORE_INDEX] * N_IMG and enc.labels[N_IMG:] == enc.input_ids[N_IMG:]


def test_folder_and_webdataset_give_identical_batches(folder: Path, tmp_path: Path):
    import webdataset as wds

    shard = str(tmp_path / "shard-000.tar")
    with wds.TarWriter(shard) as w:
        for r in _records():
            sample = {"__key__": r["id"], "json": json.dumps(r).encode()}
            if "image" in r:
                sample["png"] = (folder / r["image"]).read_bytes()
            w.write(sample)
    a = _ds(read_llava_json(folder / "data.json"), folder)
    b = _ds(read_llava_webdataset(shard), None)
    collate = LlavaCollator(TOK.pad_token_id)
    ba, bb = collate([a[0], a[1]]), collate([b[0], b[1]])
    for k in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(ba[k], bb[k]), k
    assert ba["pixel_values"].shape == (1, 3, 16, 16)  # the text-only record adds no image
    lengths = ba["attention_mask"].sum(1).tolist()
    assert lengths == [len(a[0]["input_ids"]), len(a[1]["input_ids"])]
    assert (ba["input_ids"][1, lengths[1]:] == TOK.pad_token_id).all()
    assert (ba["labels"][1, lengths[1]:] == IGNORE_INDEX).all()
    # The padded image is square (LLaVA's "pad" aspect mode) and normalised with the given mean/std.
    px = ba["pixel_values"][0]
    assert torch.allclose(px[:, 0, 0], torch.zeros(3), atol=0.05)  # padding = mean -> 0
    assert torch.allclose(px[:, 8, 8], torch.tensor([2.0, -2.0, -2.0]), atol=0.05)  # red


def test_truncation_is_counted(folder: Path):
    recs = read_llava_json(folder / "data.json")
    full = len(encode_conversation(recs[0], get_template("phi"), TOK, N_IMG, 10_000).input_ids)
    ds = _ds(recs, folder, max_length=full - 3)
    assert ds.stats.truncated == 1 and len(ds[0]["input_ids"]) == full - 3
    assert "1 truncated" in ds.summary()


def test_overlong_record_errors_or_is_skipped(folder: Path):
    recs = read_llava_json(folder / "data.json")
    with pytest.raises(LlavaDataError, match=r"data.json: record 's0'.*max_length=34.*cut an image"):
        _ds(recs[:1], folder, max_length=34)
    n_text = len(encode_conversation(recs[1], get_template("phi"), TOK, N_IMG, 10_000).input_ids)
    with pytest.raises(LlavaDataError, match=r"record 's0'.*truncation is off"):
        _ds(recs, folder, max_length=n_text, truncate=False)
    ds = _ds(recs, folder, max_length=n_text, truncate=False, on_error="skip")
    assert len(ds) == 1 and ds.stats.skipped["overlong"] == 1
    assert "skipped: overlong=1" in ds.summary()


def test_missing_and_corrupt_images(folder: Path):
    recs = read_llava_json(folder / "data.json")
    (folder / "s0.png").unlink()
    with pytest.raises(LlavaDataError, match=r"data.json: record 's0': field 'image': .*s0.png not found"):
        _ds(recs, folder)
    (folder / "s0.png").write_bytes(b"not a png")
    with pytest.raises(LlavaDataError, match=r"record 's0': field 'image': .*not a readable image"):
        _ds(recs, folder)
    ds = _ds(recs, folder, on_error="skip")
    assert len(ds) == 1 and ds.stats.skipped == {"image": 1}
    # An image that breaks after the dataset was built is skipped by the collator and counted.
    Image.new("RGB", (8, 8)).save(folder / "s0.png")
    ds = _ds(recs, folder, on_error="skip")
    (folder / "s0.png").unlink()
    batch = LlavaCollator(TOK.pad_token_id)([ds[0], ds[1]])
    assert batch["ids"] == ["t1"] and ds.stats.dropped == {ds.records[0].where: "image"} and ds.skipped_total() == 1
    assert [s.record for s in batch["skipped"]] == [ds.records[0].where]
    assert "dropped during training: image=1" in ds.summary()


def test_placeholder_image_mismatch_and_bad_fields(folder: Path):
    no_image = {"id": "a", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "x"}]}
    no_tag = {"id": "b", "image": "s0.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(LlavaDataError, match=r"f.json: record 'a'.*1 <image> placeholder\(s\) but no 'image' field"):
        _ds([parse_record(no_image, "f.json", 0)], folder)
    with pytest.raises(LlavaDataError, match=r"record 'b'.*0 <image> placeholder\(s\) but 1 image"):
        _ds([parse_record(no_tag, "f.json", 1)], folder)
    with pytest.raises(LlavaDataError, match=r"record 'c'.*conversations\[1\]"):
        parse_record({"id": "c", "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "x"}]},
                     "f.json", 2)
    with pytest.raises(LlavaDataError, match=r"record 'd'.*conversations\[1\]\.from"):
        parse_record({"id": "d", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "x"}]},
                     "f.json", 3)
    ds = _ds([parse_record(no_image, "f.json", 0), *read_llava_json(folder / "data.json")], folder, on_error="skip")
    assert len(ds) == 2 and ds.stats.skipped == {"placeholder": 1}
