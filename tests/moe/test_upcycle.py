"""Upcycling (from_dense, upcycle_causal_lm) and import of transformers MoE blocks (from_hf), with parity checks."""

from __future__ import annotations

import pytest
import timm.layers
import torch
from torch import nn

from zoo.moe import (
    collect_aux_loss,
    from_dense,
    from_hf,
    moe_layer_indices,
    moe_layers,
    upcycle_causal_lm,
)

torch.set_num_threads(1)


def _randomise(module: nn.Module, std: float = 0.2) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=std)
    return module


def _dense_ffns() -> dict[str, nn.Module]:
    from transformers import LlamaConfig, PhiConfig, Qwen2Config, StableLmConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi.modeling_phi import PhiMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    from transformers.models.stablelm.modeling_stablelm import StableLmMLP

    small = dict(hidden_size=16, intermediate_size=40, num_attention_heads=4)
    return {
        "llama": LlamaMLP(LlamaConfig(**small)),
        "phi": PhiMLP(PhiConfig(**small)),  # fc1/fc2 with biases, gelu_new
        "qwen2": Qwen2MLP(Qwen2Config(**small)),
        "stablelm": StableLmMLP(StableLmConfig(**small)),
        "timm_dit": timm.layers.Mlp(16, 40, act_layer=lambda: nn.GELU(approximate="tanh")),  # DiT's MLP
        "timm_gelu": timm.layers.Mlp(16, 40),
    }


@pytest.mark.parametrize("name", ["llama", "phi", "qwen2", "stablelm", "timm_dit", "timm_gelu"])
@pytest.mark.parametrize("extra", [{}, {"capacity_factor": 8.0}, {"lora_rank": 4}])
def test_from_dense_equals_dense_ffn(name, extra):
    torch.manual_seed(0)
    ffn = _randomise(_dense_ffns()[name])
    moe = from_dense(ffn, num_experts=4, top_k=2, name=f"{name}.mlp", **extra)
    x = torch.randn(3, 9, 16)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-6, atol=1e-6)
    expected_type = "gelu" if name in ("phi", "timm_dit", "timm_gelu") else "swiglu"
    assert moe.cfg.expert_type == expected_type
    assert moe.cfg.act_name == {"phi": "gelu_new", "timm_dit": "gelu_tanh", "timm_gelu": "gelu"}.get(name, "silu")


def test_from_dense_fine_grained_split_covers_the_dense_ffn():
    torch.manual_seed(0)
    ffn = _randomise(_dense_ffns()["phi"])
    # One copy split into m = 4 chunks, all 4 active: with a uniform router each gets 1/4, times routed_scaling 4,
    # so the chunks (fc2 bias split evenly between them) add up to the dense FFN.
    moe = from_dense(ffn, num_experts=1, top_k=1, granularity=4, routed_scaling=4.0)
    assert (moe.cfg.routed_experts, moe.cfg.routed_top_k, moe.cfg.routed_hidden_size) == (4, 4, 10)
    moe.router.weight.data.zero_()
    x = torch.randn(5, 16)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-5, atol=1e-6)


def test_from_dense_rejects_unknown_ffn():
    with pytest.raises(TypeError, match="not a recognised dense FFN"):
        from_dense(nn.Sequential(nn.Linear(4, 4)), num_experts=2, top_k=1)


# ---------------------------------------------------------------------------------------------------------------
# transformers blocks
# ---------------------------------------------------------------------------------------------------------------


def _hf_blocks() -> dict[str, nn.Module]:
    from transformers import DeepseekV2Config, MixtralConfig, Qwen2MoeConfig
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    ds = dict(hidden_size=32, moe_intermediate_size=16, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=3,
              routed_scaling_factor=2.5, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
              kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    return {
        "mixtral": MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=6,
                                                       num_experts_per_tok=2, **heads)),
        "qwen2_moe": Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
            hidden_size=32, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
            num_experts_per_tok=3, norm_topk_prob=False, **heads)),
        "qwen2_moe_norm": Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
            hidden_size=32, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=True, **heads)),
        "deepseek_v2": DeepseekV2Moe(DeepseekV2Config(**ds)),
        "deepseek_v2_group": DeepseekV2Moe(DeepseekV2Config(**ds, topk_method="group_limited_greedy", n_group=4,
                                                            topk_group=2)),
    }


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen2_moe_norm", "deepseek_v2", "deepseek_v2_group"])
def test_from_hf_parity_outputs_and_input_grads(name):
    torch.manual_seed(0)
    block = _randomise(_hf_blocks()[name])
    moe = from_hf(block, name=name)
    for seed in range(2):
        torch.manual_seed(seed)
        x = torch.randn(2, 13, 32, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y_hf, y = block(x), moe(x2)
        torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        y_hf.backward(g)
        y.backward(g)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    # expert weight gradients agree too
    torch.testing.assert_close(moe.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad, rtol=1e-4, atol=1e-5)


def test_from_hf_rejects_other_modules():
    with pytest.raises(TypeError, match="not supported"):
        from_hf(nn.Linear(3, 3))


# ---------------------------------------------------------------------------------------------------------------
# Causal LM upcycling
# ---------------------------------------------------------------------------------------------------------------


def _tiny_lm(kind: str) -> nn.Module:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PhiConfig,
        PhiForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=64)
    if kind == "phi":
        return PhiForCausalLM(PhiConfig(**common)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2)).eval()
    return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("kind", ["llama", "phi", "qwen2"])
def test_upcycle_causal_lm_keeps_logits_and_generates(kind):
    torch.manual_seed(0)
    lm = _tiny_lm(kind)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        dense_logits = lm(ids).logits
        dense_gen = lm.generate(ids, max_new_tokens=5, do_sample=False)
    done = upcycle_causal_lm(lm, num_experts=4, top_k=2, layers="sparse", balance_loss="top1",
                             capacity_factor=1.5, eval_capacity_factor=2.0)
    assert done == [0, 2]
    assert [n for n, _ in moe_layers(lm)] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, dense_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(lm.generate(ids, max_new_tokens=5, do_sample=False), dense_gen)
    lm.train()
    out = lm(ids, labels=ids)
    aux = collect_aux_loss(lm)
    assert aux.item() > 0
    (out.loss + aux).backward()
    assert lm.model.layers[0].mlp.router.weight.grad is not None


def test_moe_layer_indices_modes():
    assert moe_layer_indices(6, "sparse") == [0, 2, 4]
    assert moe_layer_indices(6, "second_half") == [3, 4, 5]
    assert moe_layer_indices(6, [5, 1]) == [1, 5]
    with pytest.raises(ValueError, match="outside"):
        moe_layer_indices(6, [6])
