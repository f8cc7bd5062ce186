"""One mixture-of-experts core for every family (MoE-LLaVA, Uni-MoE, DiT-MoE, DeepSeekMoE-style models).

Usage::

    from zoo.moe import MoE, MoEConfig, collect_aux_loss, from_dense, from_hf, moe_layers, upcycle_causal_lm

    cfg = MoEConfig(hidden_size=512, expert_hidden_size=1024, num_experts=8, top_k=2)   # SwiGLU, dropless
    moe = MoE(cfg, name="layers.3.mlp")
    y = moe(x)                      # x [..., 512] -> y [..., 512]; drops into an MLP slot
    loss = task_loss + collect_aux_loss(model)   # sum of every MoE layer's weighted aux loss (training mode)
    moe.last_stats                  # MoEStats: top_k_indices [T, k], top_k_weights, expert_load [E], drop_rate, ...

    # Building from other modules (zoo.moe.upcycle, the one place that does it):
    from_dense(hf_mlp_or_timm_mlp, num_experts=4, top_k=2, capacity_factor=1.5, ...)   # upcycling
    from_hf(mixtral_or_qwen2moe_or_deepseekv2_block)                              # exact import
    upcycle_causal_lm(hf_causal_lm, num_experts=4, top_k=2, layers="sparse")       # every other layer

Family settings:

* MoE-LLaVA (DeepSpeed top-2): ``expert_type="gelu", activation="gelu_new"`` (Phi-2) or SwiGLU (StableLM),
  ``num_experts=4, top_k=2, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0, normalize_top_k=True,
  balance_loss="top1", balance_loss_coef=0.01`` (optionally ``second_choice_noise=True`` for DeepSpeed's Gumbel
  second choice in training).
* MixLoRA: ``lora_rank=8, lora_alpha=16`` (frozen base FFN shared by all experts, per-expert LoRA),
  ``balance_loss=None``.
* Uni-MoE: ``lora_rank=8, lora_alpha=16, lora_dropout=0.05, lora_shared_base=False`` (every expert its own frozen
  FFN, from the stage-2 modality fine-tunes, plus its own LoRA; ``MoE.merge_lora`` folds it for inference),
  Mixtral routing (``balance_loss=None``) or DeepSpeed top-2 (``balance_loss="top1"``) for the 8-expert model.
* DiT-MoE: SwiGLU, ``normalize_top_k=False``, ``num_shared_experts=2`` with ``shared_expert_hidden_size=2*D``,
  ``balance_loss="topk"`` (f counted over all T*k choices, times E, as DiT-MoE's code), ``balance_loss_coef=0.01``.
* DeepSeek-V2 / Qwen2-MoE: ``routed_scaling``, ``num_groups``/``topk_groups``, ``shared_expert_gate=True``,
  ``granularity`` (fine-grained split of each expert into m narrower ones, m*k active).

Parameter names and shapes (E = routed experts after the fine-grained split, h = their width, d = hidden size):

* ``router.weight [E, d]`` (fp32 always; bias-free)
* SwiGLU experts: ``experts.gate_up_proj [E, 2h, d]`` (rows 0..h-1 = gate_proj, h..2h-1 = up_proj, as transformers
  v5) and ``experts.down_proj [E, d, h]``
* GELU experts: ``experts.fc1_weight [E, h, d]``, ``experts.fc1_bias [E, h]``, ``experts.fc2_weight [E, d, h]``,
  ``experts.fc2_bias [E, d]``
* LoRA experts: frozen ``experts.base.{gate_proj,up_proj,down_proj}.weight`` (or ``experts.base.fc1/fc2``) plus
  ``experts.lora_A_<p> [E, r, in]`` and ``experts.lora_B_<p> [E, out, r]`` for p in gate/up/down (or fc1/fc2); with
  per-expert bases the frozen part is ``experts.base.gate_up_proj`` / ``experts.base.down_proj`` (stacked, as above)
* shared experts: ``shared_expert.{gate_proj,up_proj,down_proj}.weight`` (SwiGLU) or ``shared_expert.fc1/fc2``
  (GELU), ``shared_expert_gate.weight [1, d]``

Semantics: router logits in fp32, softmax over all E, top-k (first choice first). Capacity mode follows DeepSpeed /
GShard: capacity = max(ceil(T / E * factor * k), min_capacity) with the train or eval factor; first choices have
priority over second choices, then token order; the kept weights are renormalised (if ``normalize_top_k``); a token
whose every choice is dropped gets 0 from the routed experts (plus any shared expert) and passes via the residual.
``aux_loss`` = balance_loss_coef * E * sum_i f_i P_i + z_loss_coef * mean(logsumexp(logits)^2), computed in training
mode only.

Execution (``MoEConfig.impl``): pairs are stable-sorted by expert (choice-major, which is also the capacity priority).
On CPU the default "fused" path is one autograd function per layer: a gather, one GEMM per expert segment written
into a preallocated buffer, whole-buffer activations, and an inverse-permutation gather + k-way add to combine
(``index_add_`` is slow with several CPU threads), with a hand-written backward. On CUDA the "grouped" path runs
``torch._grouped_mm`` (SM80+) under autograd. LoRA experts have their own fused path in which the frozen base's first
projection runs once per token. ``python -m eval.bench moe`` measures all of this against a dense SwiGLU floor and
transformers' Mixtral block.

Differences from the originals worth knowing: DeepSpeed's top-1 gate uses random token selection (RTS) for its
capacity priority by default, ours uses token order; transformers' Mixtral jitter multiplies the experts' input too,
ours jitters only the router input; DeepSpeed's Gumbel second choice is opt-in (``second_choice_noise``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zoo.moe.grouped import grouped_linear
    from zoo.moe.layer import (
        ACTIVATIONS,
        MoE,
        MoEConfig,
        MoEStats,
        capacity_for,
        collect_aux_loss,
        moe_layers,
    )
    from zoo.moe.settings import MoESettings
    from zoo.moe.upcycle import from_dense, from_hf, moe_layer_indices, upcycle_causal_lm

# Name -> the submodule that defines it, imported on first access (PEP 562), so that importing a light
# submodule (the recipe validator imports zoo.moe.settings) does not load torch.
_LAZY = {
    "grouped_linear": "zoo.moe.grouped",
    "ACTIVATIONS": "zoo.moe.layer",
    "MoE": "zoo.moe.layer",
    "MoEConfig": "zoo.moe.layer",
    "MoEStats": "zoo.moe.layer",
    "capacity_for": "zoo.moe.layer",
    "collect_aux_loss": "zoo.moe.layer",
    "moe_layers": "zoo.moe.layer",
    "MoESettings": "zoo.moe.settings",
    "from_dense": "zoo.moe.upcycle",
    "from_hf": "zoo.moe.upcycle",
    "moe_layer_indices": "zoo.moe.upcycle",
    "upcycle_causal_lm": "zoo.moe.upcycle",
}

__all__ = [
    "grouped_linear",
    "ACTIVATIONS",
    "MoE",
    "MoEConfig",
    "MoEStats",
    "capacity_for",
    "collect_aux_loss",
    "moe_layers",
    "MoESettings",
    "from_dense",
    "from_hf",
    "moe_layer_indices",
    "upcycle_causal_lm",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
