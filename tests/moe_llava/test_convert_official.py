"""Official MoE-LLaVA release layout -> our model.

Each test writes a tiny "release" directory by hand with the exact key names of MoE-LLaVA's DeepSpeed checkpoints
(``model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight``, ``...deepspeed_experts.{e}.fc1.weight``,
``model.mm_projector.image_spatial_proj.{0,2}.*``, ``model.image_tower.image_tower.vision_model.*``; Qwen under
``transformer.h.{i}``) and its config.json with the nested ``moe`` dict, then checks the converted model against an
independent reference: transformers' own LM with a small DeepSpeed-style top-2 MoE (per-expert modules, softmax
gate, top-2 renormalised, no drops at eval capacity 2.0) in the MoE slots.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionModel

from zoo.convert import main
from zoo.convert.moe_llava import load_official
from zoo.models.moe_llava import MoELLaVA
from zoo.registry import create_model, load
from zoo.tokenizers import build_tokenizer

TOK = build_tokenizer()
V = len(TOK)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)
PHI = dict(
    model_type="phi",
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    partial_rotary_factor=0.5,
    max_position_embeddings=128,
)
STABLELM = dict(
    model_type="stablelm",
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    partial_rotary_factor=0.5,
    use_qkv_bias=True,
    max_position_embeddings=128,
)
QWEN2 = dict(
    model_type="qwen2",
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)


def _moe_cfg(layers):
    return {
        "moe_enable": True,
        "moe_mode": "sparse",
        "moe_layers_idx": layers,
        "ep_size": 1,
        "top_k_experts": 2,
        "capacity_factor": 1.5,
        "eval_capacity_factor": 2.0,
        "min_capacity": 0,
        "use_residual": False,
        "router_aux_loss_coef": 0.01,
        "train_modules": ["fc1", "fc2", "wg"],
        "num_experts": [4] * len(layers),
    }


class RefExpertPhi(nn.Module):  # the official Phi MLP: fc1 -> gelu_new -> fc2
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        from transformers.activations import NewGELUActivation

        return self.fc2(NewGELUActivation()(self.fc1(x)))


class RefExpertSwiGLU(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class RefTop2(nn.Module):
    """DeepSpeed top-2 gating at eval without drops: softmax over fp32 logits, top-2, renormalised weights."""

    def __init__(self, wg, experts):
        super().__init__()
        self.wg = wg
        self.experts = nn.ModuleList(experts)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates = torch.softmax(x.float() @ self.wg.t(), -1)
        w, idx = gates.topk(2, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            sel = idx == e
            rows = sel.any(-1)
            if rows.any():
                out[rows] += (w * sel).sum(-1)[rows, None].to(x.dtype) * ex(x[rows])
        return out.reshape(shape)


def _tiny_release(tmp_path, lm: dict, moe_layers=(0, 2), seed=0):
    """Our model with random, distinct experts, and its weights in the official layout (dict)."""
    torch.manual_seed(seed)
    vision = dict(kind="hf", config=dict(model_type="clip_vision_model", **VISION))
    model = create_model(
        "moe_llava_custom",
        vision=vision,
        lm=lm,
        template="phi",
        moe=dict(layers=list(moe_layers)),
        image_token_id=-200,
        tokenizer={"kind": "word_level", "json": TOK.backend_tokenizer.to_str()},
    ).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n or ".router." in n:
                p.normal_(0, 0.2)
        if hasattr(model.llm.lm.lm_head, "bias") and model.llm.lm.lm_head.bias is not None:
            model.llm.lm.lm_head.bias.zero_()  # the official Phi LLaVA head has no bias
    return model


def _official_phi_or_stablelm(model: MoELLaVA, swiglu: bool) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for k, v in model.llm.lm.state_dict().items():
        if ".mlp.router." in k or ".mlp.experts." in k or k == "lm_head.bias":
            continue
        sd[k] = v.clone()
    for i in model.moe_layers:
        moe = model.llm.lm.model.layers[i].mlp
        p = f"model.layers.{i}.mlp.deepspeed_moe"
        sd[f"{p}.gate.wg.weight"] = moe.router.weight.detach().clone()
        ex = moe.experts
        for e in range(4):
            q = f"{p}.experts.deepspeed_experts.{e}"
            if swiglu:
                h = ex.gate_up_proj.shape[1] // 2
                sd[f"{q}.gate_proj.weight"] = ex.gate_up_proj[e, :h].detach().clone()
                sd[f"{q}.up_proj.weight"] = ex.gate_up_proj[e, h:].detach().clone()
                sd[f"{q}.down_proj.weight"] = ex.down_proj[e].detach().clone()
            else:
                sd[f"{q}.fc1.weight"] = ex.fc1_weight[e].detach().clone()
                sd[f"{q}.fc1.bias"] = ex.fc1_bias[e].detach().clone()
                sd[f"{q}.fc2.weight"] = ex.fc2_weight[e].detach().clone()
                sd[f"{q}.fc2.bias"] = ex.fc2_bias[e].detach().clone()
    for k, v in model.mm_projector.state_dict().items():
        sd[f"model.mm_projector.image_spatial_proj.{k}"] = v.clone()
    for k, v in model.vision_tower.model.state_dict().items():
        # transformers 4.37 (the release's) kept CLIPVisionModel tensors under `vision_model.`
        sd[f"model.image_tower.image_tower.vision_model.{k}"] = v.clone()
    return sd


def _write_release(tmp_path, name, sd, config, fmt="safetensors", tokenizer=True):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    elif fmt == "sharded":
        keys = sorted(sd)
        half = len(keys) // 2
        shards = {
            "model-00001-of-00002.safetensors": keys[:half],
            "model-00002-of-00002.safetensors": keys[half:],
        }
        for f, ks in shards.items():
            save_file({k: sd[k].contiguous() for k in ks}, str(d / f))
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}})
        )
    else:
        torch.save(sd, d / "pytorch_model.bin")
    if tokenizer:
        TOK.backend_tokenizer.save(str(d / "tokenizer.json"))
        (d / "special_tokens_map.json").write_text(
            json.dumps(
                {"eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>"}
            )
        )
    return d


def _tower_dir(tmp_path, model: MoELLaVA):
    d = tmp_path / "clip-tower"
    if not d.exists():
        model.vision_tower.model.save_pretrained(d)
    return d


def _official_config(tmp_path, model: MoELLaVA, model_type: str, lm_dict: dict) -> dict:
    cfg = {k: v for k, v in lm_dict.items() if k != "model_type"}
    cfg.update(
        {
            "model_type": model_type,
            "architectures": ["EvalMoELLaVAForCausalLM"],
            "mm_image_tower": str(_tower_dir(tmp_path, model)),
            "mm_video_tower": None,
            "image_projector_type": "mlp2x_gelu",
            "mm_hidden_size": 32,
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "image_aspect_ratio": "pad",
            "tokenizer_padding_side": "right",
            "moe": _moe_cfg(model.moe_layers),
        }
    )
    return cfg


def _reference_logits(model: MoELLaVA, sd: dict, lm_dict: dict, swiglu: bool, ids, mask, px):
    """transformers LM + RefTop2 in the MoE slots, with weights read from the official dict by its key names."""
    from zoo.components.lm import build_causal_lm

    ref = build_causal_lm(lm_dict).eval()
    own = {
        k: v
        for k, v in sd.items()
        if not (".deepspeed_moe." in k or "mm_projector" in k or "image_tower" in k)
    }
    if "lm_head.bias" in ref.state_dict():
        own["lm_head.bias"] = torch.zeros(lm_dict["vocab_size"])
    for i in model.moe_layers:
        p = f"model.layers.{i}.mlp.deepspeed_moe"
        d, h = lm_dict["hidden_size"], lm_dict["intermediate_size"]
        experts = []
        for e in range(4):
            ex = RefExpertSwiGLU(d, h) if swiglu else RefExpertPhi(d, h)
            q = f"{p}.experts.deepspeed_experts.{e}."
            ex.load_state_dict({k[len(q) :]: v for k, v in sd.items() if k.startswith(q)})
            experts.append(ex)
        ref.model.layers[i].mlp = RefTop2(sd[f"{p}.gate.wg.weight"].float(), experts)
    missing, unexpected = ref.load_state_dict(own, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing), (missing, unexpected)
    tower = CLIPVisionModel.from_pretrained(_tower_dir_cache["dir"]).eval()
    proj = model.mm_projector  # checked separately by key names below
    with torch.no_grad():
        feats = tower(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        w0, b0 = (
            sd["model.mm_projector.image_spatial_proj.0.weight"],
            sd["model.mm_projector.image_spatial_proj.0.bias"],
        )
        w2, b2 = (
            sd["model.mm_projector.image_spatial_proj.2.weight"],
            sd["model.mm_projector.image_spatial_proj.2.bias"],
        )
        feats = torch.nn.functional.linear(
            torch.nn.functional.gelu(torch.nn.functional.linear(feats, w0, b0)), w2, b2
        )
        is_img = ids == -200
        emb = ref.get_input_embeddings()(ids.masked_fill(is_img, 0))
        emb[is_img] = feats.reshape(-1, feats.shape[-1])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        del proj
        return ref(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits


_tower_dir_cache: dict = {}


def _inputs(n=16):
    g = torch.Generator().manual_seed(5)
    text = torch.randint(7, V, (2, 10), generator=g)
    ids = torch.cat([text[:, :2], torch.full((2, n), -200), text[:, 2:]], 1)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    px = torch.randn(2, 3, 32, 32, generator=g)
    return ids, mask, px


@pytest.mark.parametrize(
    "lm,model_type,swiglu,fmt",
    [
        (PHI, "moe_llava_phi", False, "safetensors"),
        (STABLELM, "moe_llava_stablelm", True, "sharded"),
    ],
)
def test_official_release_matches_reference_moe(tmp_path, lm, model_type, swiglu, fmt) -> None:
    model = _tiny_release(tmp_path, lm)
    sd = _official_phi_or_stablelm(model, swiglu)
    assert "model.layers.0.mlp.deepspeed_moe.gate.wg.weight" in sd and "lm_head.bias" not in sd
    _tower_dir_cache["dir"] = _tower_dir(tmp_path, model)
    config = _official_config(tmp_path, model, model_type, lm)
    if model_type == "moe_llava_stablelm":  # StableLM-2's remote-code (stablelm_epoch) field names
        config["rope_pct"] = config.pop("partial_rotary_factor")
        config["norm_eps"] = 1e-5
    src = _write_release(tmp_path, "release", sd, config, fmt)
    ours = load_official(src)
    assert ours.moe_layers == [0, 2] and ours.image_token_id == -200 and ours.num_image_tokens == 16
    moe0 = ours.llm.lm.model.layers[0].mlp
    assert (
        moe0.cfg.capacity_factor == 1.5
        and moe0.cfg.eval_capacity_factor == 2.0
        and moe0.cfg.min_capacity == 0
    )
    assert moe0.cfg.balance_loss == "top1" and moe0.cfg.balance_loss_coef == 0.01
    ids, mask, px = _inputs()
    with torch.no_grad():
        _, logits, _ = ours(ids, mask, px)
    ref = _reference_logits(model, sd, lm, swiglu, ids, mask, px)
    keep = mask.bool()
    assert (logits[keep] - ref[keep]).abs().max() < 1e-5
    # the release's tokenizer came along; generation runs with the official -200 placeholder
    assert ours.tokenizer.get_vocab() == TOK.get_vocab()
    from PIL import Image

    out = ours.generate([Image.new("RGB", (20, 30), (200, 10, 10))], ["what color is it ?"], max_new_tokens=3)
    assert isinstance(out[0], str)


def _official_qwen(model: MoELLaVA) -> dict[str, torch.Tensor]:
    """Our Qwen2-module model written in Qwen v1's remote-code layout (c_attn fused, w1=up, w2=gate)."""
    lm = model.llm.lm
    sd = {
        "transformer.wte.weight": lm.model.embed_tokens.weight,
        "transformer.ln_f.weight": lm.model.norm.weight,
        "lm_head.weight": lm.lm_head.weight,
    }
    for i, layer in enumerate(lm.model.layers):
        p = f"transformer.h.{i}"
        a = layer.self_attn
        sd[f"{p}.ln_1.weight"] = layer.input_layernorm.weight
        sd[f"{p}.ln_2.weight"] = layer.post_attention_layernorm.weight
        sd[f"{p}.attn.c_attn.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        sd[f"{p}.attn.c_attn.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        sd[f"{p}.attn.c_proj.weight"] = a.o_proj.weight
        if i in model.moe_layers:
            ex = layer.mlp.experts
            h = ex.gate_up_proj.shape[1] // 2
            sd[f"{p}.mlp.deepspeed_moe.gate.wg.weight"] = layer.mlp.router.weight
            for e in range(4):
                q = f"{p}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}"
                sd[f"{q}.w2.weight"] = ex.gate_up_proj[e, :h]
                sd[f"{q}.w1.weight"] = ex.gate_up_proj[e, h:]
                sd[f"{q}.c_proj.weight"] = ex.down_proj[e]
        else:
            sd[f"{p}.mlp.w2.weight"] = layer.mlp.gate_proj.weight
            sd[f"{p}.mlp.w1.weight"] = layer.mlp.up_proj.weight
            sd[f"{p}.mlp.c_proj.weight"] = layer.mlp.down_proj.weight
    for k, v in model.mm_projector.state_dict().items():
        sd[f"transformer.mm_projector.image_spatial_proj.{k}"] = v
    return {k: v.detach().clone() for k, v in sd.items()}


def test_official_qwen_layout_and_separate_tower_weights(tmp_path) -> None:
    model = _tiny_release(tmp_path, QWEN2, moe_layers=(0, 2), seed=1)
    sd = _official_qwen(model)  # no tower keys: the official loader re-downloads the tower
    cfg = {
        "model_type": "moe_llava_qwen",
        "vocab_size": V,
        "hidden_size": 32,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "kv_channels": 8,
        "seq_length": 128,
        "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "no_bias": True,
        "mm_image_tower": str(_tower_dir(tmp_path, model)),
        "image_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "moe": _moe_cfg([0, 2]),
    }
    src = _write_release(tmp_path, "qwen", sd, cfg, fmt="bin", tokenizer=False)
    with pytest.raises(ValueError, match="no vision tower weights.*--vision-weights"):
        load_official(src)
    ours = load_official(src, vision_weights=_tower_dir(tmp_path, model))
    assert ours.llm.config.model_type == "qwen2" and ours.template.name == "qwen" and ours.tokenizer is None
    ids, mask, px = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, mask, px)[1][mask.bool()], model(ids, mask, px)[1][mask.bool()], atol=1e-5, rtol=1e-5
        )


def test_cli_convert_and_bad_releases(tmp_path, capsys) -> None:
    model = _tiny_release(tmp_path, PHI)
    sd = _official_phi_or_stablelm(model, swiglu=False)
    cfg = _official_config(tmp_path, model, "moe_llava_phi", PHI)
    src = _write_release(tmp_path, "rel", sd, cfg)
    assert main(["moe-llava", str(src), str(tmp_path / "zoo")]) == 0
    loaded = load(tmp_path / "zoo")
    ids, mask, px = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, mask, px)[1][mask.bool()], model(ids, mask, px)[1][mask.bool()], atol=1e-5, rtol=1e-5
        )

    extra = dict(sd)
    extra["model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.4.fc1.weight"] = torch.zeros(64, 32)
    bad = _write_release(tmp_path, "bad1", extra, cfg)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_official(bad)
    residual = dict(cfg, moe=dict(cfg["moe"], use_residual=True))
    bad = _write_release(tmp_path, "bad2", sd, residual)
    assert main(["auto", str(bad), str(tmp_path / "o")]) == 2
    assert "moe.use_residual" in capsys.readouterr().err
    missing = {k: v for k, v in sd.items() if "deepspeed_experts.3." not in k}
    bad = _write_release(tmp_path, "bad3", missing, cfg)
    with pytest.raises(ValueError, match="missing"):
        load_official(bad)
    assert math.isfinite(float(loaded.num_parameters()["active"]))


def test_load_released_in_memory_and_official_weights_listed(tmp_path, monkeypatch) -> None:
    from zoo.convert import load_released
    from zoo.registry import get_weights_cfg, list_pretrained

    model = _tiny_release(tmp_path, PHI)
    sd = _official_phi_or_stablelm(model, swiglu=False)
    src = _write_release(tmp_path, "rel", sd, _official_config(tmp_path, model, "moe_llava_phi", PHI))
    loaded = load_released(src)
    ids, mask, px = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, px)[1], model(ids, mask, px)[1], atol=1e-5, rtol=1e-5)
    assert "moe_llava_phi2_4e.official" in list_pretrained("moe_llava*")
    assert get_weights_cfg("moe_llava_phi2_4e.official").hf_hub_id == "LanguageBind/MoE-LLaVA-Phi2-2.7B-4e"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an empty hub cache, offline: a clear error, no network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set and LanguageBind/MoE-LLaVA-Phi2-2.7B-4e"):
        load("moe_llava_phi2_4e.official")
