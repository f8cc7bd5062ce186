"""DiT / DiT-MoE model: size tables vs the papers, forward/backward, guidance, routing statistics, bad input."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.models.dit import DiT, DiTConfig, count_params, sincos_2d

# (name, total, activated): DiT Table 1 (33M/130M/458M/675M) and the exact XL/2 count of dit_moe.md 1.10;
# DiT-MoE Table 1 (199M/71M, 369M/71M, 795M/286M, 2.8B/1.0B, 4.1B/1.5B, 16.5B/3.1B) and the derived counts of 2.8.
PAPER = {
    "dit_s_2": (33e6, 33e6), "dit_b_2": (130e6, 130e6), "dit_l_2": (458e6, 458e6), "dit_xl_2": (675e6, 675e6),
    "dit_moe_s_2_8e2a": (199e6, 71e6), "dit_moe_s_2_16e2a": (369e6, 71e6), "dit_moe_b_2_8e2a": (795e6, 286e6),
    "dit_moe_l_2_8e2a": (2.8e9, 1.0e9), "dit_moe_xl_2_8e2a": (4.1e9, 1.5e9), "dit_moe_g_2_16e2a": (16.5e9, 3.1e9),
}
DERIVED = {"dit_moe_s_2_8e2a": (199.3e6, 71.9e6), "dit_moe_b_2_8e2a": (795.9e6, 286.3e6),
           "dit_moe_xl_2_8e2a": (4.17e9, 1.49e9), "dit_moe_g_2_16e2a": (16.50e9, 3.18e9)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameter_counts_match_the_papers(name: str) -> None:
    with torch.device("meta"):
        total, active = count_params(zoo.create_model(name))
    paper_total, paper_active = PAPER[name]
    # Papers round to 2-3 significant digits; XL/2-8E2A's 4.1B is 4.17B (rounded down), hence 3%.
    assert abs(total - paper_total) / paper_total < 0.03
    assert abs(active - paper_active) / paper_active < 0.03
    if name in DERIVED:
        assert abs(total - DERIVED[name][0]) / DERIVED[name][0] < 0.002
        assert abs(active - DERIVED[name][1]) / DERIVED[name][1] < 0.002
    if name == "dit_xl_2":
        assert total == 675_129_632


def test_size_table_names_are_registered() -> None:
    names = zoo.list_models("dit*")
    for s in ("s", "b", "l", "xl"):
        for p in (2, 4, 8):
            assert f"dit_{s}_{p}" in names
    with torch.device("meta"):
        m = zoo.create_model("dit_b_4")
    assert (m.cfg.depth, m.cfg.hidden_size, m.cfg.num_heads, m.cfg.patch_size) == (12, 768, 12, 4)


def test_sincos_positions_layout() -> None:
    table = sincos_2d(8, 3)  # grid 3x3, D = 8: [sin(col w), cos(col w), sin(row w), cos(row w)], w = [1, 1e-2]
    token = 1 * 3 + 2  # row 1, col 2 (row-major)
    expected = torch.tensor([2.0, 0.02, 1.0, 0.01])
    expected = torch.cat([expected[:2].sin(), expected[:2].cos(), expected[2:].sin(), expected[2:].cos()])
    torch.testing.assert_close(table[token], expected)


def tiny(**kw) -> DiT:
    return zoo.create_model("dit_tiny", input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, **kw)


def test_init_is_identity_and_output_zero() -> None:
    m = tiny()
    x = torch.randn(2, 1, 8, 8)
    assert m(x, torch.tensor([1, 2]), torch.tensor([0, 1])).abs().max() == 0


def test_moe_forward_backward_aux_loss_and_routing_stats() -> None:
    torch.manual_seed(0)
    m = tiny(num_experts=4, top_k=2, expert_hidden=32, shared_hidden=16).train()
    with torch.no_grad():
        m.final_layer.linear.weight.normal_(0, 0.1)
        for b in m.blocks:
            b.adaLN_modulation[1].weight.normal_(0, 0.1)
    out = m(torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 5, 9]))
    aux = m.aux_loss()
    assert aux.item() > 0
    (out.square().mean() + aux).backward()
    assert m.blocks[0].moe.router.weight.grad.abs().sum() > 0
    assert m.blocks[0].moe.experts.gate_up_proj.grad.abs().sum() > 0
    stats = m.routing_stats()
    assert sorted(stats) == [0, 1]
    assert stats[0].top_k_indices.shape == (3 * 16, 2)  # every token of every image, both choices
    # Weights are raw softmax probabilities (no renormalisation): the top-2 sum is < 1.
    assert (stats[0].top_k_weights.sum(-1) < 1).all()


def test_three_channel_guidance_and_full_guidance() -> None:
    torch.manual_seed(0)
    m = zoo.create_model("dit_tiny", input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, in_channels=4).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), torch.tensor([1, 2])
    cond, uncond = m(x, t, y), m(x, t, torch.full_like(y, 10))
    out3 = m.forward_with_cfg(x, t, y, 4.0, guidance_channels=3)
    torch.testing.assert_close(out3[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out3[:, 3:], cond[:, 3:], atol=1e-6, rtol=1e-6)
    out4 = m.forward_with_cfg(x, t, y, 4.0)
    torch.testing.assert_close(out4[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5, rtol=1e-5)


def test_label_dropout_only_in_training() -> None:
    m = tiny(class_dropout_prob=0.5)
    y = torch.zeros(2000, dtype=torch.long)
    with torch.no_grad():
        m.y_embedder.embedding_table.weight.copy_(torch.arange(11).float()[:, None].expand(11, 32))
    m.train()
    dropped = (m.y_embedder(y)[:, 0] == 10).float().mean().item()
    assert 0.45 < dropped < 0.55
    m.eval()
    assert (m.y_embedder(y)[:, 0] == 0).all()


def test_sample_api_shapes_and_determinism() -> None:
    m = tiny(objective="rectified_flow")
    a = m.sample(torch.tensor([0, 1]), num_steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = m.sample(torch.tensor([0, 1]), num_steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b)
    d = tiny().sample(torch.tensor([3]), num_steps=4, sampler="ddim")
    assert d.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="does not fit"):
        tiny().sample(torch.tensor([3]), num_steps=4, sampler="euler")


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by patch_size 4"):
        DiTConfig(input_size=18, patch_size=4)
    m = tiny()
    with pytest.raises(ValueError, match=r"unknown class id\(s\) \[12\].*0\.\.9"):
        m(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([12]))
    with pytest.raises(ValueError, match=r"unknown class id\(s\) \[-1\]"):
        m.sample(torch.tensor([-1]), num_steps=2)
    with pytest.raises(ValueError, match="spatial size"):
        m(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([1]))
