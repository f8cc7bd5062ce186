"""Uni-MoE model: every modality path, MoE routing against an independent reference, LoRA experts and attention
LoRA (trainable sets, exact merge), specialised experts, routing statistics per modality, generate with mixed media,
save / load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from unimoe_helpers import AUDIO, SPEECH, randomise_lora, small

from zoo.components.lora import LoRALinear
from zoo.models.uni_moe import UniMoESettings
from zoo.moe import MoE, MoEConfig
from zoo.moe.layer import ExpertLoRAExperts, Experts
from zoo.registry import load, save_pretrained


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _ids(model, pieces: list) -> torch.Tensor:
    """A row of ids from text pieces and modality names (each expanded to its positions)."""
    out: list[int] = []
    for p in pieces:
        if p in model.modalities:
            m = model.modalities[p]
            out += [m.token_id] * m.tokens_per_item
        else:
            out += model.tokenizer(p, add_special_tokens=False).input_ids
    return torch.tensor([out])


def _inputs(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = _ids(model, ["image", "what color", "video", "is", "audio", "sound", "the circle ?"])
    return dict(
        input_ids=ids,
        pixel_values=torch.rand(1, 3, 32, 32, generator=g),
        video_values=torch.rand(1, 3, 3, 32, 32, generator=g),
        speech_features=torch.randn(1, 2, 80, 3000, generator=g),
        audio_fbank=torch.randn(1, 96, 128, generator=g),
    )


@pytest.fixture(scope="module")
def model():
    return small()


def test_every_modality_fills_its_positions_and_changes_the_logits(model):
    x = _inputs(model)
    assert {m: model.modalities[m].tokens_per_item for m in model.modalities} == {
        "image": 16, "video": 16, "audio": 2 * SPEECH["num_query_tokens"], "sound": 3}
    with torch.no_grad():
        _, logits, _ = model(**x)
        for key in ("pixel_values", "video_values", "speech_features", "audio_fbank"):
            other = dict(x)
            other[key] = x[key] + 0.5
            _, changed, _ = model(**other)
            assert (changed - logits).abs().max() > 1e-4, key


def test_video_is_the_mean_over_frames_of_the_image_path(model):
    frames = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        video = model.encode_videos(frames)
        per_frame = torch.stack([model.encode_images(frames[:, t]) for t in range(3)], dim=1).mean(dim=1)
    torch.testing.assert_close(video, per_frame, rtol=1e-5, atol=1e-6)


def test_speech_chunks_are_aligned_one_by_one_and_concatenated(model):
    feats = torch.randn(2, 2, 80, 3000, generator=torch.Generator().manual_seed(4))
    sp = model.speech
    with torch.no_grad():
        both = sp(feats)
        one = torch.cat([sp.projector(sp.align(sp.encoder(feats[:, c]).last_hidden_state)) for c in range(2)], dim=1)
    assert both.shape == (2, 2 * SPEECH["num_query_tokens"], 32)
    torch.testing.assert_close(both, one, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_chunks=2"):
        sp(feats[:, :1])


def test_aligner_queries_read_positions_and_attend_causally(model):
    """The Whisper decoder adds its learned positions to the queries and keeps causal self-attention (released
    behaviour): the first query's output does not depend on later queries; equal queries give different outputs."""
    sp = model.speech
    enc = torch.randn(1, 1500, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        q = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(6))
        sp.query_tokens.copy_(q)
        a = sp.align(enc)
        sp.query_tokens[:, 1:] += torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(7))
        b = sp.align(enc)
        torch.testing.assert_close(a[:, 0], b[:, 0])
        assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-3
        sp.query_tokens.zero_()
        c = sp.align(enc)
    assert (c[:, 0] - c[:, 1]).abs().max() > 1e-4


def test_trainable_sets_of_a_lora_stage_model(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("speech.encoder.", "audio_encoder.")) for n in trainable)  # frozen encoders
    base = [n for n in trainable if ".experts.base." in n or ".base.weight" in n]
    assert base == []  # frozen FFNs under the expert LoRA and frozen attention weights under attention LoRA
    assert {n.split(".")[-1] for n in trainable if n.startswith("llm.") and ".mlp." in n} == {
        "weight", "lora_A_gate", "lora_B_gate", "lora_A_up", "lora_B_up", "lora_A_down", "lora_B_down"}
    routers = [n for n in trainable if n.endswith("mlp.router.weight")]
    assert len(routers) == 2
    assert len(model.lora_modules) == 2 * 4


def _reference_mixtral_ffn(x: torch.Tensor, moe: MoE) -> torch.Tensor:
    """Uni-MoE v1's MoE layer written out: logits of every expert, top-2, softmax over the two chosen logits, each
    chosen expert = its own SwiGLU FFN with W + (alpha/r) B A on each projection; weighted sum."""
    ex = moe.experts
    h = ex.base.hidden
    logits = x.float() @ moe.router.weight.t().float()
    top, idx = logits.topk(2, dim=-1)
    w = top.softmax(dim=-1).to(x.dtype)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(2):
            e = int(idx[t, j])
            wg = ex.base.gate_up_proj[e, :h] + ex.scale * ex.lora_B_gate[e] @ ex.lora_A_gate[e]
            wu = ex.base.gate_up_proj[e, h:] + ex.scale * ex.lora_B_up[e] @ ex.lora_A_up[e]
            wd = ex.base.down_proj[e] + ex.scale * ex.lora_B_down[e] @ ex.lora_A_down[e]
            out[t] += w[t, j] * (wd @ (F.silu(wg @ x[t]) * (wu @ x[t])))
    return out


def test_mixtral_routing_with_lora_experts_matches_the_reference():
    settings = UniMoESettings(expert_lora_rank=3, expert_lora_alpha=6.0, expert_lora_dropout=0.0)
    torch.manual_seed(0)
    moe = MoE(settings.moe_config(8, 12, "swiglu", "silu")).double().eval()
    with torch.no_grad():
        for p in moe.experts.base.parameters():
            p.normal_()
    randomise_lora(moe, std=0.3)
    x = torch.randn(9, 8, dtype=torch.float64)
    # experts run in float64; the router is fp32 by design (official too), hence ~1e-7 relative in the weights
    torch.testing.assert_close(moe(x), _reference_mixtral_ffn(x, moe), rtol=1e-5, atol=1e-5)
    assert moe.aux_loss is None and moe.cfg.capacity_factor is None


def test_deepspeed_top2_variant_balance_loss_and_capacity():
    settings = UniMoESettings(num_experts=4, router="deepspeed_top2", aux_loss_coef=0.01, capacity_factor=1.0,
                              eval_capacity_factor=1.0, expert_lora_rank=0)
    cfg = settings.moe_config(8, 12, "swiglu", "silu")
    assert (cfg.balance_loss, cfg.capacity_factor, cfg.normalize_top_k) == ("top1", 1.0, True)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    x = torch.randn(16, 8)
    moe(x)
    probs = (x @ moe.router.weight.t()).softmax(-1)
    first = probs.argmax(-1)
    f = torch.bincount(first, minlength=4).float() / 16
    torch.testing.assert_close(moe.aux_loss, 0.01 * 4 * (f * probs.mean(0)).sum())
    assert int(moe.last_stats.expert_load.max()) <= 8  # capacity = ceil(16 / 4 * 1.0 * 2)
    with pytest.raises(ValueError, match="deepspeed_top2"):
        UniMoESettings(capacity_factor=1.0)


def test_merge_lora_is_exact_and_survives_save_load(tmp_path):
    model = small().double()
    randomise_lora(model)
    x = _inputs(model)
    x = {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}
    with torch.no_grad():
        _, before, _ = model(**x)
    model.merge_lora()
    assert not any(isinstance(m, (LoRALinear, ExpertLoRAExperts)) for m in model.modules())
    assert all(isinstance(m.experts, Experts) for _, m in model.moe_layer_modules())
    with torch.no_grad():
        _, after, _ = model(**x)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    assert model.cfg.lora is None and model.cfg.uni_moe["expert_lora_rank"] == 0
    out = save_pretrained(model.float(), tmp_path / "merged", model.architecture, model.model_args)
    loaded = load(out)
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_stage2_ffns_become_specialised_experts():
    dense = small(uni_moe=None, lora=None)
    donors = []
    for seed in range(4):
        d = small(uni_moe=None, lora=None)
        with torch.no_grad():
            for layer in d.llm.layers:
                for p in layer.mlp.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
        donors.append([layer.mlp for layer in d.llm.layers])
    dense.enable_moe(dict(expert_lora_rank=2, expert_lora_alpha=4.0), expert_ffns=donors)
    for i, moe in dense.moe_layer_modules():
        base = moe.experts.base
        h = base.hidden
        for e in range(4):
            torch.testing.assert_close(base.gate_up_proj[e, :h], donors[e][i].gate_proj.weight)
            torch.testing.assert_close(base.down_proj[e], donors[e][i].down_proj.weight)
        assert not torch.equal(base.down_proj[0], base.down_proj[1])
    assert dense.cfg.uni_moe["expert_lora_rank"] == 2


def test_identical_experts_reproduce_the_dense_model():
    dense = small(uni_moe=None, lora=None)
    x = _inputs(dense)
    with torch.no_grad():
        _, ref, _ = dense(**x)
        dense.enable_moe(dict(expert_lora_rank=2, expert_lora_alpha=4.0))
        dense.enable_lora(dict(rank=2, alpha=4.0))
        dense.eval()
        _, moe_logits, _ = dense(**x)
    torch.testing.assert_close(moe_logits, ref, rtol=1e-4, atol=1e-5)


def test_routing_statistics_per_modality(model):
    x = _inputs(model)
    with torch.no_grad():
        model(**x)
    stats = model.routing_by_modality(x["input_ids"])
    assert set(stats) == {"text", "image", "video", "audio", "sound"}
    for share in stats.values():
        assert share.shape == (2, 4)
        torch.testing.assert_close(share.sum(-1), torch.ones(2))


def test_generate_with_any_mix_of_media(model):
    rng = np.random.default_rng(0)
    sound = rng.standard_normal(16000).astype(np.float32) * 0.1
    out = model.generate(
        [_image(0), None, None],
        ["what color ?", "<video>\nwhat <audio> moves ?", "what <sound> is it ?"],
        media={"video": [None, [[_image(1)] * 3], None], "audio": [None, sound, None], "sound": [None, None, sound]},
        max_new_tokens=2,
    )
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    with pytest.raises(ValueError, match="video_frames=3"):
        model.generate([None], ["<video> ?"], media={"video": [[[_image(1)] * 2]]}, max_new_tokens=1)


def test_audio_front_end_lengths(model):
    from zoo.components.audio import beats_fbank, whisper_chunks

    assert beats_fbank(torch.zeros(480_000)).shape == (2998, 128)  # reference 1.1: 30 s -> 2998 frames
    assert model.audio_encoder.num_tokens(2998) == 1496
    assert model._audio_to_tensor(np.zeros(8000, np.float32)).shape == (int(AUDIO["seconds"] * 100) - 2, 128)
    assert whisper_chunks(np.zeros(16000 * 45, np.float32), 2).shape == (2, 80, 3000)
    with pytest.raises(ValueError, match="max_chunks=1"):
        whisper_chunks(np.zeros(16000 * 45, np.float32), 1)


def test_the_av_benchmarks_run_on_the_model(tmp_path):
    """The eval runner's media keys (image, video, audio) are the model's modality names: an untrained model runs
    ShapesVideoQA, ShapesAudioQA and spoken-question VQA end to end (scores are not the point here)."""
    from dataclasses import replace

    import eval
    from data.video import VideoConfig
    from eval.registry import get_task

    model = small(video_frames=VideoConfig().num_frames, audio=None, speech={**SPEECH, "max_chunks": 1})
    tasks = [replace(get_task("shapes_video_qa"), reader_args={"num_clips": 1, "seed": 0}, examples=0),
             replace(get_task("shapes_audio_qa"), reader_args={"num_clips": 1, "seed": 0}, examples=0),
             replace(get_task("shapes_speech_vqa"), reader_args={"num_scenes": 1, "seed": 0}, examples=0)]
    results = eval.run(model, tasks, limit=2, batch_size=2, progress=False)
    assert set(results["results"]) == {"shapes_video_qa", "shapes_audio_qa", "shapes_speech_vqa"}
    for entry in results["results"].values():
        assert any(k.startswith("accuracy") and 0.0 <= v <= 100.0 for k, v in entry.items()
                   if isinstance(v, float))


def test_expert_lora_dropout_acts_in_training_only():
    cfg = UniMoESettings(expert_lora_rank=2, expert_lora_alpha=4.0, expert_lora_dropout=0.5).moe_config(
        8, 12, "swiglu", "silu")
    torch.manual_seed(0)
    moe = MoE(cfg)
    randomise_lora(moe)
    x = torch.randn(6, 8)
    moe.eval()
    a, b = moe(x), moe(x)
    torch.testing.assert_close(a, b)
    moe.train()
    assert (moe(x) - a).abs().max() > 1e-4
    with pytest.raises(ValueError, match="lora_dropout"):
        MoE(MoEConfig(hidden_size=8, expert_hidden_size=12, lora_rank=2, lora_dropout=0.1))  # shared base: no dropout


def test_whisper_window_is_a_config_field():
    """The tiny model's Whisper window is 8 s (800 log-Mel frames): the clip's frames are those of the 30-s window,
    minus the padding; the full-scale settings keep Whisper's 30 s; window and encoder positions must agree."""
    from zoo.components.audio import WhisperSpeechConfig, WhisperSpeechConnector, whisper_chunks
    from zoo.models.uni_moe import SPEECH_PAPER, TINY_WHISPER, uni_moe_tiny

    t = np.arange(16000 * 7) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    short, full = whisper_chunks(clip, 1, chunk_seconds=8), whisper_chunks(clip, 1)
    assert short.shape == (1, 80, 800) and full.shape == (1, 80, 3000)
    torch.testing.assert_close(short[..., :690], full[..., :690], atol=1e-5, rtol=0)  # away from the end padding
    with pytest.raises(ValueError, match="2 8-s chunks"):
        whisper_chunks(np.zeros(16000 * 9, np.float32), 1, chunk_seconds=8)

    tiny = uni_moe_tiny(uni_moe=None, lora=None)
    assert tiny.speech.cfg.chunk_seconds == 8 and tiny.speech.frames == 800
    feats = tiny._speech_to_tensor(clip)
    assert feats.shape == (1, 80, 800)
    assert tiny.speech(feats.unsqueeze(0)).shape == (1, tiny.speech.cfg.num_query_tokens, tiny.llm.hidden_size)
    with pytest.raises(ValueError, match=r"80, 800\]"):
        tiny.speech(whisper_chunks(clip, 1).unsqueeze(0))

    paper = WhisperSpeechConfig(**SPEECH_PAPER)
    assert paper.chunk_seconds == 30 and paper.whisper["max_source_positions"] == 1500
    with pytest.raises(ValueError, match="max_source_positions = 50 \\* chunk_seconds"):
        WhisperSpeechConnector(WhisperSpeechConfig(whisper=TINY_WHISPER, chunk_seconds=30), 16)


def test_video_pooling_mean_ignores_frame_order_frames_keeps_it():
    """The paper's mean over frames gives a clip and its time reversal the same tokens (recipes/uni_moe/
    video_bound.py); ``video_pooling: frames`` keeps each frame, its patch grid average-pooled."""
    g = torch.Generator().manual_seed(5)
    video = torch.randn(2, 3, 3, 32, 32, generator=g)
    mean = small(uni_moe=None, lora=None)
    assert mean.modalities["video"].tokens_per_item == mean.num_image_tokens
    torch.testing.assert_close(mean.encode_videos(video), mean.encode_videos(video.flip(1)))
    frames = small(uni_moe=None, lora=None, video_pooling="frames", video_frame_pool=2)
    side = int(frames.num_image_tokens ** 0.5)
    per_frame_tokens = (side // 2) ** 2
    assert frames.modalities["video"].tokens_per_item == 3 * per_frame_tokens
    out = frames.encode_videos(video)
    assert out.shape == (2, 3 * per_frame_tokens, frames.llm.hidden_size)
    patches = frames.encode_images(video[:, 1])  # frame 1 of each clip, [2, side*side, D]
    top_left = patches[:, [0, 1, side, side + 1]].mean(1)  # the first 2x2 block of the patch grid
    torch.testing.assert_close(out[:, per_frame_tokens], top_left)
    assert not torch.allclose(out, frames.encode_videos(video.flip(1)))
    with pytest.raises(ValueError, match="video_pooling='sum' is unknown"):
        small(uni_moe=None, lora=None, video_pooling="sum")


def test_video_time_and_image_position_codes_add_where_and_when_without_new_weights():
    from zoo.components.position_code import grid_position_code

    g = torch.Generator().manual_seed(6)
    video = torch.randn(2, 3, 3, 32, 32, generator=g)
    base = dict(uni_moe=None, lora=None, video_pooling="frames", video_frame_pool=2)
    torch.manual_seed(0)
    plain = small(**base)
    torch.manual_seed(0)
    coded = small(**base, video_time_code=3.0, image_pos_code=2.0)
    assert set(coded.state_dict()) == set(plain.state_dict())  # both codes are rebuilt, never stored
    coded.load_state_dict(plain.state_dict())
    side = int(plain.num_image_tokens ** 0.5)
    per_frame = (side // 2) ** 2
    d = plain.llm.hidden_size
    space = grid_position_code((side, side), d, 2.0)  # added to each frame's patches, then pooled 2x2
    pooled_space = torch.nn.functional.avg_pool2d(space.T.reshape(1, d, side, side), 2).flatten(2)[0].T
    time = grid_position_code((3,), d, 3.0)
    want = plain.encode_videos(video).reshape(2, 3, per_frame, d) + pooled_space + time[:, None, :]
    torch.testing.assert_close(coded.encode_videos(video), want.reshape(2, 3 * per_frame, d))
    with pytest.raises(ValueError, match="video_time_code needs video_pooling: frames"):
        small(uni_moe=None, lora=None, video_time_code=1.0)


def test_whisper_encoder_trains_only_when_its_parameters_are_trainable():
    from zoo.components.audio import WhisperSpeechConfig, WhisperSpeechConnector
    from zoo.models.uni_moe import TINY_SPEECH

    conn = WhisperSpeechConnector(WhisperSpeechConfig(**TINY_SPEECH), 16)
    feats = torch.randn(1, 1, 80, 800, generator=torch.Generator().manual_seed(0))
    conn(feats).sum().backward()
    assert conn.encoder.conv1.weight.grad is None and conn.query_tokens.grad is not None  # frozen, as the paper
    conn.encoder.requires_grad_(True)  # what a recipe's trainable glob speech.encoder.* does
    conn(feats).sum().backward()
    assert conn.encoder.conv1.weight.grad is not None and conn.encoder.conv1.weight.grad.abs().sum() > 0
