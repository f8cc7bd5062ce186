"""The shipped Uni-MoE demo weights load by name, reproduce their recorded scores on the first documents of the four
synthetic-world tasks, are the recipe's LoRA-expert MoE model, and answer through ``zoo chat``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from zoo.registry import get_weights_cfg

ROOT = Path(__file__).resolve().parents[2]
NAME = "uni_moe_tiny.shapes_av"


def _ship_demo():
    spec = importlib.util.spec_from_file_location("uni_moe_ship_demo", ROOT / "recipes" / "uni_moe" / "ship_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def demo():
    import zoo.weights_table  # noqa: F401  (registers the name until zoo.models imports it)

    return zoo.load(NAME)


def test_weights_are_registered_small_and_traceable():
    import zoo.weights_table  # noqa: F401

    cfg = get_weights_cfg(NAME)
    assert cfg.recipe.startswith("recipes/uni_moe/shapes_av_tiny.yaml@") and len(cfg.recipe.split("@")[1]) == 40
    files = list((zoo.registry.SHIPPED_WEIGHTS_DIR / cfg.file).iterdir())
    assert sum(f.stat().st_size for f in files) < 8 * 2**20
    tasks = ("shapes_vqa", "shapes_video_qa", "shapes_audio_qa", "shapes_speech_vqa")
    assert {f"{t}/accuracy" for t in tasks} | {"params_active_M", "params_total_M"} <= set(cfg.metrics)


def test_demo_weights_reproduce_recorded_scores(demo):
    cfg = get_weights_cfg(NAME)
    scores = _ship_demo().demo_scores(demo)
    recorded = {k: v for k, v in cfg.metrics.items() if k.startswith("demo32/")}
    assert len(recorded) >= 4, "no demo32/ scores recorded"
    for key, value in recorded.items():
        assert scores[key.removeprefix("demo32/")] == pytest.approx(value, abs=1e-6), key


def test_demo_model_is_lora_expert_moe_on_every_layer(demo):
    n = demo.num_parameters()
    layers = demo.moe_layer_modules()
    assert [i for i, _ in layers] == list(range(len(demo.llm.layers))) and n["active"] < n["total"]
    assert all(m.cfg.num_experts == 4 and m.cfg.top_k == 2 for _, m in layers)
    assert set(demo.modalities) == {"image", "video", "audio"}


def test_zoo_chat_answers_a_sound_question(demo, tmp_path, capsys):
    from data.audio import AudioConfig, AudioWorld
    from data.speech import read_wav, write_wav
    from zoo.chat import SHORT_ANSWER, main

    clip = AudioWorld(AudioConfig(seed=0, snr_db=10.0)).clip(0, "test")
    count = next(qa for qa in clip.qa if qa.kind == "count")
    write_wav(tmp_path / "clip.wav", clip.waveform)
    assert main(["--model", NAME, "--audio", str(tmp_path / "clip.wav"), "--short-answer", count.question]) == 0
    said = capsys.readouterr().out.strip()
    # The WAV round trip (16-bit) is what chat reads; the answer is a count, as the question asks.
    direct = demo.generate([None], [f"{count.question}\n{SHORT_ANSWER}"],
                           media={"audio": [read_wav(tmp_path / "clip.wav")]}, max_new_tokens=32)[0]
    assert said == direct and said.isdigit()
