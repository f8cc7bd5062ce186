"""Parity of our DiT forward against diffusers' DiTTransformer2DModel (the reference oracle of dit_moe.md Sec. 8),
with the official DiT -> diffusers key conversion. Skips cleanly when diffusers is not installed."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from zoo.models.dit import DiT, DiTConfig  # noqa: E402


def to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The official conversion (convert_dit_to_diffusers.py) written from its key table: the timestep and label
    embedders are copied into every block's norm1.emb; qkv is split into to_q/to_k/to_v; pos_embed is recomputed."""
    out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"], "pos_embed.proj.bias": state["x_embedder.proj.bias"]}
    for i in range(depth):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = o + "norm1.emb."
        for j, name in ((0, "linear_1"), (2, "linear_2")):
            for p in ("weight", "bias"):
                out[f"{emb}timestep_embedder.{name}.{p}"] = state[f"t_embedder.mlp.{j}.{p}"]
        out[emb + "class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
        for p in ("weight", "bias"):
            out[f"{o}norm1.linear.{p}"] = state[f"{b}adaLN_modulation.1.{p}"]
            q, k, v = state[f"{b}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{o}attn1.to_q.{p}"], out[f"{o}attn1.to_k.{p}"], out[f"{o}attn1.to_v.{p}"] = q, k, v
            out[f"{o}attn1.to_out.0.{p}"] = state[f"{b}attn.proj.{p}"]
            out[f"{o}ff.net.0.proj.{p}"] = state[f"{b}mlp.fc1.{p}"]
            out[f"{o}ff.net.2.{p}"] = state[f"{b}mlp.fc2.{p}"]
    for p in ("weight", "bias"):
        out[f"proj_out_1.{p}"] = state[f"final_layer.adaLN_modulation.1.{p}"]
        out[f"proj_out_2.{p}"] = state[f"final_layer.linear.{p}"]
    return out


def test_forward_matches_diffusers_dit_transformer() -> None:
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    ours = DiT(cfg).eval()
    # adaLN-Zero starts as the identity with a zero output: randomise everything so the comparison means something.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.05)
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6,  # DiT's MLP pre-norm eps (Sec. 8.3 #2)
    ).eval()
    ref.load_state_dict(to_diffusers(ours.state_dict(), cfg.depth), strict=True)
    for block in ref.transformer_blocks:
        # diffusers divides the frequency exponent by half-1; DiT by half (Sec. 8.3 #1).
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 17, 999])
    y = torch.tensor([0, 9, 10])  # 10 is the null class
    with torch.no_grad():
        expected = ref(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
    assert got.shape == expected.shape == (3, 8, 8, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
