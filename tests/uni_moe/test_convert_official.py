"""Official Uni-MoE layouts (v1 with its PEFT adapter and side files; the 8-expert DeepSpeed layout with rank expert
files and expert LoRA) load strictly, and the loaded model's logits equal an independent reference forward written
here from the official tensors (LLaMA decoder, Mixtral-style top-2 over separate experts, LoRA folded by hand)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from unimoe_helpers import CLIP_VISION, WHISPER

from zoo.checkpoint import CheckpointMismatchError
from zoo.convert import detect_format, get_converter
from zoo.convert.uni_moe import load_uni_moe_8e, load_uni_moe_v1
from zoo.moe.layer import ExpertLoRAExperts
from zoo.registry import load

D, H, LAYERS, HEADS, VOCAB, R, ALPHA, Q = 32, 48, 2, 4, 40, 2, 4.0, 4
PROJS = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _rand(g: torch.Generator, *shape: int, std: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def _proj_shape(p: str) -> tuple[int, int]:
    return (D, H) if p == "down_proj" else (H, D)


def _base_lm(g: torch.Generator, experts: int, v1_experts: bool) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": _rand(g, VOCAB, D, std=1.0), "model.norm.weight": 1 + _rand(g, D),
          "lm_head.weight": _rand(g, VOCAB, D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for a in ATTN:
            sd[p + f"self_attn.{a}.weight"] = _rand(g, D, D)
        sd[p + "self_attn.rotary_emb.inv_freq"] = torch.ones(D // HEADS // 2)  # recomputed by the forward; dropped
        sd[p + "input_layernorm.weight"] = 1 + _rand(g, D)
        sd[p + "post_attention_layernorm.weight"] = 1 + _rand(g, D)
        if v1_experts:
            sd[p + "mlp.gate.weight"] = _rand(g, experts, D)  # overridden by mlp_gates.bin
            for e in range(experts):
                for q in PROJS:
                    sd[p + f"mlp.experts.{e}.{q}.weight"] = _rand(g, *_proj_shape(q))
    return sd


def _towers(g: torch.Generator) -> dict[str, torch.Tensor]:
    from transformers import CLIPVisionConfig, CLIPVisionModel, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(int(torch.randint(0, 1000, (1,), generator=g)))
    vis = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in CLIP_VISION.items() if k != "model_type"}))
    enc = WhisperEncoder(WhisperConfig(**WHISPER))
    sd = {f"model.vision_tower.vision_tower.{k}": v for k, v in vis.state_dict().items()}
    sd.update({f"model.audio_tower.audio_tower.{k}": v for k, v in enc.state_dict().items()})
    sd["model.audio_tower.encoder.conv1.weight"] = torch.zeros(3)  # the unused random WhisperModel copy
    sd["model.mm_projector.0.weight"] = torch.zeros(D, 32)  # stale: non_lora_trainables.bin overrides it
    return sd


def _aligner(g: torch.Generator) -> dict[str, torch.Tensor]:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperDecoder

    dec = WhisperDecoder(WhisperConfig(**WHISPER))
    sd = {f"model.mm_audio_aligner.decoder.audio_decoder.{k}": v for k, v in dec.state_dict().items()}
    sd["model.mm_audio_aligner.projector.weight"] = _rand(g, D, 16)
    sd["model.mm_audio_aligner.projector.bias"] = _rand(g, D)
    sd["model.query_tokens"] = _rand(g, 1, Q, 16)
    return sd


def _config(experts: int, **extra) -> dict:
    return dict(model_type="llava", hidden_size=D, intermediate_size=H, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, rms_norm_eps=1e-6, rope_theta=10000.0,
                max_position_embeddings=256, vocab_size=VOCAB, moe=True, num_experts=experts, num_experts_per_tok=2,
                mm_vision_tower="/path/to/clip", mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                query_tokens_size=Q, **extra)


def _write_common(root: Path, g: torch.Generator, experts: int, v1_experts: bool, adapter_targets: list[str],
                  cfg_extra: dict) -> tuple[Path, Path, dict, dict]:
    base, src = root / "base", root / "e2"
    base.mkdir()
    src.mkdir()
    base_sd = {**_base_lm(g, experts, v1_experts), **_towers(g)}
    torch.save(base_sd, base / "pytorch_model.bin")
    (base / "config.json").write_text(json.dumps(_config(experts, **cfg_extra)))
    (src / "config.json").write_text(json.dumps(_config(experts, **cfg_extra)))
    side = {"base_model.model.model.mm_projector.0.weight": _rand(g, D, 32),
            "base_model.model.model.mm_projector.0.bias": _rand(g, D),
            "base_model.model.model.mm_projector.2.weight": _rand(g, D, D),
            "base_model.model.model.mm_projector.2.bias": _rand(g, D)}
    torch.save(side, src / "non_lora_trainables.bin")
    adapter = {}
    for module in adapter_targets:
        din, dout = (H, D) if module.endswith("down_proj") else (D, H) if module.endswith(("gate_proj", "up_proj")) \
            else (D, D)
        adapter[f"base_model.model.{module}.lora_A.weight"] = _rand(g, R, din)
        adapter[f"base_model.model.{module}.lora_B.weight"] = _rand(g, dout, R)
    torch.save(adapter, src / "adapter_model.bin")
    (src / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.05}))
    torch.save(_aligner(g), src / "mm_audio_aligner.bin")
    return base, src, base_sd, {**side, **adapter}


# ----------------------------------------------------------------------------------------------------------------
# Independent reference forward (text tokens), written from the official tensors
# ----------------------------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _rope(x: torch.Tensor) -> torch.Tensor:
    T, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos + rot * sin


def reference_logits(ids: torch.Tensor, w: dict[str, torch.Tensor], experts: dict[int, list[dict[str, torch.Tensor]]],
                     routers: dict[int, torch.Tensor]) -> torch.Tensor:
    """One sequence: LLaMA blocks; each MoE layer routes every token to the top-2 router logits, weights =
    softmax over those two logits, output = weighted sum of the two experts' SwiGLU FFNs."""
    x = w["model.embed_tokens.weight"][ids]
    T, hd = x.shape[0], D // HEADS
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[p + f"self_attn.{a}.weight"].t() for a in ATTN[:3])
        q, k, v = (t.view(T, HEADS, hd).transpose(0, 1) for t in (q, k, v))
        q, k = _rope(q), _rope(k)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd) + causal).softmax(-1)
        x = x + (att @ v).transpose(0, 1).reshape(T, D) @ w[p + "self_attn.o_proj.weight"].t()
        h = _rms(x, w[p + "post_attention_layernorm.weight"])
        logits = h @ routers[i].t()
        top, idx = logits.topk(2, dim=-1)
        gates = top.softmax(-1)
        out = torch.zeros_like(h)
        for t in range(T):
            for j in range(2):
                ex = experts[i][int(idx[t, j])]
                ffn = (F.silu(h[t] @ ex["gate_proj"].t()) * (h[t] @ ex["up_proj"].t())) @ ex["down_proj"].t()
                out[t] += gates[t, j] * ffn
        x = x + out
    return _rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].t()


def _fold(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return weight + (ALPHA / R) * b @ a


IDS = torch.tensor([3, 17, 5, 29, 8, 1, 33, 12, 7])


# ----------------------------------------------------------------------------------------------------------------
# v1
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v1_release(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("uni_moe_v1")
    targets = [f"model.layers.{i}.self_attn.{a}" for i in range(LAYERS) for a in ATTN]
    targets += [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(LAYERS) for e in range(4) for p in PROJS]
    base, src, base_sd, extra = _write_common(root, g, 4, True, targets, {})
    gates = {f"model.layers.{i}.mlp.gate.weight": _rand(g, 4, D, std=1.0) for i in range(LAYERS)}
    torch.save(gates, src / "mlp_gates.bin")
    return dict(base=base, src=src, base_sd=base_sd, adapter=extra, gates=gates)


def test_v1_layout_loads_strictly_and_matches_the_reference_forward(v1_release):
    r = v1_release
    model = load_uni_moe_v1(r["src"], base=r["base"], vision_config=CLIP_VISION, whisper_config=WHISPER)
    assert model.cfg.uni_moe["layers"] == "dense" and model.cfg.uni_moe["expert_lora_rank"] == 0
    w, ad = dict(r["base_sd"]), r["adapter"]

    def lora(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return ad[f"base_model.model.{module}.lora_A.weight"], ad[f"base_model.model.{module}.lora_B.weight"]

    for i in range(LAYERS):
        for a in ATTN:
            key = f"model.layers.{i}.self_attn.{a}"
            w[key + ".weight"] = _fold(w[key + ".weight"], *lora(key))
    experts = {i: [{p: _fold(w[f"model.layers.{i}.mlp.experts.{e}.{p}.weight"],
                             *lora(f"model.layers.{i}.mlp.experts.{e}.{p}")) for p in PROJS} for e in range(4)]
               for i in range(LAYERS)}
    routers = {i: r["gates"][f"model.layers.{i}.mlp.gate.weight"] for i in range(LAYERS)}
    with torch.no_grad():
        _, logits, _ = model(IDS[None])
    torch.testing.assert_close(logits[0], reference_logits(IDS, w, experts, routers), rtol=1e-4, atol=1e-4)
    # side files override the base: projector from non_lora_trainables, aligner and queries from mm_audio_aligner
    torch.testing.assert_close(model.mm_projector[0].weight, ad["base_model.model.model.mm_projector.0.weight"])
    aligner = torch.load(r["src"] / "mm_audio_aligner.bin")
    torch.testing.assert_close(model.speech.query_tokens, aligner["model.query_tokens"])
    torch.testing.assert_close(model.speech.projector[0].weight, aligner["model.mm_audio_aligner.projector.weight"])
    torch.testing.assert_close(model.speech.encoder.conv1.weight,
                               r["base_sd"]["model.audio_tower.audio_tower.conv1.weight"])


def test_v1_detect_convert_and_reload(v1_release, tmp_path):
    r = v1_release
    assert detect_format(r["src"]) == "uni-moe-v1"
    # vision_config / whisper_config are Python-API options (the CLI reads the towers' configs from known ids)
    out = get_converter("uni-moe-v1").convert(r["src"], tmp_path / "out", base=r["base"], vision_config=CLIP_VISION,
                                              whisper_config=WHISPER)
    reloaded = load(out)
    with torch.no_grad():
        ref = load_uni_moe_v1(r["src"], base=r["base"], vision_config=CLIP_VISION, whisper_config=WHISPER)
        torch.testing.assert_close(reloaded(IDS[None])[1], ref(IDS[None])[1])


def test_v1_strictness_and_clear_errors(v1_release, tmp_path):
    r = v1_release
    with pytest.raises(ValueError, match="pass base="):
        load_uni_moe_v1(r["src"], vision_config=CLIP_VISION, whisper_config=WHISPER)
    # an unknown tensor in a side file is a strict-load error naming it
    bad = tmp_path / "e2"
    bad.mkdir()
    for f in r["src"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    gates = dict(r["gates"], **{"model.layers.0.mlp.surprise.weight": torch.zeros(2)})
    torch.save(gates, bad / "mlp_gates.bin")
    with pytest.raises(CheckpointMismatchError, match="surprise"):
        load_uni_moe_v1(bad, base=r["base"], vision_config=CLIP_VISION, whisper_config=WHISPER)
    # an adapter tensor for a module the base lacks
    torch.save(r["gates"], bad / "mlp_gates.bin")
    adapter = dict(r["adapter"])
    adapter["base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight"] = torch.zeros(R, D)
    adapter["base_model.model.model.layers.0.self_attn.x_proj.lora_B.weight"] = torch.zeros(D, R)
    torch.save({k: v for k, v in adapter.items() if ".lora_" in k}, bad / "adapter_model.bin")
    with pytest.raises(ValueError, match="x_proj"):
        load_uni_moe_v1(bad, base=r["base"], vision_config=CLIP_VISION, whisper_config=WHISPER)


# ----------------------------------------------------------------------------------------------------------------
# 8 experts (DeepSpeed)
# ----------------------------------------------------------------------------------------------------------------


def test_8e_layout_loads_strictly_keeps_expert_lora_and_matches_the_reference(tmp_path):
    g = torch.Generator().manual_seed(1)
    E = 4  # the tiny release splits 4 experts over 2 expert-parallel ranks, as 8 over 2 in the paper's setup
    targets = [f"model.layers.{i}.self_attn.{a}" for i in range(LAYERS) for a in ATTN]
    extra_cfg = dict(lora_r=R, lora_alpha=ALPHA, lora_dropout=0.05, aux_balance_loss=True, aux_balance_loss_coef=0.01,
                     moe_type="dense", capacity_factor=1.0)
    base, src, base_sd, adapter = _write_common(tmp_path, g, E, True, targets, extra_cfg)
    ds = "mlp.deepspeed_moe.experts.deepspeed_experts"
    experts: dict[int, list[dict[str, torch.Tensor]]] = {}
    rank_files: list[dict[str, torch.Tensor]] = [{}, {}]
    for i in range(LAYERS):
        experts[i] = []
        for e in range(E):
            rank, local = divmod(e, E // 2)
            folded = {}
            for p in PROJS:
                wt, a, b = _rand(g, *_proj_shape(p)), _rand(g, R, _proj_shape(p)[1]), _rand(g, _proj_shape(p)[0], R)
                key = f"model.layers.{i}.{ds}.{local}.{p}"
                rank_files[rank].update({f"{key}.weight": wt, f"{key}_lora_A.weight": a, f"{key}_lora_B.weight": b})
                folded[p] = _fold(wt, a, b)
            experts[i].append(folded)
    for rank, sd in enumerate(rank_files):
        torch.save(sd, src / f"{rank}_mlp_experts.bin")
    gates = {f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight": _rand(g, E, D, std=1.0) for i in range(LAYERS)}
    torch.save(gates, src / "mlp_gates.bin")
    assert detect_format(src) == "uni-moe-8e"

    model = load_uni_moe_8e(src, base=base, vision_config=CLIP_VISION, whisper_config=WHISPER)
    moe = model.cfg.uni_moe
    assert (moe["router"], moe["aux_loss_coef"], moe["capacity_factor"], moe["expert_lora_rank"]) == (
        "deepspeed_top2", 0.01, None, R)
    assert all(isinstance(m.experts, ExpertLoRAExperts) for _, m in model.moe_layer_modules())
    w = dict(base_sd)
    for i in range(LAYERS):
        for a in ATTN:
            key = f"model.layers.{i}.self_attn.{a}"
            w[key + ".weight"] = _fold(w[key + ".weight"], adapter[f"base_model.model.{key}.lora_A.weight"],
                                       adapter[f"base_model.model.{key}.lora_B.weight"])
    routers = {i: gates[f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight"] for i in range(LAYERS)}
    with torch.no_grad():
        _, logits, _ = model(IDS[None])
    torch.testing.assert_close(logits[0], reference_logits(IDS, w, experts, routers), rtol=1e-4, atol=1e-4)
    (src / "1_mlp_experts.bin").rename(tmp_path / "moved.bin")
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):  # rank 0 alone holds 2 of 4 experts
        load_uni_moe_8e(src, base=base, vision_config=CLIP_VISION, whisper_config=WHISPER)
    (src / "0_mlp_experts.bin").rename(tmp_path / "moved0.bin")
    with pytest.raises(FileNotFoundError, match="mlp_experts"):
        load_uni_moe_8e(src, base=base, vision_config=CLIP_VISION, whisper_config=WHISPER)


def test_cli_names_the_missing_pieces(v1_release, tmp_path, capsys):
    from zoo.convert import main

    r = v1_release
    assert main(["auto", str(r["src"]), str(tmp_path / "a")]) == 2
    assert "pass base=" in capsys.readouterr().err
    # the tiny release names its vision tower by a local path that is not there: the error says which field
    assert main(["uni-moe-v1", str(r["src"]), str(tmp_path / "b"), "--base", str(r["base"])]) == 2
    assert "'mm_vision_tower'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
