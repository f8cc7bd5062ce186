"""LLaVA JSON and webdataset exports: round trips to identical samples, clear errors, counted skips."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest

from data.formats import (
    CAPTION_PROMPTS,
    SHORT_ANSWER_PROMPT,
    LlavaJsonReader,
    RecordError,
    decode_masks,
    export_llava,
    export_webdataset,
    read_webdataset,
)
from data.shapes import ShapesWorld, WorldConfig


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(WorldConfig(image_size=48, seed=1, max_objects=3, background="noise", clutter=2))


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() == {"id", "image", "conversations", "meta"}
    assert a["id"] == b["id"] and a["conversations"] == b["conversations"] and a["meta"] == b["meta"]
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


@pytest.mark.parametrize("kind", ["vqa", "caption"])
def test_exports_round_trip_to_identical_samples(world, tmp_path, kind):
    n = 7
    json_path = export_llava(world, "val", n, tmp_path / "llava", kind=kind)
    shards = export_webdataset(world, "val", n, tmp_path / "wds", kind=kind, shard_size=3)
    assert [p.name for p in shards] == [f"val-{kind}-00000{i}.tar" for i in range(3)]
    from_json = list(LlavaJsonReader(json_path))
    from_wds = list(read_webdataset([str(p) for p in shards]))
    from_dir = list(read_webdataset(tmp_path / "wds"))
    brace = list(read_webdataset(str(tmp_path / "wds" / f"val-{kind}-{{000000..000002}}.tar")))
    assert len(from_json) == len(from_wds) == len(from_dir) == len(brace) == n
    scenes = world.scenes("val", n)
    for scene, a, b, c, d in zip(scenes, from_json, from_wds, from_dir, brace):
        _same(a, b)
        _same(a, c)
        _same(a, d)
        assert a["id"] == scene.id
        assert np.array_equal(np.asarray(a["image"]), np.asarray(scene.image))
        assert a["meta"] == json.loads(json.dumps(scene.to_record()))
        for mask, obj in zip(decode_masks(a["meta"]), scene.objects):
            assert np.array_equal(mask, obj.mask)
        turns = a["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        if kind == "vqa":
            assert [t["value"] for t in turns[1::2]] == [q.answer for q in scene.vqa]
            assert turns[0]["value"] == f"<image>\n{scene.vqa[0].question}"
            assert len(turns) >= 10  # multi-turn: every question of the scene
        else:
            assert turns == [
                {"from": "human", "value": f"<image>\n{CAPTION_PROMPTS[scene.index % len(CAPTION_PROMPTS)]}"},
                {"from": "gpt", "value": scene.caption},
            ]


def test_exports_are_byte_deterministic_and_answer_prompt(world, tmp_path):
    a = export_webdataset(world, "train", 4, tmp_path / "a", shard_size=10)
    b = export_webdataset(world, "train", 4, tmp_path / "b", shard_size=10)
    assert a[0].read_bytes() == b[0].read_bytes()
    j1 = export_llava(world, "train", 4, tmp_path / "c")
    j2 = export_llava(world, "train", 4, tmp_path / "d")
    assert j1.read_bytes() == j2.read_bytes()
    assert (tmp_path / "c/images").exists()
    j3 = export_llava(world, "train", 2, tmp_path / "e", answer_prompt=SHORT_ANSWER_PROMPT)
    first = next(iter(LlavaJsonReader(j3)))
    assert first["conversations"][0]["value"].endswith(f"?\n{SHORT_ANSWER_PROMPT}")
    assert all(t["value"].endswith(SHORT_ANSWER_PROMPT) for t in first["conversations"][0::2])


def _write_records(tmp_path, records, image_ok=True):
    (tmp_path / "images").mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "images/ok.png")
    (tmp_path / "images/bad.png").write_bytes(b"not a png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def _good(i):
    return {
        "id": f"r{i}",
        "image": "images/ok.png",
        "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
    }


BAD_CASES = [
    ({"id": "x", "image": "images/ok.png"}, "conversations", "missing"),
    (
        {"id": "x", "image": "images/ok.png", "conversations": [{"value": "<image>\nQ"}]},
        "conversations[0].from",
        "missing",
    ),
    (
        {
            "id": "x",
            "image": "images/ok.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt"}],
        },
        "conversations[1].value",
        "missing",
    ),
    (
        {"id": "x", "image": "images/ok.png", "conversations": [{"from": "bot", "value": "<image>"}]},
        "conversations[0].from",
        "'bot'",
    ),
    (
        {"id": "x", "image": "images/nope.png", "conversations": [{"from": "human", "value": "<image>"}]},
        "image",
        "not found",
    ),
    (
        {"id": "x", "image": "images/bad.png", "conversations": [{"from": "human", "value": "<image>"}]},
        "image",
        "cannot decode",
    ),
    ({"id": "x", "conversations": [{"from": "human", "value": "<image>\nQ"}]}, "image", "placeholder"),
    (
        {"id": "x", "image": "images/ok.png", "conversations": [{"from": "human", "value": "Q"}]},
        "image",
        "placeholder",
    ),
    ({"image": "images/ok.png", "conversations": [{"from": "human", "value": "<image>"}]}, "id", "missing"),
]


@pytest.mark.parametrize("bad,field,problem", BAD_CASES)
def test_llava_reader_errors_name_file_record_field(tmp_path, bad, field, problem):
    path = _write_records(tmp_path, [_good(0), bad, _good(2)])
    with pytest.raises(RecordError) as info:
        list(LlavaJsonReader(path))
    err = info.value
    assert err.file == str(path) and err.field == field
    assert err.record.startswith("1")
    assert str(path) in str(err) and f"field '{field}'" in str(err) and problem in str(err)
    if "id" in bad:
        assert "id='x'" in str(err)


def test_skip_bad_counts_and_reports(tmp_path, caplog):
    records = [
        _good(0),
        BAD_CASES[0][0],
        _good(2),
        BAD_CASES[4][0],
        {
            "id": "t",
            "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}],
        },
    ]
    path = _write_records(tmp_path, records)
    reader = LlavaJsonReader(path, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="data.formats"):
        samples = list(reader)
    assert [s["id"] for s in samples] == ["r0", "r2", "t"]
    assert samples[2]["image"] is None and samples[2]["meta"] == {}
    assert reader.report.read == 3 and len(reader.report.skipped) == 2
    assert "record 1 (id='x'): field 'conversations'" in reader.report.skipped[0]
    assert "record 3 (id='x'): field 'image'" in reader.report.skipped[1]
    assert "skipped 2" in caplog.text and str(path) in caplog.text


def test_whole_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        LlavaJsonReader(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        list(LlavaJsonReader(tmp_path / "broken.json"))
    with pytest.raises(FileNotFoundError, match="nope-000000.tar"):
        read_webdataset(str(tmp_path / "nope-000000.tar"))


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_webdataset_reader_errors_and_skips(world, tmp_path):
    good = export_webdataset(world, "train", 2, tmp_path / "good")[0]
    with tarfile.open(good) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    record = json.loads(members[1][1])
    del record["conversations"]
    broken = [
        members[0],
        ("s1.json", json.dumps(record).encode()),
        members[2],
        members[3],
        ("s2.json", b"{oops"),
        ("s3.png", members[0][1]),
    ]
    path = tmp_path / "bad.tar"
    _tar(path, broken)
    with pytest.raises(RecordError) as info:
        list(read_webdataset(str(path)))
    assert info.value.file == str(path) and info.value.field == "json"  # the first png lost its json
    reader = read_webdataset(str(path), skip_bad=True)
    samples = list(reader)
    assert len(samples) == 1 and samples[0]["id"] == record["id"].replace("0000000", "0000001")
    assert reader.report.read == 1 and len(reader.report.skipped) == 4
    text = "\n".join(reader.report.skipped)
    assert "field 'json': missing" in text and "field 'json': not valid JSON" in text
    assert "field 'conversations': missing" in text
