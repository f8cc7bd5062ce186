"""``zoo chat`` with a Uni-MoE model: ``--audio FILE --video DIR --image FILE`` reach ``generate`` as the model's
modalities (the answer equals a direct ``generate`` with the same media), and the errors name the flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from unimoe_helpers import randomise_lora, small

from data.speech import read_wav, speak, write_wav
from eval.av import load_frames
from zoo.chat import main
from zoo.registry import load, save_pretrained


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    model = small(audio=None)  # image, video (3 frames) and the Whisper 'audio' path
    randomise_lora(model)
    save_pretrained(model, root / "model", "uni_moe_tiny", model.model_args)
    rng = np.random.default_rng(0)
    frames = root / "frames"
    frames.mkdir()
    for i in range(6):  # 6 frames on disk, 3 sampled (every 2nd), as Uni-MoE samples
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(frames / f"{i:05d}.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "scene.png")
    write_wav(root / "question.wav", speak("What color is the circle?"))
    return {"model": root / "model", "frames": frames, "image": root / "scene.png", "wav": root / "question.wav"}


def test_chat_passes_audio_video_and_image_to_the_model(files, capsys):
    argv = ["--model", str(files["model"]), "--image", str(files["image"]), "--video", str(files["frames"]),
            "--audio", str(files["wav"]), "--max-new-tokens", "4", "What is it?"]
    assert main(argv) == 0
    said = capsys.readouterr().out.strip()
    model = load(files["model"])
    image = Image.open(files["image"]).convert("RGB")
    media = {"video": [load_frames(files["frames"], 3, "test")], "audio": [read_wav(files["wav"])]}
    assert said == model.generate([image], ["What is it?"], max_new_tokens=4, media=media)[0]
    # Without the audio the prompt differs, and so does the model's view of it (the placeholders go with the media).
    text_only = model.build_generation_inputs([image], ["What is it?"], media={"video": media["video"]})
    full = model.build_generation_inputs([image], ["What is it?"], media=media)
    assert (full["input_ids"] == model.modalities["audio"].token_id).sum() == model.modalities["audio"].tokens_per_item
    assert not (text_only["input_ids"] == model.modalities["audio"].token_id).any()


def test_chat_audio_alone_and_in_a_conversation(files, capsys, monkeypatch):
    import io

    assert main(["--model", str(files["model"]), "--audio", str(files["wav"]), "--max-new-tokens", "2", "Say?"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # one answer (an untrained model's may be empty)
    monkeypatch.setattr("sys.stdin", io.StringIO("First?\nSecond?\n"))
    assert main(["--model", str(files["model"]), "--audio", str(files["wav"]), "--video", str(files["frames"]),
                 "--max-new-tokens", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_chat_media_errors(files, tmp_path, capsys):
    assert main(["--model", str(files["model"]), "What?"]) == 2
    assert "at least one of --image, --scene, --audio, --video" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--audio .*missing.wav: no such file"):
        main(["--model", str(files["model"]), "--audio", str(tmp_path / "missing.wav"), "What?"])
    with pytest.raises(SystemExit, match="video frame folder .* does not exist"):
        main(["--model", str(files["model"]), "--video", str(tmp_path / "nope"), "What?"])
    no_video = small(audio=None, video=False)
    save_pretrained(no_video, tmp_path / "nv", "uni_moe_tiny", no_video.model_args)
    with pytest.raises(SystemExit, match="--video: .* has no 'video' modality"):
        main(["--model", str(tmp_path / "nv"), "--video", str(files["frames"]), "What?"])
