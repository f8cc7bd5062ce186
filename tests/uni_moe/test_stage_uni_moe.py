"""The ``uni_moe`` stage type: sample encoding (answers supervised, media expanded), batching, stage 3's experts from
the stage-2 exports, and the errors for mismatched sources."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from unimoe_helpers import CLIP_VISION, LM, SPEECH

from data.shapes_av import AV_MODALITIES, AVWorlds
from data.unimoe import UniMoESample
from zoo.conversation import get_template
from zoo.stages.uni_moe import IGNORE_INDEX, UniMoEStage, collate_unimoe, encode_unimoe_sample
from zoo.stages.uni_moe_config import AVWorldSettings, UniMoEDataConfig, UniMoEEvalConfig, UniMoEModelConfig

WORLD = AVWorldSettings(image_size=32, num_frames=4)
MOE = dict(num_experts=2, top_k=1, layers="dense", expert_lora_rank=2, expert_lora_alpha=4.0, expert_lora_dropout=0.0)
LORA = dict(rank=2, alpha=4.0, dropout=0.0)


def _model_cfg(**kw) -> UniMoEModelConfig:
    base = dict(vision=dict(kind="hf", config=CLIP_VISION), lm=LM, speech=SPEECH, video_frames=4, vocab_world=WORLD,
                vocab_items=10)
    return UniMoEModelConfig(**{**base, **kw})


def _stage(tmp_path: Path, name: str, model_cfg: UniMoEModelConfig, init: bool = True) -> UniMoEStage:
    out = tmp_path / "runs" / name
    spec = SimpleNamespace(name=name, out_dir=out, run_dir=lambda: out, init_source=("stage", "x") if init else None)
    torch.manual_seed(len(name))
    data = UniMoEDataConfig(items_per_modality=2, world=WORLD)
    return UniMoEStage(model_cfg, data, UniMoEEvalConfig(), spec)


def _export(stage: UniMoEStage, tmp_path: Path) -> Path:
    return stage.export(tmp_path / "runs" / stage.stage.name / "final").parent


@pytest.fixture(scope="module")
def dense_stage(tmp_path_factory) -> UniMoEStage:
    torch.set_num_threads(1)
    return _stage(tmp_path_factory.mktemp("dense"), "align", _model_cfg(), init=False)


def test_encoding_supervises_answers_only_and_expands_every_placeholder(dense_stage):
    model = dense_stage.model
    tmpl = get_template(model.cfg.template)
    sample = AVWorlds(image_size=32, num_frames=4).sample("speech", "instruction", 0)
    enc = encode_unimoe_sample(model, tmpl, sample, max_length=512)
    ids, labels = torch.tensor(enc["input_ids"]), torch.tensor(enc["labels"])
    image, audio = model.modalities["image"], model.modalities["audio"]
    assert int((ids == image.token_id).sum()) == image.tokens_per_item
    assert int((ids == audio.token_id).sum()) == audio.tokens_per_item
    supervised = ids[labels != IGNORE_INDEX].tolist()
    answer = model.tokenizer(sample.conversations[1]["value"], add_special_tokens=False).input_ids
    assert supervised[: len(answer)] == answer and len(supervised) <= len(answer) + 2  # answer + end of turn
    assert set(enc["media"]) == {"pixel_values", "speech_features"}
    assert enc["media"]["speech_features"][0].shape[-2:] == (80, 3000)


def test_encoding_errors_name_the_sample_and_field(dense_stage):
    model, tmpl = dense_stage.model, get_template(dense_stage.model.cfg.template)
    sample = AVWorlds(image_size=32, num_frames=4).sample("image", "instruction", 0)
    bad = UniMoESample(id="s7", conversations=[{"from": "human", "value": "what is it?"}, sample.conversations[1]],
                       image=sample.image)
    with pytest.raises(ValueError, match=r"sample 's7': field 'image' has 1 item\(s\) but .* 0 <image>"):
        encode_unimoe_sample(model, tmpl, bad, 512)
    with pytest.raises(ValueError, match=r"sample '.*': field 'conversations' is \d+ tokens .* data.max_length=8"):
        encode_unimoe_sample(model, tmpl, sample, 8)


def test_collate_stacks_each_modality_in_row_order_and_the_loss_runs(dense_stage):
    ds = dense_stage.train_dataset()
    assert len(ds) == 2 * len(AV_MODALITIES)
    items = [ds[i] for i in range(len(ds))]
    batch = collate_unimoe(items, 0)
    assert batch["media"]["video_values"].shape == (2, 4, 3, 32, 32)
    assert batch["media"]["speech_features"].shape[0] == 4  # sound QA and spoken questions
    # Row order: the rows holding images are the image and speech samples, in that order.
    rows = [i for i, it in enumerate(items) if "pixel_values" in it["media"]]
    stacked = torch.cat([items[i]["media"]["pixel_values"][0][None] for i in rows])
    assert torch.equal(batch["media"]["pixel_values"], stacked)
    assert batch["attention_mask"].sum(1).tolist() == [len(it["input_ids"]) for it in items]
    loss, logs = dense_stage.compute_loss(batch)
    assert torch.isfinite(loss) and float(logs["lm_loss"]) > 0


def test_stage3_experts_start_from_the_stage2_ffns(tmp_path: Path):
    align = _stage(tmp_path, "align", _model_cfg(), init=False)
    _export(align, tmp_path)
    sources = []
    for e, name in enumerate(["expert_a", "expert_b"]):
        s2 = _stage(tmp_path, name, _model_cfg())
        s2.init_from(tmp_path / "runs" / "align" / "final")
        with torch.no_grad():  # what stage-2 training does: change the FFNs only, differently per modality
            for layer in s2.model.llm.layers:
                for p in layer.mlp.parameters():
                    p.add_(0.1 * (e + 1))
        _export(s2, tmp_path)
        sources.append(s2)
    s3 = _stage(tmp_path, "moe", _model_cfg(uni_moe=MOE, lora=LORA, expert_sources=["expert_a", "expert_b"]))
    s3.init_from(tmp_path / "runs" / "align" / "final")
    model = s3.model
    for i, layer in enumerate(model.llm.layers):
        base = layer.mlp.experts.base
        h = base.hidden
        for e, src in enumerate(sources):
            ffn = src.model.llm.layers[i].mlp
            assert torch.equal(base.gate_up_proj[e, :h], ffn.gate_proj.weight)
            assert torch.equal(base.gate_up_proj[e, h:], ffn.up_proj.weight)
            assert torch.equal(base.down_proj[e], ffn.down_proj.weight)
        # Everything else comes from init_from (stage 1), LoRA B from zero so the model starts as its experts.
        assert torch.equal(layer.self_attn.q_proj.base.weight, align.model.llm.layers[i].self_attn.q_proj.weight)
        assert not layer.self_attn.q_proj.lora_B.weight.any()
    # Without expert_sources every expert is a copy of init_from's FFN.
    copies = _stage(tmp_path, "moe_copies", _model_cfg(uni_moe=MOE, lora=LORA))
    copies.init_from(tmp_path / "runs" / "align" / "final")
    base = copies.model.llm.layers[0].mlp.experts.base
    assert torch.equal(base.down_proj[0], base.down_proj[1])
    assert torch.equal(base.down_proj[0], align.model.llm.layers[0].mlp.down_proj.weight)


def test_stage3_source_errors(tmp_path: Path):
    align = _stage(tmp_path, "align", _model_cfg(), init=False)
    _export(align, tmp_path)
    missing = _stage(tmp_path, "moe", _model_cfg(uni_moe=MOE, lora=LORA, expert_sources=["align", "expert_x"]))
    with pytest.raises(FileNotFoundError, match="takes expert 1 from stage 'expert_x', which has no export"):
        missing.init_from(tmp_path / "runs" / "align" / "final")
    other_vocab = _stage(tmp_path, "other", _model_cfg(vocab_items=3))
    with pytest.raises(ValueError, match="its tokenizer differs from this stage's"):
        other_vocab.init_from(tmp_path / "runs" / "align" / "final")
    moe = _stage(tmp_path, "moe2", _model_cfg(uni_moe=MOE, lora=LORA))
    moe.init_from(tmp_path / "runs" / "align" / "final")
    _export(moe, tmp_path)
    dense = _stage(tmp_path, "dense", _model_cfg())
    with pytest.raises(ValueError, match="holds an MoE model but this stage builds a dense one"):
        dense.init_from(tmp_path / "runs" / "moe2" / "final")
    cfg = json.loads((tmp_path / "runs" / "moe2" / "final" / "config.json").read_text())
    assert cfg["model_args"]["uni_moe"]["num_experts"] == 2 and cfg["stage_type"] == "uni_moe"


def test_unimoe_json_data_is_checked_before_training(tmp_path: Path):
    from data.unimoe import export_unimoe_json

    worlds = AVWorlds(image_size=32, num_frames=4)
    path = export_unimoe_json([worlds.sample(m, "instruction", 0) for m in AV_MODALITIES], tmp_path, "mix")
    records = json.loads(path.read_text())
    records.append({"id": "bad", "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                                   {"from": "gpt", "value": "red"}]})  # no image field
    path.write_text(json.dumps(records))

    def stage(**data) -> UniMoEStage:
        out = tmp_path / "runs" / "s"
        spec = SimpleNamespace(name="s", out_dir=out, run_dir=lambda: out, init_source=("stage", "x"))
        return UniMoEStage(_model_cfg(), UniMoEDataConfig(source="unimoe_json", json_paths=[str(path)], **data),
                           UniMoEEvalConfig(), spec)

    with pytest.raises(Exception, match=r"mix\.json.*bad.*image"):
        stage().train_dataset()
    s = stage(on_error="skip")
    ds = s.train_dataset()
    assert len(ds) == 4 and s.skipped_samples() == {"bad record": 1}
    item = ds[1]  # the video sample, media prepared on access
    assert item["media"]["video_values"][0].shape == (4, 3, 32, 32)
    short = stage(on_error="skip", max_length=60)
    n = len(short.train_dataset())
    assert n < 4 and short.skipped_samples() == {"bad record": 1, "unencodable": 4 - n}
    # Over-long samples raise (once the bad record is gone), naming the file and the sample.
    path.write_text(json.dumps([r for r in records if r["id"] != "bad"]))
    with pytest.raises(ValueError, match=r"mix\.json: sample '.*': field 'conversations' is \d+ tokens"):
        stage(max_length=8).train_dataset()


def _text_logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    image = model.modalities["image"]
    ids = [image.token_id] * image.tokens_per_item + model.tokenizer("what color is the circle ?",
                                                                      add_special_tokens=False).input_ids
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixel_values)[1]


def test_dense_baseline_widens_the_ffns_and_starts_as_its_source(tmp_path: Path):
    align = _stage(tmp_path, "align", _model_cfg(), init=False)
    _export(align, tmp_path)
    dense = _stage(tmp_path, "dense", _model_cfg(widen_ffn=2, lora=LORA))
    h = LM["intermediate_size"]
    assert dense.model.llm.layers[0].mlp.down_proj.weight.shape == (LM["hidden_size"], 2 * h)
    dense.init_from(tmp_path / "runs" / "align" / "final")
    for src, own in zip(align.model.llm.layers, dense.model.llm.layers):
        assert torch.equal(own.mlp.gate_proj.weight[:h], src.mlp.gate_proj.weight)
        assert torch.equal(own.mlp.up_proj.weight[:h], src.mlp.up_proj.weight)
        assert torch.equal(own.mlp.down_proj.weight[:, :h], src.mlp.down_proj.weight)
        # New units: random inputs (not copies: copies would get identical gradients), zero outputs.
        assert own.mlp.gate_proj.weight[h:].std() > 0 and not torch.equal(own.mlp.gate_proj.weight[h:],
                                                                          src.mlp.gate_proj.weight)
        assert not own.mlp.down_proj.weight[:, h:].any()
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_text_logits(dense.model, pixels), _text_logits(align.model, pixels))
    with pytest.raises(ValueError, match="widen_ffn builds a dense baseline"):
        _model_cfg(widen_ffn=2, uni_moe=MOE)


def test_init_other_vision_lm_takes_projector_and_lm_matched_by_word(tmp_path: Path):
    """A LLaVA-like model with MoE layers and another vocabulary gives the first stage its tower, projector and LM:
    token rows by word, each MoE layer's FFN as the mean of its experts."""
    from zoo.moe import MoE
    from zoo.registry import create_model, save_pretrained
    from zoo.tokenizers import build_tokenizer, tokenizer_to_json

    torch.manual_seed(3)
    words = build_tokenizer(["what color is the circle ? zebra"])  # 'zebra': a word the Uni-MoE vocabulary lacks
    src = create_model("moe_llava_custom", vision=dict(kind="hf", config=CLIP_VISION), lm=LM, template="phi",
                       tokenizer={"kind": "word_level", "json": tokenizer_to_json(words)},
                       moe=dict(num_experts=2, top_k=1, layers="sparse"))
    with torch.no_grad():  # experts that differ, so the mean is not any one of them
        for layer in src.llm.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.experts.down_proj.add_(torch.randn_like(layer.mlp.experts.down_proj))
    save_pretrained(src, tmp_path / "src", "moe_llava_custom", src.model_args)
    stage = _stage(tmp_path, "align", _model_cfg(init_other="vision_lm"), init=False)
    own = stage.model
    fresh = own.llm.lm.lm_head.weight.detach().clone()
    stage.init_from(tmp_path / "src")
    assert torch.equal(own.mm_projector[0].weight, src.mm_projector[0].weight)
    s_vocab, o_vocab = src.tokenizer.get_vocab(), own.tokenizer.get_vocab()
    for w in ("color", "circle", "?"):
        assert torch.equal(own.llm.lm.model.embed_tokens.weight[o_vocab[w]],
                           src.llm.lm.model.embed_tokens.weight[s_vocab[w]])
        assert torch.equal(own.llm.lm.lm_head.weight[o_vocab[w]], src.llm.lm.lm_head.weight[s_vocab[w]])
    only_own = next(w for w in o_vocab if w not in s_vocab)
    assert torch.equal(own.llm.lm.lm_head.weight[o_vocab[only_own]], fresh[o_vocab[only_own]])
    experts = src.llm.layers[0].mlp.experts
    h = experts.hidden
    torch.testing.assert_close(own.llm.layers[0].mlp.gate_proj.weight, experts.gate_up_proj[:, :h].mean(0))
    torch.testing.assert_close(own.llm.layers[0].mlp.down_proj.weight, experts.down_proj.mean(0))
    assert torch.equal(own.llm.layers[1].mlp.down_proj.weight, src.llm.layers[1].mlp.down_proj.weight)
    assert torch.equal(own.llm.layers[1].self_attn.q_proj.weight, src.llm.layers[1].self_attn.q_proj.weight)
    # Without vision_lm only the tower comes over.
    tower_only = _stage(tmp_path, "align2", _model_cfg(), init=False)
    tower_only.init_from(tmp_path / "src")
    assert not torch.equal(tower_only.model.mm_projector[0].weight, src.mm_projector[0].weight)
