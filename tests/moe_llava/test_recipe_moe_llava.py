"""The recipes: the tiny one validates as the default of `make train`; the Phi-2 one runs end to end at toy size.

The full-scale Phi-2 recipe is exercised with overrides that swap in toy-sized LM / vision configs saved as local
Hugging Face checkpoints (a tiny Phi and a tiny CLIP vision model), toy LLaVA JSON files in the official data layout
and CPU trainer settings, so every code path of the GPU recipe (pretrained loading, -200 image ids, several JSON
files, text-only records, dense -> MoE upcycling) runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from zoo.moe import MoESettings
from zoo.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "moe_llava" / "shapes_tiny.yaml"
PHI2 = ROOT / "recipes" / "moe_llava" / "phi2_4e.yaml"


def test_tiny_recipe_is_the_make_train_default_and_validates():
    makefile = (ROOT / "Makefile").read_text()
    assert "RECIPE ?= recipes/moe_llava/shapes_tiny.yaml" in makefile
    r = load_recipe(TINY)
    names = [s.name for s in r.stages]
    assert names == ["align", "sft", "moe"]
    align, sft, moe = r.stages
    # Stage I starts from the shipped tower, as MoE-LLaVA starts from a released CLIP.
    assert align.init_source == ("weights", "clip_vit_tiny4.shapes")
    assert align.trainable == ["mm_projector.*", "llm.*"] and align.data.template == "plain" and align.data.kind == "caption"
    assert sft.trainable == ["mm_projector.*", "llm.*"] and sft.model.moe is None
    assert moe.model.moe.num_experts == 4 and moe.model.moe.top_k == 2
    assert moe.model.moe.aux_loss_coef == 0.01 and moe.trainable == ["llm.lm.model.layers.*.mlp.*"]
    for s in (sft, moe):
        assert set(s.eval.tasks) == {"shapes_vqa", "shapes_pope"}
        assert (s.data.extra_spatial, s.data.answer_prompt_turns) == (3, "all")
    # Stages I-III read that tower (its features cached: it is frozen), with the LM that `moe_llava_tiny` builds.
    from zoo.models.moe_llava import TINY_LM

    assert all(s.model.vision.model_name == "clip_vit_tiny4" for s in (align, sft, moe))
    assert all(s.model.lm == TINY_LM for s in (align, sft, moe))
    # the position code in the first 16 dimensions, in every stage (the projector learns it in stage I)
    assert all((s.model.image_pos_code, s.model.image_pos_code_dims) == (6.0, 16) for s in (align, sft, moe))
    assert (sft.optim.name, sft.optim.lr, sft.trainer.max_steps) == ("muon", 2e-3, 2500)
    assert align.optim.name == moe.optim.name == "adamw"
    assert all(s.model.cache_tower_features for s in (align, sft, moe))
    assert TINY_LM["rope_theta"] == 300.0 and moe.optim.lr == 5e-5


def test_tower_recipe_is_the_clip_recipe_with_four_blocks_and_the_patch_loss():
    """The shipped tower's recipe is the CLIP recipe's stage, except that its tower has a fourth block and it trains
    longer on the VQA world's 1-3 object scenes with the dense patch loss (so the penultimate patch tokens LLaVA reads
    carry shape), and scores zero-shot on single objects."""
    import zoo.weights_table  # noqa: F401
    from zoo.registry import get_weights_cfg

    clip = load_recipe(ROOT / "recipes" / "clip" / "shapes_tiny4_patch.yaml").stages[0]
    assert get_weights_cfg("clip_vit_tiny4.shapes").recipe.split("@")[0] == "recipes/clip/shapes_tiny4_patch.yaml"
    ref = load_recipe(ROOT / "recipes" / "clip" / "shapes_tiny.yaml").stages[0]
    for key in ("type", "optim", "schedule", "batch_size", "seed", "trainable"):
        assert getattr(clip, key) == getattr(ref, key), key
    assert dataclasses.replace(clip.model, architecture=ref.model.architecture) == ref.model
    assert (ref.model.architecture, clip.model.architecture) == ("clip_vit_tiny", "clip_vit_tiny4")
    assert dataclasses.replace(clip.trainer, max_steps=ref.trainer.max_steps) == ref.trainer
    assert (ref.trainer.max_steps, clip.trainer.max_steps) == (600, 1000)
    assert dataclasses.replace(clip.data, max_objects=1, num_train=4096, patch_loss=0.0) == ref.data
    assert (clip.data.max_objects, clip.data.patch_loss, clip.data.hard_negatives) == (3, 5.0, 0)
    assert dataclasses.replace(clip.eval, max_objects=None) == ref.eval and clip.eval.max_objects == 1


def test_phi2_recipe_has_the_papers_hyperparameters():
    r = load_recipe(PHI2)
    align, sft, moe = r.stages
    glob = lambda s: s.batch_size * s.trainer.devices * s.trainer.accumulate_grad_batches  # noqa: E731
    assert (align.optim.lr, glob(align)) == (1e-3, 256)
    assert (sft.optim.lr, glob(sft)) == (2e-5, 128)
    assert (moe.optim.lr, glob(moe)) == (2e-5, 128)
    assert all(s.optim.weight_decay == 0.0 and s.schedule.name == "cosine" for s in r.stages)
    assert all(s.trainer.max_epochs == 1 and s.trainer.precision == "bf16-mixed" for s in r.stages)
    assert align.data.template == "plain" and sft.model.template == "phi"
    assert moe.model.moe == MoESettings(num_experts=4, top_k=2, layers="sparse", capacity_factor=1.5,
                                        eval_capacity_factor=2.0, min_capacity=0, aux_loss_coef=0.01)
    assert align.trainable == ["mm_projector.*"] and sft.trainable == ["mm_projector.*", "llm.*"]


TOY_LM = {"model_type": "phi", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
          "num_attention_heads": 2, "num_key_value_heads": 2, "partial_rotary_factor": 0.5, "hidden_act": "gelu_new",
          "max_position_embeddings": 128, "tie_word_embeddings": False}
TOY_CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 16}


@pytest.fixture
def phi2_env(tmp_path: Path, monkeypatch) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    from zoo.tokenizers import build_tokenizer

    weights, data = tmp_path / "weights", tmp_path / "data" / "moe_llava"
    tok = build_tokenizer(["describe the image", "what is it", "a red circle", "hello there"])
    lm_cfg = AutoConfig.for_model(**{**TOY_LM, "vocab_size": len(tok)})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(lm_cfg).save_pretrained(weights / "phi-2")
    tok.save_pretrained(weights / "phi-2")
    vcfg = {k: v for k, v in TOY_CLIP.items() if k != "model_type"}
    CLIPVisionModel(CLIPVisionConfig(**vcfg)).save_pretrained(weights / "clip-vit-large-patch14-336")
    (data / "train_json").mkdir(parents=True)
    (data / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (80 * i, 0, 0)).save(data / "imgs" / f"{i}.png")
    img = lambda i, q, a: {"id": f"r{i}", "image": f"imgs/{i}.png", "conversations": [  # noqa: E731
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
    text = [{"id": "t0", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hello there"}]}]
    files = {"llava_image_.json": [img(i, "describe the image", "a red circle") for i in range(3)],
             "nlp_tune.json": text}
    for name in ("la_tune_256k.json", "lrv_tune_331k.json", "lvis_tune_220k_.json", "svit_tune_157k.json",
                 "llava_image_tune_.json"):
        files[name] = [img(i, "what is it", "a red circle") for i in range(3)]
    for name, records in files.items():
        (data / "train_json" / name).write_text(json.dumps(records))
    monkeypatch.setenv("MMZOO_WEIGHTS", str(weights))
    monkeypatch.setenv("MMZOO_DATA", str(tmp_path / "data"))
    return tmp_path


def test_phi2_recipe_runs_at_toy_size(phi2_env: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from zoo.registry import load
    from zoo.train import train

    overrides = []
    for s in ("align", "sft", "moe"):
        overrides += [
            f"stages.{s}.model.lm={json.dumps(TOY_LM)}",
            f"stages.{s}.model.vision={json.dumps({'kind': 'hf', 'config': TOY_CLIP})}",
            f"stages.{s}.trainer={{max_steps: 1, accelerator: cpu, devices: 1, precision: 32-true, "
            f"enable_progress_bar: false}}",
            f"stages.{s}.batch_size=2",
            f"stages.{s}.num_workers=0",
            f"stages.{s}.data.max_length=64",
        ]
    train(PHI2, overrides=overrides, runs_dir=phi2_env / "runs")
    runs = phi2_env / "runs" / "moe_llava_phi2_4e"
    # Stage I started from the pretrained Phi: its LM weights are the local checkpoint's.
    align = load_file(str(runs / "align" / "final" / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(phi2_env / "weights" / "phi-2").state_dict()
    assert all(torch.equal(align[f"llm.lm.{k}"], v) for k, v in hf.items())
    moe = load(runs / "moe" / "final")
    assert moe.moe_layers == [0, 2] and moe.image_token_id == -200
    cfg = json.loads((runs / "moe" / "final" / "config.json").read_text())
    assert cfg["architecture"] == "moe_llava_phi2_4e" and cfg["model_args"]["moe"]["num_experts"] == 4


@pytest.mark.slow
def test_tiny_recipe_end_to_end_meets_the_targets(tmp_path: Path):
    """`make train`: CLIP + stages I-III + eval; dense and MoE models both >= 85% ShapesVQA and ShapesPOPE F1."""
    from zoo.train import train

    rows = {r["stage"]: r for r in train(TINY, runs_dir=tmp_path)}
    for stage in ("sft", "moe"):
        m = rows[stage]["metrics"]
        assert m["shapes_vqa/accuracy"] >= 85, (stage, m)
        assert m["shapes_pope/f1"] >= 85, (stage, m)
    assert rows["moe"]["metrics"]["params_active_M"] < rows["moe"]["metrics"]["params_total_M"]
