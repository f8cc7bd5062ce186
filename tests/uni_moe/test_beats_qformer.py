"""BEATs: a state dict written in the released checkpoint's layout (key names and shapes from the reference table)
loads strictly, and the forward equals an independent reference written here step by step from the published
description (patch embed time-major, pos-conv with weight norm, post-LN DeepNorm layers, shared T5 buckets with GRU
gates, BEATs' scaled-query attention). Also the Q-Former connector and the fbank front end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.components.audio import BEATs, BEATsConfig, QFormerConnector, QFormerConnectorConfig, beats_fbank

CFG = dict(input_patch_size=16, embed_dim=8, encoder_layers=2, encoder_embed_dim=16, encoder_ffn_embed_dim=24,
           encoder_attention_heads=2, conv_pos=8, conv_pos_groups=2, num_buckets=32, max_distance=64, mel_bins=128)


def official_layout(cfg: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Keys and shapes of BEATs_iter3_plus_AS2M's ``model`` entry, for the sizes in ``cfg``."""
    E, C, P, H = cfg["encoder_embed_dim"], cfg["embed_dim"], cfg["input_patch_size"], cfg["encoder_attention_heads"]
    ffn, k, groups = cfg["encoder_ffn_embed_dim"], cfg["conv_pos"], cfg["conv_pos_groups"]

    def r(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"patch_embedding.weight": r(C, 1, P, P, std=0.05), "layer_norm.weight": 1 + r(C), "layer_norm.bias": r(C),
          "post_extract_proj.weight": r(E, C), "post_extract_proj.bias": r(E),
          "encoder.pos_conv.0.weight_g": 1 + r(1, 1, k).abs(), "encoder.pos_conv.0.weight_v": r(E, E // groups, k),
          "encoder.pos_conv.0.bias": r(E), "encoder.layer_norm.weight": 1 + r(E), "encoder.layer_norm.bias": r(E)}
    table = r(cfg["num_buckets"], H, std=1.0)
    for i in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = r(E, E)
            sd[p + f"self_attn.{proj}.bias"] = r(E)
        sd[p + "self_attn.grep_linear.weight"] = r(8, E // H)
        sd[p + "self_attn.grep_linear.bias"] = r(8)
        sd[p + "self_attn.grep_a"] = 1 + r(1, H, 1, 1)
        sd[p + "self_attn.relative_attention_bias.weight"] = table  # one shared table, listed under every layer
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            sd[p + f"{ln}.weight"] = 1 + r(E)
            sd[p + f"{ln}.bias"] = r(E)
        sd[p + "fc1.weight"], sd[p + "fc1.bias"] = r(ffn, E), r(ffn)
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = r(E, ffn), r(E)
    return sd


def _bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    nb = num_buckets // 2
    out = (rel > 0).long() * nb
    n = rel.abs()
    exact = nb // 2
    out = out.clone()
    for idx in range(n.numel()):
        d = int(n.view(-1)[idx])
        if d < exact:
            b = d
        else:
            b = exact + int(math.log(d / exact) / math.log(max_distance / exact) * (nb - exact))
            b = min(b, nb - 1)
        out.view(-1)[idx] += b
    return out


def reference_beats(fbank: torch.Tensor, sd: dict[str, torch.Tensor], cfg: dict) -> torch.Tensor:
    E, H, P, L = cfg["encoder_embed_dim"], cfg["encoder_attention_heads"], cfg["input_patch_size"], \
        cfg["encoder_layers"]
    hd = E // H
    x = F.conv2d(fbank.unsqueeze(1), sd["patch_embedding.weight"], stride=P)
    B, C, Tp, Fp = x.shape
    x = x.reshape(B, C, Tp * Fp).transpose(1, 2)  # index t * Fp + f
    x = F.layer_norm(x, (C,), sd["layer_norm.weight"], sd["layer_norm.bias"])
    x = x @ sd["post_extract_proj.weight"].t() + sd["post_extract_proj.bias"]
    v = sd["encoder.pos_conv.0.weight_v"]
    w = sd["encoder.pos_conv.0.weight_g"] * v / v.norm(dim=(0, 1), keepdim=True)
    conv = F.conv1d(x.transpose(1, 2), w, sd["encoder.pos_conv.0.bias"], padding=cfg["conv_pos"] // 2,
                    groups=cfg["conv_pos_groups"])[:, :, :-1]
    x = x + F.gelu(conv).transpose(1, 2)
    x = F.layer_norm(x, (E,), sd["encoder.layer_norm.weight"], sd["encoder.layer_norm.bias"])
    N = x.shape[1]
    pos = torch.arange(N)
    buckets = _bucket(pos[None, :] - pos[:, None], cfg["num_buckets"], cfg["max_distance"])
    bias = sd["encoder.layers.0.self_attn.relative_attention_bias.weight"][buckets].permute(2, 0, 1)  # [H, q, k]
    alpha = (2.0 * L) ** 0.25
    for i in range(L):
        p = f"encoder.layers.{i}.self_attn."

        def lin(t: torch.Tensor, name: str, p: str = p) -> torch.Tensor:
            return t @ sd[p + f"{name}.weight"].t() + sd[p + f"{name}.bias"]

        q_raw = lin(x, "q_proj").view(B, N, H, hd).transpose(1, 2)
        k = lin(x, "k_proj").view(B, N, H, hd).transpose(1, 2)
        val = lin(x, "v_proj").view(B, N, H, hd).transpose(1, 2)
        q = q_raw * hd**-0.5 / 32  # BEATs scales q by 1/alpha=32 and multiplies the shifted logits back
        logits = q @ k.transpose(-1, -2)
        logits = (logits - logits.amax(-1, keepdim=True)) * 32
        gates = torch.sigmoid(lin(q_raw, "grep_linear").view(B, H, N, 2, 4).sum(-1))
        ga, gb = gates[..., 0:1], gates[..., 1:2]
        logits = logits + (ga * (gb * sd[p + "grep_a"] - 1.0) + 2.0) * bias
        attn = (logits.softmax(-1) @ val).transpose(1, 2).reshape(B, N, E)
        x = F.layer_norm(alpha * x + lin(attn, "out_proj"), (E,), sd[f"encoder.layers.{i}.self_attn_layer_norm.weight"],
                         sd[f"encoder.layers.{i}.self_attn_layer_norm.bias"])
        q2 = f"encoder.layers.{i}."
        h = F.gelu(x @ sd[q2 + "fc1.weight"].t() + sd[q2 + "fc1.bias"])
        x = F.layer_norm(alpha * x + h @ sd[q2 + "fc2.weight"].t() + sd[q2 + "fc2.bias"], (E,),
                         sd[q2 + "final_layer_norm.weight"], sd[q2 + "final_layer_norm.bias"])
    return x


def test_beats_loads_the_official_layout_strictly_and_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    sd = official_layout(CFG, g)
    model = BEATs(BEATsConfig(**CFG)).eval()
    assert set(model.state_dict()) == set(sd)
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    # the table is one shared module: loading any copy sets it for every layer
    assert model.encoder.layers[1].self_attn.relative_attention_bias is model.encoder.layers[0].self_attn.relative_attention_bias
    fbank = torch.randn(2, 100, 128, generator=g)
    with torch.no_grad():
        out = model(fbank)
    assert out.shape == (2, model.num_tokens(100), 16) == (2, 48, 16)
    torch.testing.assert_close(out, reference_beats(fbank, sd, CFG), rtol=1e-4, atol=1e-4)


def test_beats_checkpoint_cfg_and_paper_defaults():
    released = dict(CFG, encoder_layerdrop=0.05, layer_wise_gradient_decay_ratio=0.6, dropout=0.0,
                    layer_norm_first=False, relative_position_embedding=True, finetuned_model=False)
    assert BEATsConfig.from_checkpoint_cfg(released) == BEATsConfig(**CFG)
    with pytest.raises(ValueError, match="layer_norm_first"):
        BEATsConfig.from_checkpoint_cfg(dict(released, layer_norm_first=True))
    paper = BEATsConfig()
    assert (paper.encoder_layers, paper.encoder_embed_dim, paper.num_buckets, paper.max_distance) == (12, 768, 320, 800)
    with torch.device("meta"):
        n = sum(p.numel() for p in BEATs(paper).parameters())
    assert 89_000_000 < n < 92_000_000  # BEATs_iter3+ is a ~90M-parameter ViT-Base encoder


def test_beats_fbank_matches_the_kaldi_recipe_on_a_tone():
    """A 1 kHz tone: frame count by snip-edges, the energy peak in the mel bin holding 1 kHz (Kaldi's mel scale),
    and BEATs' normalisation (mean 15.41663, twice the std 6.55582)."""
    t = torch.arange(16000) / 16000
    fb = beats_fbank(0.5 * torch.sin(2 * math.pi * 1000 * t))
    assert fb.shape == (1 + (16000 - 400) // 160, 128)
    mel = lambda f: 1127 * math.log(1 + f / 700)  # noqa: E731
    delta = (mel(8000) - mel(20)) / 129
    expected_bin = round((mel(1000) - mel(20)) / delta) - 1
    assert abs(int(fb.mean(0).argmax()) - expected_bin) <= 1
    silent = beats_fbank(torch.zeros(16000))
    torch.testing.assert_close(silent, torch.full_like(silent, (math.log(torch.finfo(torch.float32).eps) - 15.41663)
                                                         / (2 * 6.55582)))


def test_qformer_connector_reads_the_encoder_and_its_queries():
    cfg = QFormerConnectorConfig(qformer=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=24, cross_attention_frequency=2,
                                              encoder_hidden_size=12, vocab_size=8), num_query_tokens=5)
    torch.manual_seed(0)
    conn = QFormerConnector(cfg, lm_hidden_size=20).eval()
    enc = torch.randn(3, 7, 12)
    with torch.no_grad():
        conn.query_tokens.normal_()
        out = conn(enc)
        assert out.shape == (3, 5, 20)
        shifted = conn(enc + torch.randn(3, 7, 12))
    assert (out - shifted).abs().max() > 1e-3  # cross-attention reads the encoder
    assert "qformer.encoder.layer.0.crossattention.attention.key.weight" in conn.state_dict()
    assert "qformer.encoder.layer.1.crossattention.attention.key.weight" not in conn.state_dict()  # every 2nd layer
    with pytest.raises(ValueError, match="width 12"):
        conn(torch.randn(1, 7, 16))
