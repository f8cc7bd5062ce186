"""Uni-MoE JSON and webdataset shards: round trips, identical samples, bad inputs named, batching without dummies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.audio import AudioWorld
from data.formats import RecordError
from data.shapes import ShapesWorld
from data.speech import write_wav
from data.unimoe import (
    UniMoEJsonReader,
    UniMoEWebDatasetReader,
    audio_caption_sample,
    audio_qa_sample,
    collate_media,
    export_unimoe_json,
    export_unimoe_webdataset,
    speech_vqa_sample,
    spoken_instruction_sample,
    spoken_video_qa_sample,
    video_qa_sample,
)
from data.video import VideoWorld


@pytest.fixture(scope="module")
def samples():
    video = VideoWorld(image_size=32, num_frames=4).clip(0, "test")
    audio = AudioWorld(max_sounds=2).clip(1, "test")
    scene = ShapesWorld(image_size=32).scene(0, "test")
    return [
        video_qa_sample(video, 0), audio_qa_sample(audio, 0), audio_caption_sample(audio),
        speech_vqa_sample(scene, 0), spoken_instruction_sample(scene, "Describe the image briefly."),
        spoken_video_qa_sample(video, 0),
    ]  # fmt: skip


def _same(a, b) -> None:
    assert a.id == b.id and a.conversations == b.conversations and a.meta == b.meta
    assert (a.image is None) == (b.image is None)
    if a.image is not None:
        assert a.image.tobytes() == b.image.tobytes()
    assert [f.tobytes() for f in a.video or []] == [f.tobytes() for f in b.video or []]
    assert len(a.voice or []) == len(b.voice or [])
    for x, y in zip(a.voice or [], b.voice or []):
        assert np.array_equal(x, y)


def test_json_and_shards_give_identical_samples(samples, tmp_path):
    json_path = export_unimoe_json(samples, tmp_path / "json", "train")
    shards = export_unimoe_webdataset(samples, tmp_path / "wds", "train", shard_size=2)
    assert len(shards) == 3
    from_json, from_wds = list(UniMoEJsonReader(json_path)), list(UniMoEWebDatasetReader(tmp_path / "wds"))
    assert len(from_json) == len(from_wds) == len(samples)
    for a, b in zip(from_json, from_wds):
        _same(a, b)
    # The written audio is the 16-bit quantisation of the original waveform.
    assert np.abs(from_json[1].voice[0] - samples[1].voice[0]).max() < 1 / 16000
    assert from_json[0].video[0].tobytes() == samples[0].video[0].tobytes()
    records = json.loads(json_path.read_text())
    assert records[3]["conversations"][0]["value"].startswith("<image>\n<audio>\n") and len(records[3]["voice"]) == 1
    assert records[5]["conversations"][0]["value"].startswith("<audio>\n<video>\n") and len(records[5]["video"]) == 4
    # Same samples, same bytes.
    again = export_unimoe_webdataset(samples, tmp_path / "wds2", "train", shard_size=2)
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in again]


def _write(tmp_path, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def _turns(text):
    return [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]


@pytest.mark.parametrize(
    "record, field, problem",
    [
        ({"id": "a", "voice": ["missing.wav"], "conversations": _turns("<audio>\nq")}, "voice[0]", "not found"),
        ({"id": "a", "voice": ["bad.wav"], "conversations": _turns("<audio>\nq")}, "voice[0]", "not a readable"),
        ({"id": "a", "voice": ["rate.wav"], "conversations": _turns("<audio>\nq")}, "voice[0]", "8000 Hz"),
        ({"id": "a", "image": "bad.png", "conversations": _turns("<image>\nq")}, "image", "cannot decode"),
        ({"id": "a", "voice": ["ok.wav"], "conversations": _turns("<audio><audio>\nq")}, "voice", "1 item(s) but 2"),
        ({"id": "a", "video": ["f.png"], "conversations": _turns("q")}, "video", "1 item(s) but 0 '<video>'"),
        ({"id": "a", "video": "f.png", "conversations": _turns("<video>")}, "video", "expected a list"),
    ],
)
def test_bad_inputs_are_named_or_skipped(tmp_path, record, field, problem):
    write_wav(tmp_path / "ok.wav", np.zeros(160))
    write_wav(tmp_path / "rate.wav", np.zeros(80), sample_rate=8000)
    (tmp_path / "bad.wav").write_bytes(b"RIFF....garbage")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    good = {"id": "g", "voice": ["ok.wav"], "conversations": _turns("<audio>\nq")}
    path = _write(tmp_path, [good, record])
    with pytest.raises(RecordError) as err:
        list(UniMoEJsonReader(path))
    assert err.value.file == str(path) and err.value.record == "1 (id='a')" and err.value.field == field
    assert problem in err.value.problem
    reader = UniMoEJsonReader(path, skip_bad=True)
    assert [s.id for s in reader] == ["g"]
    assert reader.report.read == 1 and len(reader.report.skipped) == 1 and field in reader.report.skipped[0]


def test_bad_shard_member_is_named(samples, tmp_path):
    import io
    import tarfile

    (shard,) = export_unimoe_webdataset(samples[1:2], tmp_path, "x")
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if not m.name.endswith(".wav")]
    broken = tmp_path / "broken-000000.tar"
    with tarfile.open(broken, "w") as tar:
        for m, payload in members:
            tar.addfile(m, io.BytesIO(payload))
    shard.unlink()
    with pytest.raises(RecordError, match=r"broken-000000.tar: record 0 \(key='audio_test_000001_q0'\): field 'voice\[0\]'"):
        list(UniMoEWebDatasetReader(tmp_path))
    reader = UniMoEWebDatasetReader(tmp_path, skip_bad=True)
    assert list(reader) == [] and len(reader.report.skipped) == 1


def test_collate_stacks_present_media_only(samples):
    batch = collate_media(samples)
    assert batch.videos.shape == (2, 4, 3, 32, 32) and batch.video_owner.tolist() == [0, 5]
    assert batch.images.shape == (2, 3, 32, 32) and batch.image_owner.tolist() == [3, 4]
    assert batch.audio.shape == (5, 80, 3000) and batch.audio_owner.tolist() == [1, 2, 3, 4, 5]
    only_video = collate_media(samples[:1])
    assert only_video.images is None and only_video.audio is None and only_video.audio_owner.numel() == 0
