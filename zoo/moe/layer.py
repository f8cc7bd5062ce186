"""The MoE layer: config, router, stacked experts, sparse dispatch, losses and statistics.

Routing follows the common recipe: a bias-free fp32 linear gate, softmax over all experts, top-k, optional
renormalisation of the k weights (Mixtral, DeepSpeed top-2) or not (DiT-MoE, Qwen2-MoE ``norm_topk_prob=False``),
optional scaling (DeepSeek ``routed_scaling_factor``) and optional group-limited top-k (DeepSeek-V2).

Dispatch sorts the (token, choice) pairs by expert with a stable sort over a *choice-major* order (all first choices,
then all second choices, ...), so within an expert first choices come first. That order is exactly DeepSpeed/GShard's
capacity priority: in capacity mode a pair is kept when its rank inside its expert's segment is below the capacity.
Experts then run as grouped matmuls over contiguous segments, and results are scaled and summed back with
``index_add_``. There is no dense one-hot dispatch tensor anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.moe.grouped import grouped_linear, sorted_experts_ffn, sorted_lora_experts_ffn

__all__ = ["MoEConfig", "MoE", "MoEStats", "ExpertLoRAExperts", "ACTIVATIONS", "capacity_for", "collect_aux_loss", "moe_layers"]

ExpertType = Literal["swiglu", "gelu"]
BalanceLoss = Literal["top1", "topk"]


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_new(x: Tensor) -> Tensor:
    # The explicit tanh formula of transformers' NewGELUActivation (Phi, GPT-2), kept op-for-op so that upcycled
    # experts reproduce the dense model bit-for-bit rather than to ~1e-7.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


# Activation names as transformers' ACT2FN spells them, each computed the way that class computes it.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_tanh": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
}


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    """One MoE layer's settings (see the package docstring for what each family uses).

    Attributes:
        hidden_size: model width d (input and output of the layer).
        expert_hidden_size: width h of one routed expert before the fine-grained split.
        num_experts: routed experts E before the fine-grained split.
        top_k: experts per token k before the fine-grained split, 1 <= k <= E.
        expert_type: "swiglu" (gate/up/down without biases) or "gelu" (fc1/fc2 with biases; any ``activation``).
        activation: the expert nonlinearity, a name from ``ACTIVATIONS`` (None: "silu" for swiglu, "gelu" for gelu).
        normalize_top_k: renormalise the kept top-k weights to sum to 1.
        routed_scaling: factor on the routed weights (DeepSeek ``routed_scaling_factor``).
        num_groups, topk_groups: DeepSeek-V2 group-limited routing (experts split into groups, top groups kept).
        capacity_factor: None for dropless; otherwise the training capacity factor (DeepSpeed/GShard semantics).
        eval_capacity_factor: the factor in eval mode (None: same as ``capacity_factor``).
        min_capacity: lower bound on the per-expert capacity.
        num_shared_experts: experts every token uses, fused into one MLP of width ``shared_expert_hidden_size``.
        shared_expert_hidden_size: width of that fused shared MLP (None: num_shared_experts * expert_hidden_size).
        shared_expert_gate: scale the shared output by sigmoid(x @ w) (Qwen2-MoE).
        balance_loss: "top1" (f from the first choice; DeepSpeed / MoE-LLaVA), "topk" (f from all k choices,
            normalised by T*k; DiT-MoE; Mixtral's loss equals k times it) or None.
        balance_loss_coef, z_loss_coef: weights of the balance and router z-losses in ``aux_loss``.
        router_jitter: multiplicative uniform noise on the router input in training (Switch Transformer).
        second_choice_noise: add Gumbel noise to the logits when picking choices 2..k in training (DeepSpeed top-2).
        lora_rank: > 0 turns the experts into LoRA experts: one frozen base FFN shared by all experts plus
            per-expert LoRA A/B of this rank on each of its projections (MixLoRA, Uni-MoE stage 3).
        lora_alpha: LoRA scale numerator; the delta is (lora_alpha / lora_rank) * B @ A.
        lora_shared_base: True: one frozen base FFN shared by all LoRA experts (MixLoRA); False: every expert has
            its own frozen FFN plus its own LoRA (Uni-MoE, whose experts start from different stage-2 FFNs).
        lora_dropout: dropout on the LoRA branch's input (PEFT's ``lora_dropout``); per-expert bases only.
        granularity: fine-grained split m: each expert becomes m experts of width h/m, and m*k are activated.
        router_init_std: None keeps nn.Linear's default init for the router; otherwise N(0, std).
        check_finite: raise on non-finite router logits (one reduction per forward).
        impl: expert execution. "fused": one autograd function that gathers, runs the segment GEMMs into
            preallocated buffers and index_adds (fastest on CPU); "grouped": autograd over ``grouped_linear``, which
            uses ``torch._grouped_mm`` on CUDA; "auto": fused on CPU, grouped on CUDA (LoRA experts use the fused
            path only while their base FFN is frozen).
    """

    hidden_size: int
    expert_hidden_size: int
    num_experts: int = 8
    top_k: int = 2
    expert_type: ExpertType = "swiglu"
    activation: str | None = None
    normalize_top_k: bool = True
    routed_scaling: float = 1.0
    num_groups: int | None = None
    topk_groups: int | None = None
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 4
    num_shared_experts: int = 0
    shared_expert_hidden_size: int | None = None
    shared_expert_gate: bool = False
    balance_loss: BalanceLoss | None = "topk"
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    router_jitter: float = 0.0
    second_choice_noise: bool = False
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_shared_base: bool = True
    lora_dropout: float = 0.0
    granularity: int = 1
    router_init_std: float | None = None
    check_finite: bool = True
    impl: Literal["auto", "fused", "grouped"] = "auto"

    # Effective (post-split) routed sizes.
    @property
    def routed_experts(self) -> int:
        return self.num_experts * self.granularity

    @property
    def routed_top_k(self) -> int:
        return self.top_k * self.granularity

    @property
    def routed_hidden_size(self) -> int:
        return self.expert_hidden_size // self.granularity

    @property
    def act_name(self) -> str:
        if self.activation is not None:
            return self.activation
        return "silu" if self.expert_type == "swiglu" else "gelu"

    @property
    def shared_hidden_size(self) -> int:
        if self.shared_expert_hidden_size is not None:
            return self.shared_expert_hidden_size
        return self.num_shared_experts * self.expert_hidden_size

    def validate(self, where: str = "MoE") -> None:
        """Raise ValueError naming ``where`` (the layer) and the bad field."""

        def bad(msg: str) -> ValueError:
            return ValueError(f"{where}: {msg}")

        if self.hidden_size <= 0 or self.expert_hidden_size <= 0:
            raise bad(f"hidden_size={self.hidden_size} and expert_hidden_size={self.expert_hidden_size} must be > 0")
        if self.expert_type not in ("swiglu", "gelu"):
            raise bad(f"expert_type={self.expert_type!r} is unknown; use 'swiglu' or 'gelu'")
        if self.act_name not in ACTIVATIONS:
            raise bad(f"activation={self.act_name!r} is unknown; choose from {sorted(ACTIVATIONS)}")
        if self.granularity < 1 or self.expert_hidden_size % self.granularity:
            raise bad(f"granularity={self.granularity} must be >= 1 and divide expert_hidden_size={self.expert_hidden_size}")
        if self.num_experts < 1:
            raise bad(f"num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise bad(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if (self.num_groups is None) != (self.topk_groups is None):
            raise bad("num_groups and topk_groups must be set together")
        if self.num_groups is not None:
            assert self.topk_groups is not None
            if self.routed_experts % self.num_groups or not 1 <= self.topk_groups <= self.num_groups:
                raise bad(f"num_groups={self.num_groups} must divide {self.routed_experts} experts and "
                          f"1 <= topk_groups={self.topk_groups} <= num_groups")
            if self.topk_groups * (self.routed_experts // self.num_groups) < self.routed_top_k:
                raise bad(f"topk_groups={self.topk_groups} groups hold fewer experts than top_k={self.routed_top_k}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise bad(f"{name}={value} must be > 0 (or None for dropless)")
        if self.eval_capacity_factor is not None and self.capacity_factor is None:
            raise bad("eval_capacity_factor is set but capacity_factor is None (dropless); set both or neither")
        if self.lora_dropout and (self.lora_shared_base or not self.lora_rank):
            raise bad(f"lora_dropout={self.lora_dropout} needs LoRA experts with per-expert bases "
                      "(lora_rank > 0, lora_shared_base=False)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.balance_loss not in (None, "top1", "topk"):
            raise bad(f"balance_loss={self.balance_loss!r} is unknown; use 'top1', 'topk' or None")
        if self.num_shared_experts < 0 or (self.shared_expert_gate and self.shared_hidden_size == 0):
            raise bad("shared_expert_gate needs shared experts (num_shared_experts or shared_expert_hidden_size)")
        if self.lora_rank < 0:
            raise bad(f"lora_rank={self.lora_rank} must be >= 0")
        if self.lora_rank and self.granularity != 1:
            raise bad("LoRA experts and granularity > 1 cannot be combined")
        if self.impl not in ("auto", "fused", "grouped"):
            raise bad(f"impl={self.impl!r} is unknown; use 'auto', 'fused' or 'grouped'")
        if not 0.0 <= self.router_jitter < 1.0:
            raise bad(f"router_jitter={self.router_jitter} must be in [0, 1)")


def capacity_for(num_tokens: int, num_experts: int, top_k: int, factor: float, min_capacity: int) -> int:
    """Per-expert capacity as DeepSpeed computes it: ceil(T / E * factor * k), at least ``min_capacity``.

    DeepSpeed evaluates the product in float32 (its factor is a float32 tensor); we do the same so that edge cases
    round identically.
    """
    cap = torch.ceil(torch.tensor(num_tokens / num_experts, dtype=torch.float32)
                     * torch.tensor(factor * top_k, dtype=torch.float32))
    return max(int(cap.item()), min_capacity)


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class MoEStats:
    """Routing statistics of the last forward (all detached).

    Attributes:
        top_k_indices: ``[T, k]`` chosen experts per token, first choice first (for routing-analysis plots).
        top_k_weights: ``[T, k]`` combine weights actually used (0 where the pair was dropped).
        expert_load: ``[E]`` pairs processed by each expert (after dropping).
        expert_demand: ``[E]`` pairs routed to each expert (before dropping).
        drop_rate: fraction of (token, choice) pairs dropped by the capacity limit (0 when dropless).
        dropped_tokens: tokens whose every choice was dropped (they pass through the residual only).
        capacity: the per-expert capacity used, or None when dropless.
    """

    top_k_indices: Tensor
    top_k_weights: Tensor
    expert_load: Tensor
    expert_demand: Tensor
    drop_rate: float
    dropped_tokens: int
    capacity: int | None


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Bias-free linear gate whose weight and computation stay in fp32 whatever the model dtype."""

    def __init__(self, hidden_size: int, num_experts: int, init_std: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init_std is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        else:
            nn.init.normal_(self.weight, std=self.init_std)

    def _apply(self, fn, recurse=True):  # keep fp32 under model.to(bfloat16) / .half(); devices still move
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.float(), self.weight)


class Experts(nn.Module):
    """E stacked FFN experts.

    swiglu: ``gate_up_proj [E, 2h, d]`` (rows 0..h-1 gate, h..2h-1 up, as transformers v5), ``down_proj [E, d, h]``.
    gelu:   ``fc1_weight [E, h, d]``, ``fc1_bias [E, h]``, ``fc2_weight [E, d, h]``, ``fc2_bias [E, d]``.
    """

    def __init__(self, cfg: MoEConfig, num_experts: int, hidden: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.expert_type = cfg.expert_type
        self.act = ACTIVATIONS[cfg.act_name]
        self.num_experts, self.hidden, self.d = num_experts, hidden, d
        if cfg.expert_type == "swiglu":
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, d))
            self.down_proj = nn.Parameter(torch.empty(num_experts, d, hidden))
        else:
            self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden, d))
            self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden))
            self.fc2_weight = nn.Parameter(torch.empty(num_experts, d, hidden))
            self.fc2_bias = nn.Parameter(torch.empty(num_experts, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Per-expert nn.Linear default init: weights and biases uniform with bound 1/sqrt(fan_in).
        d, h = self.d, self.hidden
        fan_in = {"gate_up_proj": d, "down_proj": h, "fc1_weight": d, "fc1_bias": d, "fc2_weight": h, "fc2_bias": h}
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.uniform_(-1.0 / math.sqrt(fan_in[name]), 1.0 / math.sqrt(fan_in[name]))

    def forward(self, x: Tensor, counts: list[int] | None, offsets: Tensor | None) -> Tensor:
        """``x [N, d]`` rows sorted by expert -> ``[N, d]``."""
        if self.expert_type == "swiglu":
            gate_up = grouped_linear(x, self.gate_up_proj, None, counts, offsets)
            gate, up = gate_up.chunk(2, dim=-1)
            return grouped_linear(self.act(gate) * up, self.down_proj, None, counts, offsets)
        h = self.act(grouped_linear(x, self.fc1_weight, self.fc1_bias, counts, offsets))
        return grouped_linear(h, self.fc2_weight, self.fc2_bias, counts, offsets)


class DenseFFN(nn.Module):
    """One dense FFN with transformers' names: swiglu ``gate_proj/up_proj/down_proj``; gelu ``fc1/fc2``."""

    def __init__(self, d: int, hidden: int, expert_type: ExpertType, act: str) -> None:
        super().__init__()
        self.expert_type = expert_type
        self.act = ACTIVATIONS[act]
        if expert_type == "swiglu":
            self.gate_proj = nn.Linear(d, hidden, bias=False)
            self.up_proj = nn.Linear(d, hidden, bias=False)
            self.down_proj = nn.Linear(hidden, d, bias=False)
        else:
            self.fc1 = nn.Linear(d, hidden)
            self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        if self.expert_type == "swiglu":
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


def _reset_lora(module: nn.Module, proj_names: tuple[str, ...]) -> None:
    """LoRA init of stacked ``lora_A_<p>`` / ``lora_B_<p>``: A as PEFT/loralib (kaiming_uniform(a=sqrt(5)), i.e.
    uniform with bound 1/sqrt(fan_in)), B zero, so fresh LoRA adds nothing."""
    for n in proj_names:
        a = getattr(module, f"lora_A_{n}")
        bound = 1.0 / math.sqrt(a.shape[-1])
        nn.init.uniform_(a, -bound, bound)
        nn.init.zeros_(getattr(module, f"lora_B_{n}"))


class LoRAExperts(nn.Module):
    """E LoRA experts over one frozen base FFN (MixLoRA style; Uni-MoE's own-FFN experts are ``ExpertLoRAExperts``).

    Expert e computes the base FFN with every projection W replaced by W + (alpha / r) * B_e @ A_e. The base lives in
    ``base`` (a ``DenseFFN``, frozen); LoRA weights are stacked per projection:
    swiglu: ``lora_A_gate/lora_A_up [E, r, d]``, ``lora_B_gate/lora_B_up [E, h, r]``, ``lora_A_down [E, r, h]``,
    ``lora_B_down [E, d, r]``; gelu: ``lora_A_fc1 [E, r, d]``, ``lora_B_fc1 [E, h, r]``, ``lora_A_fc2 [E, r, h]``,
    ``lora_B_fc2 [E, d, r]``. B starts at zero, so a fresh layer equals its base FFN.

    The first projections (gate/up or fc1) of the shared base run once per *token*, not once per (token, expert)
    pair; only the rank-r deltas and the second projection run per pair.
    """

    def __init__(self, cfg: MoEConfig, num_experts: int, hidden: int) -> None:
        super().__init__()
        d, r = cfg.hidden_size, cfg.lora_rank
        self.expert_type = cfg.expert_type
        self.act = ACTIVATIONS[cfg.act_name]
        self.scale = cfg.lora_alpha / r
        self.base = DenseFFN(d, hidden, cfg.expert_type, cfg.act_name)
        self.base.requires_grad_(False)
        names = ("gate", "up", "down") if cfg.expert_type == "swiglu" else ("fc1", "fc2")
        self.proj_names = names
        for n in names:
            d_in, d_out = (hidden, d) if n in ("down", "fc2") else (d, hidden)
            self.register_parameter(f"lora_A_{n}", nn.Parameter(torch.empty(num_experts, r, d_in)))
            self.register_parameter(f"lora_B_{n}", nn.Parameter(torch.zeros(num_experts, d_out, r)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_lora(self, self.proj_names)

    def _delta(self, x: Tensor, n: str, counts: list[int] | None, offsets: Tensor | None) -> Tensor:
        a = grouped_linear(x, getattr(self, f"lora_A_{n}"), None, counts, offsets)
        return grouped_linear(a, getattr(self, f"lora_B_{n}"), None, counts, offsets) * self.scale

    def forward_pairs(self, x: Tensor, token_idx: Tensor, counts: list[int] | None, offsets: Tensor | None) -> Tensor:
        """``x [T, d]`` (all tokens) and ``token_idx [N]`` (pairs sorted by expert) -> ``[N, d]`` per pair."""
        xs = x.index_select(0, token_idx)
        base = self.base
        if self.expert_type == "swiglu":
            g = base.gate_proj(x).index_select(0, token_idx) + self._delta(xs, "gate", counts, offsets)
            u = base.up_proj(x).index_select(0, token_idx) + self._delta(xs, "up", counts, offsets)
            h = self.act(g) * u
            return base.down_proj(h) + self._delta(h, "down", counts, offsets)
        h = self.act(base.fc1(x).index_select(0, token_idx) + self._delta(xs, "fc1", counts, offsets))
        return base.fc2(h) + self._delta(h, "fc2", counts, offsets)

    def fused_forward(self, x: Tensor, token_idx: Tensor, pair_w: Tensor, counts: list[int], act_name: str,
                      inv: Tensor) -> Tensor:
        """The weighted per-token sum over pairs in one autograd function (frozen base only)."""
        base = self.base
        if self.expert_type == "swiglu":
            w1 = torch.cat([base.gate_proj.weight, base.up_proj.weight])
            a1 = torch.cat([self.lora_A_gate, self.lora_A_up], dim=1)  # [E, 2r, d]
            zg, zu = torch.zeros_like(self.lora_B_gate), torch.zeros_like(self.lora_B_up)
            # block-diagonal [E, 2h, 2r]: gate rows read the first r LoRA features, up rows the last r
            b1 = torch.cat([torch.cat([self.lora_B_gate, zg], dim=2), torch.cat([zu, self.lora_B_up], dim=2)], dim=1)
            return sorted_lora_experts_ffn(x, token_idx, pair_w, a1, b1, self.lora_A_down, self.lora_B_down, w1, None,
                                           base.down_proj.weight, None, counts, True, act_name, self.act, self.scale,
                                           inv)
        return sorted_lora_experts_ffn(x, token_idx, pair_w, self.lora_A_fc1, self.lora_B_fc1, self.lora_A_fc2,
                                       self.lora_B_fc2, base.fc1.weight, base.fc1.bias, base.fc2.weight, base.fc2.bias,
                                       counts, False, act_name, self.act, self.scale, inv)


class ExpertLoRAExperts(nn.Module):
    """E experts, each its own frozen FFN plus its own LoRA (Uni-MoE's LoRA experts).

    ``base`` is an ``Experts`` (stacked per-expert weights, frozen); LoRA weights are stacked per projection with the
    same names and shapes as ``LoRAExperts`` (``lora_A_<p> [E, r, in]``, ``lora_B_<p> [E, out, r]``). Expert e
    computes its own FFN with every projection W_e replaced by W_e + (alpha / r) * B_e @ A_e; dropout (training
    only) acts on the LoRA branch's input, as PEFT's does. ``MoE.merge_lora`` folds the LoRA into plain ``Experts``.
    """

    def __init__(self, cfg: MoEConfig, num_experts: int, hidden: int) -> None:
        super().__init__()
        self.expert_type = cfg.expert_type
        self.act = ACTIVATIONS[cfg.act_name]
        self.scale = cfg.lora_alpha / cfg.lora_rank
        self.base = Experts(cfg, num_experts, hidden)
        self.base.requires_grad_(False)
        self.dropout = nn.Dropout(cfg.lora_dropout)
        self.proj_names = ("gate", "up", "down") if cfg.expert_type == "swiglu" else ("fc1", "fc2")
        d, r = cfg.hidden_size, cfg.lora_rank
        for n in self.proj_names:
            d_in, d_out = (hidden, d) if n in ("down", "fc2") else (d, hidden)
            self.register_parameter(f"lora_A_{n}", nn.Parameter(torch.empty(num_experts, r, d_in)))
            self.register_parameter(f"lora_B_{n}", nn.Parameter(torch.zeros(num_experts, d_out, r)))
        _reset_lora(self, self.proj_names)

    def _delta(self, x: Tensor, n: str, counts: list[int] | None, offsets: Tensor | None) -> Tensor:
        a = grouped_linear(self.dropout(x), getattr(self, f"lora_A_{n}"), None, counts, offsets)
        return grouped_linear(a, getattr(self, f"lora_B_{n}"), None, counts, offsets) * self.scale

    def forward(self, x: Tensor, counts: list[int] | None, offsets: Tensor | None) -> Tensor:
        """``x [N, d]`` rows sorted by expert -> ``[N, d]``."""
        b = self.base
        if self.expert_type == "swiglu":
            h = b.hidden
            gate = grouped_linear(x, b.gate_up_proj[:, :h], None, counts, offsets) + self._delta(x, "gate", counts,
                                                                                                   offsets)
            up = grouped_linear(x, b.gate_up_proj[:, h:], None, counts, offsets) + self._delta(x, "up", counts, offsets)
            hid = self.act(gate) * up
            return grouped_linear(hid, b.down_proj, None, counts, offsets) + self._delta(hid, "down", counts, offsets)
        hid = self.act(grouped_linear(x, b.fc1_weight, b.fc1_bias, counts, offsets) + self._delta(x, "fc1", counts,
                                                                                                  offsets))
        return grouped_linear(hid, b.fc2_weight, b.fc2_bias, counts, offsets) + self._delta(hid, "fc2", counts,
                                                                                           offsets)

    @torch.no_grad()
    def merged_weights(self) -> dict[str, Tensor]:
        """The ``Experts`` state dict with every LoRA delta folded in (W_e + scale * B_e @ A_e, in fp32 or wider)."""
        b = self.base

        def fold(w: Tensor, n: str) -> Tensor:
            acc = torch.promote_types(w.dtype, torch.float32)
            delta = torch.bmm(getattr(self, f"lora_B_{n}").to(acc), getattr(self, f"lora_A_{n}").to(acc))
            return (w.to(acc) + self.scale * delta).to(w.dtype)

        if self.expert_type == "swiglu":
            h = b.hidden
            return {"gate_up_proj": torch.cat([fold(b.gate_up_proj[:, :h], "gate"), fold(b.gate_up_proj[:, h:], "up")],
                                              dim=1),
                    "down_proj": fold(b.down_proj, "down")}
        return {"fc1_weight": fold(b.fc1_weight, "fc1"), "fc1_bias": b.fc1_bias.clone(),
                "fc2_weight": fold(b.fc2_weight, "fc2"), "fc2_bias": b.fc2_bias.clone()}


class MoE(nn.Module):
    """A sparse MoE FFN: ``y = MoE(cfg)(x)`` for ``x [..., d]``; a drop-in replacement for an MLP slot.

    After each forward, ``aux_loss`` holds the weighted auxiliary loss (balance + z) as a tensor in the autograd
    graph (None when both coefficients are 0 or the layer is in eval mode), and ``last_stats`` a ``MoEStats``.
    """

    def __init__(self, cfg: MoEConfig, name: str = "moe") -> None:
        super().__init__()
        cfg.validate(f"MoE layer '{name}'")
        self.cfg, self.name = cfg, name
        E, h = cfg.routed_experts, cfg.routed_hidden_size
        self.router = Router(cfg.hidden_size, E, cfg.router_init_std)
        self.experts: Experts | LoRAExperts | ExpertLoRAExperts
        if not cfg.lora_rank:
            self.experts = Experts(cfg, E, h)
        elif cfg.lora_shared_base:
            self.experts = LoRAExperts(cfg, E, h)
        else:
            self.experts = ExpertLoRAExperts(cfg, E, h)
        self.shared_expert = (
            DenseFFN(cfg.hidden_size, cfg.shared_hidden_size, cfg.expert_type, cfg.act_name)
            if cfg.shared_hidden_size else None
        )
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        self.aux_loss: Tensor | None = None
        self.last_stats: MoEStats | None = None

    def extra_repr(self) -> str:
        c = self.cfg
        mode = "dropless" if c.capacity_factor is None else f"capacity {c.capacity_factor}/{c.eval_capacity_factor}"
        return (f"name={self.name!r}, d={c.hidden_size}, experts={c.routed_experts}x{c.routed_hidden_size} "
                f"{c.expert_type}/{c.act_name}, top_k={c.routed_top_k}, {mode}, shared={c.shared_hidden_size}, "
                f"lora_rank={c.lora_rank}")

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold per-expert-base LoRA experts into plain ``Experts`` for inference (same outputs, no LoRA matmuls).

        Routers and shared experts are untouched; ``cfg`` becomes the plain-experts config (``lora_rank=0``).
        """
        ex = self.experts
        if not isinstance(ex, ExpertLoRAExperts):
            raise TypeError(f"MoE layer '{self.name}': merge_lora needs LoRA experts with per-expert bases, "
                            f"not {type(ex).__name__}")
        cfg = dataclasses.replace(self.cfg, lora_rank=0, lora_dropout=0.0, lora_shared_base=True)
        ref = ex.base.down_proj if ex.expert_type == "swiglu" else ex.base.fc2_weight
        merged = Experts(cfg, cfg.routed_experts, cfg.routed_hidden_size).to(device=ref.device, dtype=ref.dtype)
        merged.load_state_dict(ex.merged_weights())
        merged.requires_grad_(False)
        self.cfg, self.experts = cfg, merged

    # ---- routing -------------------------------------------------------------------------------------------
    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [T, d]`` -> (logits fp32 [T, E], probs fp32 [T, E], top-k indices [T, k], first choice first)."""
        cfg = self.cfg
        xr = x
        if self.training and cfg.router_jitter > 0:
            xr = x * torch.empty_like(x).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
        logits = self.router(xr)
        if cfg.check_finite and not bool(torch.isfinite(logits).all()):
            bad = (~torch.isfinite(logits)).any(-1).nonzero()[:5, 0].tolist()
            raise FloatingPointError(
                f"MoE layer '{self.name}': router logits are not finite for tokens {bad} "
                f"(input finite: {bool(torch.isfinite(x).all())}); check the layer input and the router weights")
        probs = logits.softmax(dim=-1)
        k = cfg.routed_top_k
        scores = probs
        if cfg.num_groups is not None:
            E, G = cfg.routed_experts, cfg.num_groups
            group_scores = probs.view(-1, G, E // G).amax(dim=-1)
            top_groups = group_scores.topk(cfg.topk_groups, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            scores = probs.masked_fill(~keep.repeat_interleave(E // G, dim=1), 0.0)
        if self.training and cfg.second_choice_noise and k > 1:
            # DeepSpeed top-2: the first choice is the argmax; later choices come from the logits plus Gumbel noise.
            first = scores.argmax(dim=-1, keepdim=True)
            noisy = logits + (-torch.empty_like(logits).exponential_().log())
            rest = noisy.scatter(1, first, float("-inf")).topk(k - 1, dim=-1).indices
            idx = torch.cat([first, rest], dim=1)
        else:
            idx = scores.topk(k, dim=-1).indices
        return logits, probs, idx

    def capacity(self, num_tokens: int) -> int | None:
        cfg = self.cfg
        factor = cfg.capacity_factor
        if factor is None:
            return None
        if not self.training and cfg.eval_capacity_factor is not None:
            factor = cfg.eval_capacity_factor
        return capacity_for(num_tokens, cfg.routed_experts, cfg.routed_top_k, factor, cfg.min_capacity)

    # ---- losses --------------------------------------------------------------------------------------------
    def _aux_loss(self, logits: Tensor, probs: Tensor, idx: Tensor) -> Tensor | None:
        cfg = self.cfg
        terms: list[Tensor] = []
        if cfg.balance_loss is not None and cfg.balance_loss_coef:
            E = cfg.routed_experts
            chosen = idx[:, :1] if cfg.balance_loss == "top1" else idx
            f = torch.bincount(chosen.reshape(-1), minlength=E).to(probs.dtype) / chosen.numel()
            terms.append(cfg.balance_loss_coef * E * (f * probs.mean(dim=0)).sum())
        if cfg.z_loss_coef:
            terms.append(cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean())
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])

    # ---- forward -------------------------------------------------------------------------------------------
    def _forward_no_tokens(self, x2: Tensor, logits: Tensor, idx: Tensor) -> Tensor:
        """An empty batch (zero tokens): an empty output, zero aux loss and stats with nothing routed.

        The aux loss is ``0 * logits.sum()`` rather than None so the router still takes part in the backward
        pass (DDP expects every rank to produce gradients for the same parameters).
        """
        y = torch.zeros_like(x2)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x2)
        cfg = self.cfg
        has_loss = bool(cfg.balance_loss is not None and cfg.balance_loss_coef) or bool(cfg.z_loss_coef)
        self.aux_loss = logits.sum() * 0.0 if self.training and has_loss else None
        zeros = torch.zeros(cfg.routed_experts, dtype=torch.long, device=x2.device)
        cap = self.capacity(0)
        self.last_stats = MoEStats(
            top_k_indices=idx.detach(), top_k_weights=torch.zeros(idx.shape, device=x2.device), expert_load=zeros,
            expert_demand=zeros, drop_rate=0.0, dropped_tokens=0, capacity=cap,
        )
        return y

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        if x.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"MoE layer '{self.name}': input has hidden size {x.shape[-1]} (shape {tuple(x.shape)}) but the "
                f"layer was built for hidden_size={cfg.hidden_size}")
        shape = x.shape
        x2 = x.reshape(-1, cfg.hidden_size)
        T, k, E = x2.shape[0], cfg.routed_top_k, cfg.routed_experts

        logits, probs, idx = self.route(x2)
        if T == 0:
            return self._forward_no_tokens(x2, logits, idx).reshape(shape)
        top_p = probs.gather(1, idx)  # [T, k] fp32

        # Stable sort of the choice-major flattening: inside each expert, all first choices precede second choices,
        # and tokens keep their order, which is the GShard/DeepSpeed capacity priority.
        flat_expert = idx.t().reshape(-1)
        sorted_expert, order = torch.sort(flat_expert, stable=True)
        demand = torch.bincount(flat_expert, minlength=E)
        cap = self.capacity(T)
        if cap is None:
            keep_tk = None
            counts_t = demand
        else:
            starts = torch.cumsum(demand, 0) - demand
            rank = torch.arange(order.numel(), device=x.device) - starts[sorted_expert]
            kept = rank < cap
            order = order[kept]
            counts_t = demand.clamp(max=cap)
            keep_flat = torch.zeros(T * k, dtype=torch.bool, device=x.device)
            keep_flat[order] = True
            keep_tk = keep_flat.view(k, T).t()
            top_p = top_p * keep_tk

        weights = top_p
        if cfg.normalize_top_k:
            denom = weights.sum(dim=-1, keepdim=True)
            weights = weights / denom.clamp(min=torch.finfo(weights.dtype).eps)
        if cfg.routed_scaling != 1.0:
            weights = weights * cfg.routed_scaling

        token_idx = order % T
        pair_w = weights.t().reshape(-1)[order]
        # inverse of the sort: choice-major slot -> row among the kept sorted pairs (dropped pairs -> the extra
        # zero row at index N)
        inv = torch.full((T * k,), order.numel(), dtype=order.dtype, device=x.device)
        inv[order] = torch.arange(order.numel(), dtype=order.dtype, device=x.device)
        counts = counts_t.tolist()
        offsets = torch.cumsum(counts_t, 0).to(torch.int32) if x2.is_cuda else None

        ex = self.experts
        fused = cfg.impl == "fused" or (cfg.impl == "auto" and not x2.is_cuda)
        if isinstance(ex, Experts) and fused:
            swiglu = ex.expert_type == "swiglu"
            y = sorted_experts_ffn(
                x2, token_idx, pair_w.to(x2.dtype),
                ex.gate_up_proj if swiglu else ex.fc1_weight, None if swiglu else ex.fc1_bias,
                ex.down_proj if swiglu else ex.fc2_weight, None if swiglu else ex.fc2_bias,
                counts, swiglu, cfg.act_name, ex.act, inv)
        elif isinstance(ex, LoRAExperts) and fused and not any(p.requires_grad for p in ex.base.parameters()):
            y = ex.fused_forward(x2, token_idx, pair_w.to(x2.dtype), counts, cfg.act_name, inv)
        else:
            if isinstance(ex, LoRAExperts):
                out = ex.forward_pairs(x2, token_idx, counts, offsets)
            else:
                out = ex(x2.index_select(0, token_idx), counts, offsets)
            out = out * pair_w.to(out.dtype).unsqueeze(-1)
            y = torch.zeros_like(x2).index_add_(0, token_idx, out)

        if self.shared_expert is not None:
            s = self.shared_expert(x2)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x2)) * s
            y = y + s

        self.aux_loss = self._aux_loss(logits, probs, idx) if self.training else None
        with torch.no_grad():
            n_pairs = T * k
            kept_pairs = int(order.numel())
            self.last_stats = MoEStats(
                top_k_indices=idx.detach(),
                top_k_weights=weights.detach(),
                expert_load=counts_t.detach(),
                expert_demand=demand.detach(),
                drop_rate=(n_pairs - kept_pairs) / max(n_pairs, 1),
                dropped_tokens=0 if keep_tk is None else int((~keep_tk.any(dim=1)).sum()),
                capacity=cap,
            )
        return y.reshape(shape)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """``(qualified name, layer)`` for every MoE layer in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def collect_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the last forward's ``aux_loss`` over all MoE layers of ``model`` (0 when there is none).

    MoE-LLaVA adds ``router_aux_loss_coef * sum over layers of l_aux`` to the LM loss; with ``balance_loss_coef`` set
    to that coefficient, this sum is that term.
    """
    losses = [m.aux_loss for _, m in moe_layers(model) if m.aux_loss is not None]
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()
