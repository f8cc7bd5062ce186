"""Official checkpoint import: DiT's plain state dicts and DiT-MoE's {"ema": ...} (S/B, timm attention) and
flash-attention (XL/G: Wqkv, q_norm, k_norm, out_proj) layouts, written here key by key from dit_moe.md Sec. 1.11
and 2.10; tiny dims with real key names, and every full-size release checked on the meta device."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.models.dit import DIT_MOE_VARIANTS, DIT_SIZES, DiT, DiTConfig, load_official_checkpoint


def official_dit_shapes(depth: int, d: int, patch: int, latent: int = 32, cin: int = 4, classes: int = 1000) -> dict:
    """Key -> shape of an official DiT checkpoint (Sec. 1.11)."""
    shapes = {
        "pos_embed": (1, (latent // patch) ** 2, d),
        "x_embedder.proj.weight": (d, cin, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (patch * patch * 2 * cin, d), "final_layer.linear.bias": (patch * patch * 2 * cin,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        }
    return shapes


def official_dit_moe_shapes(depth: int, d: int, heads: int, experts: int, flash: bool, **kw) -> dict:
    """Key -> shape of an official DiT-MoE checkpoint (Sec. 2.10): MoE in every block, flash attention for XL/G."""
    shapes = official_dit_shapes(depth, d, 2, **kw)
    for i in range(depth):
        b = f"blocks.{i}."
        if flash:
            for p in ("weight", "bias"):
                shapes[f"{b}attn.Wqkv.{p}"] = shapes.pop(f"{b}attn.qkv.{p}")
                shapes[f"{b}attn.out_proj.{p}"] = shapes.pop(f"{b}attn.proj.{p}")
                shapes[f"{b}attn.q_norm.{p}"] = (d // heads,)
                shapes[f"{b}attn.k_norm.{p}"] = (d // heads,)
        shapes[b + "moe.gate.weight"] = (experts, d)
        for e in range(experts):
            shapes |= {f"{b}moe.experts.{e}.gate_proj.weight": (4 * d, d), f"{b}moe.experts.{e}.up_proj.weight": (4 * d, d),
                       f"{b}moe.experts.{e}.down_proj.weight": (d, 4 * d)}
        shapes |= {f"{b}moe.shared_experts.gate_proj.weight": (2 * d, d), f"{b}moe.shared_experts.up_proj.weight": (2 * d, d),
                   f"{b}moe.shared_experts.down_proj.weight": (d, 2 * d)}
    return shapes


def dense_mlp_shapes(depth: int, d: int) -> dict:
    return {k: v for i in range(depth) for k, v in {f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
                                                      f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,)}.items()}


def random_state(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}


def test_dit_xl_2_state_dict_is_the_official_layout() -> None:
    with torch.device("meta"):
        model = zoo.create_model("dit_xl_2")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_dit_shapes(28, 1152, 2) | dense_mlp_shapes(28, 1152)
    assert ours == expected
    assert ours["final_layer.linear.weight"] == (32, 1152) and ours["y_embedder.embedding_table.weight"] == (1001, 1152)


@pytest.mark.parametrize("name", sorted(DIT_MOE_VARIANTS))
def test_full_size_dit_moe_release_layouts_load_on_meta(name: str) -> None:
    size, experts, _, flash, _ = DIT_MOE_VARIANTS[name]
    depth, d, heads = DIT_SIZES[size]
    with torch.device("meta"):
        model = zoo.create_model(name)
        state = {k: torch.empty(s) for k, s in official_dit_moe_shapes(depth, d, heads, experts, flash).items()}
    load_official_checkpoint(model, {"ema": state} if not flash else state)


def test_tiny_official_dit_pt_file_loads_strictly_and_runs(tmp_path: Path) -> None:
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    shapes = official_dit_shapes(2, 32, 2, latent=8, classes=10) | dense_mlp_shapes(2, 32)
    state = random_state(shapes)
    torch.save(state, tmp_path / "DiT-tiny.pt")
    model = load_official_checkpoint(DiT(cfg), tmp_path / "DiT-tiny.pt")
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model(torch.randn(2, 4, 8, 8), torch.tensor([0, 999]), torch.tensor([3, 10])).shape == (2, 8, 8, 8)


def reference_moe(h: torch.Tensor, sd: dict, prefix: str, experts: int, k: int = 2) -> torch.Tensor:
    """DiT-MoE's SparseMoeBlock from the official tensors: softmax over all experts, top-k without
    renormalisation, SwiGLU experts, plus the shared SwiGLU with weight 1."""

    def swiglu(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, sd[p + "gate_proj.weight"])) * F.linear(x, sd[p + "up_proj.weight"]), sd[p + "down_proj.weight"])

    probs = F.linear(h, sd[prefix + "gate.weight"]).softmax(-1)
    top_p, top_i = probs.topk(k, dim=-1)
    out = swiglu(h, prefix + "shared_experts.")
    for e in range(experts):
        w = (top_p * (top_i == e)).sum(-1, keepdim=True)
        out = out + w * swiglu(h, f"{prefix}experts.{e}.")
    return out


def reference_flash_attention(x: torch.Tensor, sd: dict, prefix: str, heads: int) -> torch.Tensor:
    """FlashSelfMHAModified from the official tensors: Wqkv (3, heads, head_dim rows), per-head LayerNorm on q and k."""
    b, n, d = x.shape
    hd = d // heads
    q, k, v = F.linear(x, sd[prefix + "Wqkv.weight"], sd[prefix + "Wqkv.bias"]).view(b, n, 3, heads, hd).unbind(2)
    q = F.layer_norm(q, (hd,), sd[prefix + "q_norm.weight"], sd[prefix + "q_norm.bias"], eps=1e-6)
    k = F.layer_norm(k, (hd,), sd[prefix + "k_norm.weight"], sd[prefix + "k_norm.bias"], eps=1e-6)
    att = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d)
    return F.linear(out, sd[prefix + "out_proj.weight"], sd[prefix + "out_proj.bias"])


@pytest.mark.parametrize("flash", [False, True], ids=["s_b_layout", "xl_g_layout"])
def test_tiny_official_dit_moe_checkpoint_matches_reference_blocks(tmp_path: Path, flash: bool) -> None:
    d, heads, experts = 32, 2, 4
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=d, depth=2, num_heads=heads, num_classes=10,
                    num_experts=experts, top_k=2, qk_norm=flash)
    state = random_state(official_dit_moe_shapes(2, d, heads, experts, flash, latent=8, classes=10), seed=1)
    torch.save({"ema": state}, tmp_path / "dit_moe_tiny.pt")
    model = load_official_checkpoint(DiT(cfg), tmp_path / "dit_moe_tiny.pt").eval()
    h = torch.randn(3, 16, d)
    block = model.blocks[1]
    torch.testing.assert_close(block.moe(h), reference_moe(h, state, "blocks.1.moe.", experts), atol=1e-5, rtol=1e-4)
    if flash:
        torch.testing.assert_close(block.attn(h), reference_flash_attention(h, state, "blocks.1.attn.", heads),
                                   atol=1e-5, rtol=1e-4)


def test_checkpoint_with_missing_and_extra_keys_lists_them(tmp_path: Path) -> None:
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    state = random_state(official_dit_shapes(2, 32, 2, latent=8, classes=10) | dense_mlp_shapes(2, 32))
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.mlp.fc3.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: checkpoint does not match DiT\(depth=2.*1 missing keys "
                                         r"\[blocks\.1\.mlp\.fc2\.bias\]; 1 unexpected keys \[blocks\.1\.mlp\.fc3\.weight\]"):
        load_official_checkpoint(DiT(cfg), tmp_path / "bad.pt")
    good = random_state(official_dit_shapes(2, 32, 2, latent=8, classes=10) | dense_mlp_shapes(2, 32))
    good["blocks.0.attn.qkv.weight"] = torch.zeros(3 * 32, 16)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        load_official_checkpoint(DiT(cfg), good)


def test_zoo_convert_dit_writes_a_loadable_directory(tmp_path: Path) -> None:
    from zoo.convert.dit import main as convert_main

    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                num_experts=4, qk_norm=True)
    state = random_state(official_dit_moe_shapes(2, 32, 2, 4, True, latent=8, classes=10), seed=3)
    torch.save(state, tmp_path / "moe.pt")
    from zoo.convert.dit import convert_dit

    out = convert_dit("dit_tiny", tmp_path / "moe.pt", tmp_path / "out", **args)
    model = zoo.load(out)
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.blocks[0].moe.router.weight, state["blocks.0.moe.gate.weight"])
    torch.testing.assert_close(model.blocks[1].attn.proj.bias, state["blocks.1.attn.out_proj.bias"])
    del state["blocks.1.attn.q_norm.bias"]
    torch.save(state, tmp_path / "bad.pt")
    assert convert_main(["dit_moe_xl_2_8e2a", str(tmp_path / "bad.pt"), str(tmp_path / "o2")]) == 2


@pytest.mark.parametrize(
    "shapes,expected",
    [
        (official_dit_shapes(28, 1152, 2) | dense_mlp_shapes(28, 1152), ("dit_xl_2", {})),
        (official_dit_shapes(28, 1152, 2, latent=64) | dense_mlp_shapes(28, 1152), ("dit_xl_2", {"input_size": 64})),
        (official_dit_shapes(12, 384, 4) | dense_mlp_shapes(12, 384), ("dit_s_4", {})),
        *[
            (official_dit_moe_shapes(*DIT_SIZES[size][:2], DIT_SIZES[size][2], experts, flash), (name, {}))
            for name, (size, experts, _, flash, _) in DIT_MOE_VARIANTS.items()
        ],
    ],
    ids=["dit_xl_2", "dit_xl_2_512", "dit_s_4", *DIT_MOE_VARIANTS],
)
def test_auto_detection_names_the_registered_architecture_of_a_release(shapes: dict, expected: tuple) -> None:
    """`zoo convert auto` reads every official release's architecture from its shapes (meta tensors: no memory)."""
    from zoo.convert.dit import infer_dit_architecture

    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in shapes.items()}
    assert infer_dit_architecture({"ema": state}) == expected


def test_zoo_convert_auto_and_zoo_load_read_a_dit_moe_pt_without_being_told_the_architecture(tmp_path: Path) -> None:
    from zoo.convert import detect_format, main

    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                    num_experts=4, qk_norm=True)
    state = random_state(official_dit_moe_shapes(2, 32, 2, 4, True, latent=8, classes=10), seed=4)
    torch.save({"ema": state}, tmp_path / "moe.pt")
    reference = load_official_checkpoint(DiT(cfg), tmp_path / "moe.pt").eval()
    assert detect_format(tmp_path / "moe.pt") == "dit"
    assert main(["auto", str(tmp_path / "moe.pt"), str(tmp_path / "out")]) == 0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 7])
    for model in (zoo.load(tmp_path / "out"), zoo.load(tmp_path / "moe.pt")):
        assert model.cfg == cfg and not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, y), reference(x, t, y), rtol=0, atol=0)
    # Standard attention and a width outside the size table: the heads cannot be read from the tensors
    dense = random_state(official_dit_shapes(2, 32, 2, latent=8, classes=10) | dense_mlp_shapes(2, 32))
    torch.save(dense, tmp_path / "dense.pt")
    assert main(["auto", str(tmp_path / "dense.pt"), str(tmp_path / "o2")]) == 2
    with pytest.raises(ValueError, match=r"dense\.pt: depth 2, width 32 is not in the DiT size table"):
        zoo.load(tmp_path / "dense.pt")
