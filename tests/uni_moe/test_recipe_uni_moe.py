"""The Uni-MoE recipes: the tiny one validates and runs its six stages end to end at toy size; the full-scale one
instantiates with tiny overrides; a misnamed expert source is reported before any compute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "uni_moe" / "shapes_av_tiny.yaml"
SPEECH_4E = ROOT / "recipes" / "uni_moe" / "speech_4e.yaml"
EXPERTS = ["expert_image", "expert_video", "expert_audio", "expert_speech"]
TINY_LM = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)


def test_tiny_recipe_checks_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "zoo", "train", str(TINY), "--check"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "valid; recipe 'uni_moe_shapes_av_tiny'" in out.stdout
    for name in ("align", *EXPERTS, "moe"):
        assert f"  {name}: uni_moe" in out.stdout


def test_tiny_recipe_has_the_three_progressive_stages():
    r = load_recipe(TINY)
    stages = {s.name: s for s in r.stages}
    assert list(stages) == ["align", *EXPERTS, "moe", "dense"]
    align, moe, dense = stages["align"], stages["moe"], stages["dense"]
    assert align.data.kind == "caption" and align.model.uni_moe is None and align.model.lora is None
    assert align.init_source == ("weights", "moe_llava_tiny.shapes")
    for name, modality in zip(EXPERTS, ["image", "video", "audio", "speech"]):
        s = stages[name]
        assert s.init_source == ("stage", "align") and s.model.uni_moe is None
        assert s.data.kind == "instruction" and s.data.modalities == [modality]
        assert s.trainable == ["llm.lm.model.layers.*.mlp.*"]
    assert moe.init_source == ("stage", "align") and moe.model.expert_sources == EXPERTS
    assert moe.model.uni_moe["num_experts"] == 4 and moe.model.uni_moe["top_k"] == 2
    assert (moe.model.lora["rank"], moe.model.lora["alpha"], moe.model.lora["dropout"]) == (8, 16.0, 0.05)
    assert set(moe.eval.tasks) == {"shapes_vqa", "shapes_video_qa", "shapes_audio_qa", "shapes_speech_vqa"}
    # The dense baseline: 2x-wide FFNs (the top-2 model's activated FFN size), the same data, steps and eval.
    assert dense.init_source == ("stage", "align") and dense.model.uni_moe is None and dense.model.widen_ffn == 2
    assert dense.data == moe.data and dense.trainer.max_steps == moe.trainer.max_steps
    assert dense.eval.tasks == moe.eval.tasks and dense.eval.limit == moe.eval.limit
    # Every stage reads the same vocabulary (init_from checks it too).
    assert len({json.dumps([s.model.vocab_world.__dict__, s.model.vocab_items]) for s in r.stages}) == 1


def test_expert_sources_must_name_earlier_stages():
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, overrides=["stages.moe.model.expert_sources=[expert_image, expert_video, expert_audio, "
                                     "expert_speach]"])
    assert "stages[5].model.expert_sources[3]" in str(err.value) and "'expert_speach'" in str(err.value)
    with pytest.raises(RecipeError, match="expert_sources names 2 stages for 4 experts"):
        load_recipe(TINY, overrides=["stages.moe.model.expert_sources=[expert_image, expert_video]"])
    with pytest.raises(RecipeError, match="not an earlier stage"):
        load_recipe(TINY, overrides=["stages.align.model.uni_moe={num_experts: 4}",
                                     "stages.align.model.expert_sources=[moe, moe, moe, moe]"])


def _toy_overrides(stages: list[str], *, eval_stages: tuple[str, ...] = ()) -> list[str]:
    """2 steps per stage on a few samples; the recipe's own models (its LM is the MoE-LLaVA demo's, 4.3M at most)."""
    out = []
    for s in stages:
        out += [
            f"stages.{s}.model.vocab_items=20",
            f"stages.{s}.data.items_per_modality=4",
            f"stages.{s}.batch_size=4",
            f"stages.{s}.trainer={{max_steps: 2, accelerator: cpu, devices: 1, precision: 32-true, "
            f"enable_progress_bar: false, log_every_n_steps: 1}}",
        ]
    for s in eval_stages:
        out += [f"stages.{s}.eval.limit=2", f"stages.{s}.eval.batch_size=4"]
    return out + ["stages.moe.eval.routing_samples=2"] if "moe" in eval_stages else out


@pytest.mark.slow
def test_tiny_recipe_runs_end_to_end_at_toy_size(tmp_path: Path):
    """All seven stages (2 steps each), stage-3 experts = the stage-2 FFNs, eval on the four tasks, routing heatmap,
    the dense baseline's widened FFNs."""
    from zoo.registry import load
    from zoo.train import train

    torch.set_num_threads(2)
    names = ["align", *EXPERTS, "moe", "dense"]
    overrides = _toy_overrides(names, eval_stages=("moe", "dense"))
    rows = {r["stage"]: r for r in train(TINY, overrides=overrides, runs_dir=tmp_path)}
    runs = tmp_path / "uni_moe_shapes_av_tiny"
    align = load(runs / "align" / "final")
    demo = load("moe_llava_tiny.shapes")
    # Stage 1 starts from the demo weights' vision tower, frozen throughout.
    for k, v in demo.vision_tower.state_dict().items():
        assert torch.equal(align.vision_tower.state_dict()[k], v), k
    moe = load(runs / "moe" / "final")
    assert moe.moe_layers == [0, 1, 2, 3] and moe.cfg.uni_moe["num_experts"] == 4
    # Stage 2 changed only the FFNs; each expert's frozen base is its stage-2 FFN (specialised, not copies).
    experts = [load(runs / n / "final") for n in EXPERTS]
    for e, dense in enumerate(experts):
        for i, layer in enumerate(dense.llm.layers):
            base = moe.llm.layers[i].mlp.experts.base
            assert torch.equal(base.fc1_weight[e], layer.mlp.fc1.weight)  # the recipe's LM is Phi-style (gelu)
            assert torch.equal(base.fc2_weight[e], layer.mlp.fc2.weight)
            assert torch.equal(layer.self_attn.q_proj.weight, align.llm.layers[i].self_attn.q_proj.weight)
    assert not torch.equal(experts[0].llm.layers[0].mlp.fc1.weight, experts[1].llm.layers[0].mlp.fc1.weight)
    baseline = load(runs / "dense" / "final")
    assert baseline.llm.layers[0].mlp.fc1.weight.shape[0] == 2 * align.llm.layers[0].mlp.fc1.weight.shape[0]
    for stage in ("moe", "dense"):
        m = rows[stage]["metrics"]
        for task in ("shapes_vqa", "shapes_video_qa", "shapes_audio_qa", "shapes_speech_vqa"):
            assert 0.0 <= m[f"{task}/accuracy"] <= 100.0
    routing = json.loads((runs / "moe" / "routing.json").read_text())
    assert set(routing["experts_by_modality"]) == {"image", "video", "audio", "speech"}
    for row in routing["experts_by_modality"].values():
        assert len(row) == 4 and abs(sum(row) - 1.0) < 1e-5
    assert (runs / "moe" / "routing.png").stat().st_size > 0


# ---- the full-scale recipe -------------------------------------------------------------------------------------------

TOY_CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 16}
TOY_WHISPER = dict(vocab_size=8, num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                   max_source_positions=1500, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, decoder_start_token_id=1)
SPEECH_FILES = {
    "align_image_caption": ("image", "caption"), "align_video_caption": ("video", "caption"),
    "align_speech_transcript": ("speech", "caption"), "instruct_image": ("image", "instruction"),
    "instruct_video": ("video", "instruction"), "instruct_speech": ("speech", "instruction"),
    "instruct_audio": ("audio", "instruction"),
}


def test_speech_4e_recipe_has_the_papers_stage3_settings():
    r = load_recipe(SPEECH_4E)
    stages = {s.name: s for s in r.stages}
    moe = stages["moe"]
    assert moe.model.architecture == "uni_moe_speech_4e" and moe.model.tokenizer == "pretrained"
    assert moe.model.uni_moe == dict(num_experts=4, top_k=2, layers="dense", router="mixtral", expert_lora_rank=8,
                                     expert_lora_alpha=16.0, expert_lora_dropout=0.05)
    assert moe.model.lora == dict(rank=8, alpha=16.0, dropout=0.05, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert moe.model.expert_sources == ["expert_image", "expert_video", "expert_speech", "expert_audio"]
    # finetune_speech.sh: lr 4e-5 cosine, wd 0, 2 epochs, 1 GPU x batch 4 x accumulation 2, bf16, ZeRO-2.
    assert (moe.optim.lr, moe.optim.weight_decay, moe.schedule.name) == (4e-5, 0.0, "cosine")
    t = moe.trainer
    assert (t.max_epochs, t.devices, moe.batch_size, t.accumulate_grad_batches) == (2, 1, 4, 2)
    assert (t.precision, t.strategy) == ("bf16-mixed", "deepspeed_stage_2")
    assert moe.trainable == ["*lora_*", "llm.lm.model.layers.*.mlp.router.*", "mm_projector.*", "speech.projector.*"]
    assert stages["align"].trainable == ["mm_projector.*", "speech.query_tokens", "speech.decoder.*",
                                         "speech.projector.*"]
    assert all(stages[n].trainable == ["llm.lm.model.layers.*.mlp.*"] for n in moe.model.expert_sources)


@pytest.fixture
def speech_env(tmp_path: Path, monkeypatch) -> Path:
    """Toy pretrained LM / CLIP / Whisper folders and Uni-MoE JSON files of synthetic samples in the recipe's names."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        CLIPVisionConfig,
        CLIPVisionModel,
        WhisperConfig,
        WhisperModel,
    )

    from data.shapes_av import AVWorlds, av_tokenizer
    from data.unimoe import export_unimoe_json

    weights, data = tmp_path / "weights", tmp_path / "data" / "uni_moe"
    worlds = AVWorlds(image_size=32)
    tok = av_tokenizer(worlds, 10)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_LM, "vocab_size": len(tok)})).save_pretrained(
        weights / "vicuna-7b-v1.5")
    tok.save_pretrained(weights / "vicuna-7b-v1.5")
    vcfg = {k: v for k, v in TOY_CLIP.items() if k != "model_type"}
    CLIPVisionModel(CLIPVisionConfig(**vcfg)).save_pretrained(weights / "clip-vit-large-patch14-336")
    WhisperModel(WhisperConfig(**TOY_WHISPER)).save_pretrained(weights / "whisper-small")
    for name, (modality, kind) in SPEECH_FILES.items():
        export_unimoe_json([worlds.sample(modality, kind, i) for i in range(2)], data, name)
    monkeypatch.setenv("MMZOO_WEIGHTS", str(weights))
    monkeypatch.setenv("MMZOO_DATA", str(tmp_path / "data"))
    return tmp_path


def test_speech_4e_recipe_runs_at_toy_size(speech_env: Path):
    """Every stage of the GPU recipe (pretrained LM / CLIP / Whisper loading, Uni-MoE JSON, experts from stage 2) on
    toy-sized models, one step each on the CPU."""
    from transformers import WhisperModel

    from zoo.registry import load
    from zoo.train import train

    overrides = []
    for s in ("align", "expert_image", "expert_video", "expert_speech", "expert_audio", "moe"):
        overrides += [
            f"stages.{s}.model.lm={json.dumps(TINY_LM)}",
            f"stages.{s}.model.vision={json.dumps({'kind': 'hf', 'config': TOY_CLIP})}",
            f"stages.{s}.model.speech={json.dumps(dict(whisper=TOY_WHISPER, num_query_tokens=4, projector='linear'))}",
            f"stages.{s}.trainer={{max_steps: 1, accelerator: cpu, devices: 1, precision: 32-true, "
            f"enable_progress_bar: false}}",
            f"stages.{s}.batch_size=2",
            f"stages.{s}.num_workers=0",
        ]
    train(SPEECH_4E, overrides=overrides, runs_dir=speech_env / "runs")
    runs = speech_env / "runs" / "uni_moe_speech_4e"
    align = load(runs / "align" / "final")
    hf = WhisperModel.from_pretrained(speech_env / "weights" / "whisper-small")
    for k, v in hf.encoder.state_dict().items():  # loaded, and frozen in stage 1
        assert torch.equal(align.speech.encoder.state_dict()[k], v), k
    moe = load(runs / "moe" / "final")
    assert moe.moe_layers == [0, 1] and moe.cfg.uni_moe["num_experts"] == 4 and moe.cfg.lora["rank"] == 8
    assert moe.speech.cfg.num_query_tokens == 4
    expert = load(runs / "expert_speech" / "final")
    assert torch.equal(moe.llm.layers[1].mlp.experts.base.down_proj[2], expert.llm.layers[1].mlp.down_proj.weight)
