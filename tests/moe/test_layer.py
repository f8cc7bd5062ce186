"""MoE layer: routing, dispatch against a naive reference, DeepSpeed capacity semantics, losses, stats, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.moe import ACTIVATIONS, MoE, MoEConfig, capacity_for, collect_aux_loss, grouped_linear, moe_layers

torch.set_num_threads(1)


def _naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: every expert on every token, then a per-token weighted sum of the chosen ones (dropless)."""
    cfg = moe.cfg
    x2 = x.reshape(-1, cfg.hidden_size)
    probs = F.linear(x2.float(), moe.router.weight).softmax(-1)
    w, idx = probs.topk(cfg.routed_top_k, dim=-1)
    if cfg.normalize_top_k:
        w = w / w.sum(-1, keepdim=True)
    w = w * cfg.routed_scaling
    ex = moe.experts
    act = ACTIVATIONS[cfg.act_name]
    outs = []
    for e in range(cfg.routed_experts):
        if cfg.expert_type == "swiglu":
            g, u = F.linear(x2, ex.gate_up_proj[e]).chunk(2, -1)
            outs.append(F.linear(act(g) * u, ex.down_proj[e]))
        else:
            outs.append(F.linear(act(F.linear(x2, ex.fc1_weight[e], ex.fc1_bias[e])), ex.fc2_weight[e], ex.fc2_bias[e]))
    outs = torch.stack(outs, 1)  # [T, E, d]
    y = (outs.gather(1, idx[..., None].expand(-1, -1, x2.shape[1])) * w[..., None].to(x.dtype)).sum(1)
    if moe.shared_expert is not None:
        s = moe.shared_expert(x2)
        if moe.shared_expert_gate is not None:
            s = torch.sigmoid(moe.shared_expert_gate(x2)) * s
        y = y + s
    return y.reshape(x.shape)


@pytest.mark.parametrize(
    "kw",
    [
        dict(expert_type="swiglu"),
        dict(expert_type="gelu", activation="gelu_new"),
        dict(expert_type="swiglu", normalize_top_k=False, num_shared_experts=2, shared_expert_hidden_size=24),
        dict(expert_type="swiglu", shared_expert_gate=True, num_shared_experts=1, top_k=3),
        dict(expert_type="swiglu", granularity=2, routed_scaling=2.0),
        dict(expert_type="gelu", activation="relu", top_k=1, num_experts=3),
        dict(expert_type="swiglu", top_k=5, num_experts=5),
        dict(expert_type="gelu", activation="gelu_tanh"),
    ],
)
@pytest.mark.parametrize("impl", ["fused", "grouped"])
def test_dropless_matches_naive_reference(kw, impl):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, expert_hidden_size=24, impl=impl, **{"num_experts": 5, "top_k": 2, **kw})
    moe = MoE(cfg, name="t")
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    moe.double()
    y = moe(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _naive_moe(moe, x_ref)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *moe.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [x_ref, *moe.parameters()], g, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_linear_segments_and_empty_experts(bias):
    torch.manual_seed(0)
    counts = [3, 0, 5, 0, 1]
    x = torch.randn(sum(counts), 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(lambda x, w, *b: grouped_linear(x, w, b[0] if b else None, counts),
                                    (x, w, *([b] if bias else [])))
    y = grouped_linear(x, w, b, counts)
    ref = torch.cat([x[0:3] @ w[0].T, x[3:8] @ w[2].T, x[8:9] @ w[4].T])
    if bias:
        ref = ref + torch.cat([b[0].expand(3, 4), b[2].expand(5, 4), b[4].expand(1, 4)])
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert w.grad[1].abs().sum() == 0 and w.grad[3].abs().sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# Capacity mode: DeepSpeed / GShard semantics
# ---------------------------------------------------------------------------------------------------------------


def _deepspeed_top2_combine(logits: torch.Tensor, capacity: int) -> torch.Tensor:
    """DeepSpeed's top2gating combine weights [T, E], re-derived from its published algorithm (one-hot masks,
    cumsum locations, second choices offset by the first choices' totals, drop at >= capacity, renormalise)."""
    gates = logits.softmax(-1)
    E = gates.shape[1]
    idx1 = gates.argmax(-1)
    mask1 = F.one_hot(idx1, E)
    idx2 = logits.masked_fill(mask1.bool(), float("-inf")).argmax(-1)
    mask2 = F.one_hot(idx2, E)
    loc1 = torch.cumsum(mask1, 0) - 1
    loc2 = torch.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdim=True)
    mask1 = mask1 * (loc1 < capacity)
    mask2 = mask2 * (loc2 < capacity)
    g1 = (gates * mask1).sum(-1)
    g2 = (gates * mask2).sum(-1)
    denom = (g1 + g2).clamp(min=torch.finfo(gates.dtype).eps)
    return (g1 / denom)[:, None] * mask1 + (g2 / denom)[:, None] * mask2


def _top1_combine(logits: torch.Tensor, capacity: int) -> torch.Tensor:
    gates = logits.softmax(-1)
    mask1 = F.one_hot(gates.argmax(-1), gates.shape[1])
    mask1 = mask1 * ((torch.cumsum(mask1, 0) - 1) < capacity)
    return gates * mask1


def _combine_weights(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Our layer's combine weights as a dense [T, E] matrix, read from last_stats."""
    moe(x)
    s = moe.last_stats
    T, E = x.shape[0], moe.cfg.routed_experts
    return torch.zeros(T, E, dtype=s.top_k_weights.dtype).scatter_add_(1, s.top_k_indices, s.top_k_weights)


def _identity_router_moe(E: int, k: int, **kw) -> MoE:
    """Router weight = identity, so the input rows are the router logits."""
    kw = {"min_capacity": 0, **kw}
    moe = MoE(MoEConfig(hidden_size=E, expert_hidden_size=4, num_experts=E, top_k=k, **kw), name="cap")
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E))
    return moe


def test_capacity_hand_worked_top2():
    # T=8, E=4, k=2, factor 0.5: capacity = ceil(8 / 4 * 0.5 * 2) = 2.
    first = [0, 0, 0, 1, 1, 2, 0, 3]
    second = [1, 1, 2, 0, 0, 0, 3, 2]
    logits = torch.full((8, 4), -4.0)
    for t, (a, b) in enumerate(zip(first, second)):
        logits[t, a], logits[t, b] = 2.0, 1.0
    moe = _identity_router_moe(4, 2, capacity_factor=0.5, eval_capacity_factor=0.5)
    combine = _combine_weights(moe, logits)
    s = moe.last_stats
    assert s.capacity == 2
    # Expert 0 keeps the first two first choices (tokens 0, 1); tokens 2 and 6 lose their first choice, and the
    # second choices of tokens 3, 4, 5 come after all first choices, so they are dropped too. Expert 1 keeps first
    # choices 3, 4 and drops second choices 0, 1. Expert 2 keeps token 5 (first) then token 2 (second) and drops 7.
    # Expert 3 keeps token 7 (first) and token 6 (second). A token left with one choice gets weight 1 on it.
    expected = torch.zeros(8, 4)
    for t, e in enumerate([0, 0, 2, 1, 1, 2, 3, 3]):
        expected[t, e] = 1.0
    torch.testing.assert_close(combine, expected)
    torch.testing.assert_close(combine, _deepspeed_top2_combine(logits, 2))
    assert s.expert_load.tolist() == [2, 2, 2, 2] and s.expert_demand.tolist() == [7, 4, 3, 2]
    assert s.drop_rate == pytest.approx(8 / 16) and s.dropped_tokens == 0


def test_capacity_fully_dropped_token_outputs_zero_and_passes_residual():
    # T=4, E=2, k=1, factor 0.5: capacity = ceil(4 / 2 * 0.5) = 1; all tokens prefer expert 0.
    logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    moe = _identity_router_moe(2, 1, capacity_factor=0.5, normalize_top_k=False)
    moe.train()
    x = logits.clone().requires_grad_(True)
    y = moe(x)
    s = moe.last_stats
    assert s.capacity == 1 and s.dropped_tokens == 2
    assert torch.all(y[1:3] == 0) and torch.any(y[0] != 0) and torch.any(y[3] != 0)
    torch.testing.assert_close(_combine_weights(moe, logits), _top1_combine(logits, 1))
    # A dropped token still gets gradient through the residual of the surrounding block, never from the experts.
    (x + moe(x)).sum().backward()
    torch.testing.assert_close(x.grad[1:3], torch.ones(2, 2))


@pytest.mark.parametrize("T,E,factor,min_cap", [(37, 4, 1.5, 0), (64, 8, 1.0, 4), (50, 4, 0.25, 0), (9, 3, 2.0, 0)])
def test_capacity_matches_deepspeed_top2_on_random_logits(T, E, factor, min_cap):
    torch.manual_seed(T)
    moe = _identity_router_moe(E, 2, capacity_factor=factor, min_capacity=min_cap)
    logits = torch.randn(T, E) * 2
    cap = capacity_for(T, E, 2, factor, min_cap)
    assert cap == max(math.ceil(T / E * factor * 2), min_cap)
    torch.testing.assert_close(_combine_weights(moe, logits), _deepspeed_top2_combine(logits, cap))
    assert moe.last_stats.capacity == cap


def test_train_and_eval_capacity_factors():
    moe = _identity_router_moe(4, 2, capacity_factor=1.5, eval_capacity_factor=2.0)
    moe.train()
    moe(torch.randn(40, 4))
    assert moe.last_stats.capacity == 30  # ceil(40 / 4 * 1.5 * 2)
    moe.eval()
    moe(torch.randn(40, 4))
    assert moe.last_stats.capacity == 40  # = T: nothing can drop with E=4, k=2, factor 2 (MoE-LLaVA eval)
    assert moe.last_stats.drop_rate == 0.0


@pytest.mark.parametrize("impl", ["fused", "grouped"])
def test_capacity_output_uses_kept_renormalised_weights(impl):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, expert_hidden_size=12, num_experts=4, top_k=2, expert_type="gelu",
                        capacity_factor=0.5, min_capacity=0, impl=impl), name="cap")
    x = torch.randn(20, 8)
    y = moe(x)
    combine = torch.zeros(20, 4).scatter_add_(1, moe.last_stats.top_k_indices, moe.last_stats.top_k_weights)
    torch.testing.assert_close(combine, _deepspeed_top2_combine(F.linear(x, moe.router.weight), moe.last_stats.capacity))
    ex = moe.experts
    outs = torch.stack([F.linear(F.gelu(F.linear(x, ex.fc1_weight[e], ex.fc1_bias[e])), ex.fc2_weight[e], ex.fc2_bias[e])
                        for e in range(4)], 1)
    torch.testing.assert_close(y, (combine[..., None] * outs).sum(1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Losses and statistics
# ---------------------------------------------------------------------------------------------------------------


def test_balance_losses_and_z_loss_formulas():
    torch.manual_seed(0)
    x = torch.randn(30, 8)
    base = dict(hidden_size=8, expert_hidden_size=8, num_experts=4, top_k=2)
    m1 = MoE(MoEConfig(**base, balance_loss="top1", balance_loss_coef=0.5), name="a")
    mk = MoE(MoEConfig(**base, balance_loss="topk", balance_loss_coef=0.5), name="b")
    mz = MoE(MoEConfig(**base, balance_loss=None, z_loss_coef=0.1), name="c")
    for m in (mk, mz):
        m.router.weight.data.copy_(m1.router.weight)
    for m in (m1, mk, mz):
        m(x)
    logits = F.linear(x, m1.router.weight)
    probs = logits.softmax(-1)
    idx = probs.topk(2, -1).indices
    p_mean = probs.mean(0)
    f1 = F.one_hot(idx[:, 0], 4).float().mean(0)
    # DeepSpeed: l_aux = mean_e(me * ce) * E^2
    torch.testing.assert_close(m1.aux_loss, 0.5 * (p_mean * f1).mean() * 16)
    # DiT-MoE: ce over all T*k picks, times E, dot mean probs
    fk = F.one_hot(idx.reshape(-1), 4).float().mean(0)
    torch.testing.assert_close(mk.aux_loss, 0.5 * ((fk * 4) * p_mean).sum())
    torch.testing.assert_close(mz.aux_loss, 0.1 * torch.logsumexp(logits, -1).pow(2).mean())


def test_topk_balance_loss_is_mixtral_loss_over_k():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, expert_hidden_size=8, num_experts=6, top_k=2, balance_loss="topk",
                        balance_loss_coef=1.0), name="m")
    x = torch.randn(40, 8)
    moe(x)
    hf = load_balancing_loss_func((F.linear(x, moe.router.weight),), num_experts=6, top_k=2)
    torch.testing.assert_close(moe.aux_loss * 2, hf)


def test_collect_aux_loss_sums_layers_and_is_none_in_eval():
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[MoE(MoEConfig(hidden_size=8, expert_hidden_size=8, num_experts=4, top_k=2,
                                              balance_loss="top1"), name=f"l{i}") for i in range(3)])
    x = torch.randn(10, 8, requires_grad=True)
    net(x)
    total = collect_aux_loss(net)
    torch.testing.assert_close(total, sum(m.aux_loss for _, m in moe_layers(net)))
    total.backward()
    assert all(m.router.weight.grad is not None for m in net)
    net.eval()
    net(x)
    assert all(m.aux_loss is None for m in net) and collect_aux_loss(net).item() == 0.0


def test_stats_content():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, expert_hidden_size=8, num_experts=4, top_k=2), name="s")
    moe(torch.randn(2, 5, 8))
    s = moe.last_stats
    assert s.top_k_indices.shape == (10, 2) and s.top_k_weights.shape == (10, 2)
    assert int(s.expert_load.sum()) == 20 and s.drop_rate == 0.0 and s.capacity is None
    torch.testing.assert_close(s.top_k_weights.sum(-1), torch.ones(10))
    assert torch.equal(s.expert_load, torch.bincount(s.top_k_indices.reshape(-1), minlength=4))


def test_noise_only_in_training():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, expert_hidden_size=8, num_experts=4, top_k=2, router_jitter=0.3,
                        second_choice_noise=True), name="n")
    x = torch.randn(64, 8)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x))
    moe.train()
    first = [moe(x) for _ in range(2)]
    assert not torch.equal(first[0], first[1])


def test_router_stays_fp32_and_bf16_runs():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, expert_hidden_size=8, num_experts=4, top_k=2, num_shared_experts=1), name="b")
    moe.to(torch.bfloat16)
    assert moe.router.weight.dtype == torch.float32 and moe.experts.gate_up_proj.dtype == torch.bfloat16
    x = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    y = moe(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and moe.router.weight.grad.dtype == torch.float32


def test_lora_experts_train_only_router_and_lora():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, expert_hidden_size=12, num_experts=4, top_k=2, lora_rank=2, lora_alpha=4),
              name="lora")
    trainable = sorted(n for n, p in moe.named_parameters() if p.requires_grad)
    assert trainable == sorted(["router.weight"] + [f"experts.lora_{ab}_{p}" for ab in "AB" for p in ("gate", "up", "down")])
    x = torch.randn(10, 8)
    torch.testing.assert_close(moe(x), moe.experts.base(x))  # B = 0 at init: the layer equals its base FFN
    # With non-zero B, expert e computes the base FFN with W + (alpha / r) B_e A_e in every projection.
    for n in ("gate", "up", "down"):
        torch.nn.init.normal_(getattr(moe.experts, f"lora_B_{n}"))
    y = moe(x)
    ex, b = moe.experts, moe.experts.base
    outs = []
    for e in range(4):
        w = {n: getattr(b, f"{n}_proj").weight + 2.0 * getattr(ex, f"lora_B_{n}")[e] @ getattr(ex, f"lora_A_{n}")[e]
             for n in ("gate", "up", "down")}
        outs.append(F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"]))
    s = moe.last_stats
    combine = torch.zeros(10, 4).scatter_add_(1, s.top_k_indices, s.top_k_weights)
    torch.testing.assert_close(y, (combine[..., None] * torch.stack(outs, 1)).sum(1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_errors_name_layer_and_value():
    moe = MoE(MoEConfig(hidden_size=8, expert_hidden_size=8, num_experts=4, top_k=2), name="layers.3.mlp")
    with pytest.raises(ValueError, match=r"layers\.3\.mlp.*hidden size 6.*hidden_size=8"):
        moe(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"'layers\.1\.mlp'.*top_k=5.*num_experts=4"):
        MoE(MoEConfig(hidden_size=8, expert_hidden_size=8, num_experts=4, top_k=5), name="layers.1.mlp")
    with pytest.raises(ValueError, match=r"'blk'.*activation='geluu'"):
        MoE(MoEConfig(hidden_size=8, expert_hidden_size=8, activation="geluu"), name="blk")
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layers\.3\.mlp.*tokens \[1\]"):
        moe(x)
    with pytest.raises(ValueError, match="capacity_factor=0"):
        MoE(MoEConfig(hidden_size=8, expert_hidden_size=8, capacity_factor=0.0))


@pytest.mark.parametrize("expert_type,act", [("swiglu", "silu"), ("gelu", "gelu_new"), ("gelu", "gelu")])
@pytest.mark.parametrize("capacity", [None, 0.75])
def test_lora_fused_matches_grouped_path(expert_type, act, capacity):
    torch.manual_seed(0)
    kw = dict(hidden_size=8, expert_hidden_size=12, num_experts=4, top_k=2, lora_rank=3, lora_alpha=6,
              expert_type=expert_type, activation=act, capacity_factor=capacity, min_capacity=0)
    fused = MoE(MoEConfig(**kw, impl="fused"), name="f").double()
    ref = MoE(MoEConfig(**kw, impl="grouped"), name="g").double()
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(std=0.5)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = fused(x), ref(x2)
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    for (n, p), (_, p2) in zip(fused.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (p2.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p2.grad, msg=n)


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_unused_expert_gets_zero_gradient(expert_type):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=4, expert_hidden_size=6, num_experts=4, top_k=2, expert_type=expert_type,
                        impl="fused"), name="z")
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    x = torch.randn(10, 4)
    x[:, 3] = -50.0  # expert 3 is never chosen
    moe(x).sum().backward()
    assert int(moe.last_stats.expert_load[3]) == 0
    for p in moe.experts.parameters():
        assert torch.all(p.grad[3] == 0) and torch.isfinite(p.grad).all()
        assert p.grad[:3].abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_backend_matches_segment_loop(bias):
    # torch._grouped_mm is the CUDA backend; torch 2.14 also runs it on CPU (16-byte aligned strides), which lets the
    # offsets/bias handling be checked here.
    torch.manual_seed(0)
    counts = [5, 0, 7, 4]
    x = torch.randn(sum(counts), 8, requires_grad=True)
    w = torch.randn(4, 12, 8, requires_grad=True)
    b = torch.randn(4, 12, requires_grad=True) if bias else None
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    y = grouped_linear(x, w, b, offsets=offsets, use_grouped_mm=True)
    ref = grouped_linear(x, w, b, counts, use_grouped_mm=False)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), g)
    grads_ref = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_inference_paths_match_training_path(threads, expert_type):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, expert_hidden_size=12, num_experts=4, top_k=2, expert_type=expert_type,
                        capacity_factor=0.75, min_capacity=0), name="inf")
    x = torch.randn(30, 8)
    y_train_path = moe(x)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            y = moe(x)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y, y_train_path, rtol=1e-6, atol=1e-6)
