"""Building ``MoE`` layers from other modules, the one way to do so: a dense FFN -> MoE (upcycling, ``from_dense``),
a transformers MoE block -> the same layer (``from_hf``), and every chosen FFN of a causal LM (``upcycle_causal_lm``).

Structure is recognised from modules and their types, never from names of paths or models:
* a SwiGLU FFN has ``gate_proj``/``up_proj``/``down_proj`` linears (LLaMA, Qwen2, Mistral, StableLM-2, DiT-MoE) or a
  fused ``gate_up_proj`` + ``down_proj`` (Phi-3, gate rows first);
* a GELU FFN has ``fc1``/``fc2`` linears with biases (Phi, CLIP, timm / DiT ``Mlp``);
* the activation comes from the module's ``act_fn`` / ``activation_fn`` / ``act`` attribute, by class.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from zoo.moe.layer import LoRAExperts, MoE, MoEConfig
from zoo.moe.settings import MoESettings

__all__ = [
    "MoESettings",
    "from_dense",
    "from_hf",
    "upcycle_causal_lm",
    "moe_layer_indices",
    "activation_name",
    "dense_ffn_spec",
]


def activation_name(act: object, where: str = "FFN") -> str:
    """The ``ACTIVATIONS`` name of an activation module (torch or transformers), by its class."""
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    try:
        from transformers import activations as hf_act
    except ImportError:  # transformers is optional for plain torch FFNs
        hf_act = None
    if hf_act is not None:
        table: list[tuple[type, str]] = [
            (hf_act.NewGELUActivation, "gelu_new"),
            (hf_act.FastGELUActivation, "gelu_fast"),
            (hf_act.QuickGELUActivation, "quick_gelu"),
            (hf_act.SiLUActivation, "silu"),
        ]
        for cls, n in table:
            if type(act) is cls:
                return n
        if type(act) is hf_act.GELUTanh:
            # the C kernel by default; the python-formula variant equals gelu_new up to rounding
            return "gelu_tanh" if isinstance(getattr(act, "act", None), functools.partial) else "gelu_new"
        if type(act) is hf_act.GELUActivation:
            return "gelu"
    raise ValueError(f"{where}: activation {act!r} ({type(act).__name__}) is not supported; pass activation=<name> "
                     "with a name from zoo.moe.ACTIVATIONS if it computes one of them")


def dense_ffn_spec(ffn: nn.Module, where: str = "FFN") -> dict:
    """Describe a dense FFN: ``{expert_type, activation, d, h, weights: {...}}`` with weights as [out, in] tensors."""
    act = next((getattr(ffn, a) for a in ("act_fn", "activation_fn", "act") if hasattr(ffn, a)), None)
    lin = {n: getattr(ffn, n) for n in ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2")
           if isinstance(getattr(ffn, n, None), nn.Linear)}
    if {"gate_proj", "up_proj", "down_proj"} <= lin.keys() or {"gate_up_proj", "down_proj"} <= lin.keys():
        if any(m.bias is not None for m in lin.values()):
            raise ValueError(f"{where}: SwiGLU projections with biases are not supported (experts are bias-free)")
        if "gate_up_proj" in lin:
            gate, up = lin["gate_up_proj"].weight.chunk(2, dim=0)
        else:
            gate, up = lin["gate_proj"].weight, lin["up_proj"].weight
        down = lin["down_proj"].weight
        return {"expert_type": "swiglu", "activation": activation_name(act, where), "d": down.shape[0],
                "h": down.shape[1], "weights": {"gate": gate, "up": up, "down": down}}
    if {"fc1", "fc2"} <= lin.keys():
        fc1, fc2 = lin["fc1"], lin["fc2"]
        norm = getattr(ffn, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            raise ValueError(f"{where}: an FFN with a hidden norm ({type(norm).__name__}) is not supported")
        zero = torch.zeros
        return {"expert_type": "gelu", "activation": activation_name(act, where), "d": fc1.in_features,
                "h": fc1.out_features, "weights": {
                    "fc1_w": fc1.weight, "fc1_b": fc1.bias if fc1.bias is not None else zero(fc1.out_features),
                    "fc2_w": fc2.weight, "fc2_b": fc2.bias if fc2.bias is not None else zero(fc2.out_features)}}
    raise TypeError(f"{where}: {type(ffn).__name__} is not a recognised dense FFN; expected nn.Linear children "
                    "gate_proj/up_proj/down_proj, gate_up_proj/down_proj, or fc1/fc2")


@torch.no_grad()
def from_dense(ffn: nn.Module, num_experts: int, top_k: int, name: str = "moe", **overrides) -> MoE:
    """Upcycle a dense FFN: every expert (or, with ``lora_rank``, the frozen base) is a copy of ``ffn``.

    With ``granularity=m`` the dense hidden units are split into m consecutive chunks: expert ``e*m + j`` gets chunk
    ``j`` of the copy. With identical experts, ``normalize_top_k=True`` and no dropping, the output equals ``ffn(x)``
    (up to float summation order). The router is freshly initialised (``router_init_std`` chooses how).
    """
    spec = dense_ffn_spec(ffn, where=f"from_dense for '{name}'")
    cfg_kwargs = dict(hidden_size=spec["d"], expert_hidden_size=spec["h"], num_experts=num_experts, top_k=top_k,
                      expert_type=spec["expert_type"], activation=spec["activation"])
    cfg_kwargs.update(overrides)
    cfg = MoEConfig(**cfg_kwargs)
    if cfg.expert_type != spec["expert_type"] or cfg.hidden_size != spec["d"] or cfg.expert_hidden_size != spec["h"]:
        raise ValueError(f"from_dense for '{name}': overrides change the expert shape/type of the dense FFN")
    ref = next(ffn.parameters())
    moe = MoE(cfg, name=name).to(device=ref.device, dtype=ref.dtype)
    w = spec["weights"]
    ex = moe.experts
    if isinstance(ex, LoRAExperts):
        base = ex.base
        if cfg.expert_type == "swiglu":
            base.gate_proj.weight.copy_(w["gate"])
            base.up_proj.weight.copy_(w["up"])
            base.down_proj.weight.copy_(w["down"])
        else:
            base.fc1.weight.copy_(w["fc1_w"])
            base.fc1.bias.copy_(w["fc1_b"])
            base.fc2.weight.copy_(w["fc2_w"])
            base.fc2.bias.copy_(w["fc2_b"])
        return moe
    m, hs = cfg.granularity, cfg.routed_hidden_size
    for e in range(cfg.routed_experts):
        j = e % m
        rows = slice(j * hs, (j + 1) * hs)
        if cfg.expert_type == "swiglu":
            ex.gate_up_proj[e, :hs].copy_(w["gate"][rows])
            ex.gate_up_proj[e, hs:].copy_(w["up"][rows])
            ex.down_proj[e].copy_(w["down"][:, rows])
        else:
            ex.fc1_weight[e].copy_(w["fc1_w"][rows])
            ex.fc1_bias[e].copy_(w["fc1_b"][rows])
            ex.fc2_weight[e].copy_(w["fc2_w"][:, rows])
            # the fc2 bias is added once per chunk; split it so the m chunks of one copy add up to the dense bias
            ex.fc2_bias[e].copy_(w["fc2_b"] / m)
    return moe


def _hf_classes() -> dict[str, type]:
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds2
    from transformers.models.mixtral import modeling_mixtral as mixtral
    from transformers.models.qwen2_moe import modeling_qwen2_moe as qwen2_moe

    return {"mixtral": mixtral.MixtralSparseMoeBlock, "qwen2_moe": qwen2_moe.Qwen2MoeSparseMoeBlock,
            "deepseek_v2": ds2.DeepseekV2Moe}


@torch.no_grad()
def from_hf(block: nn.Module, name: str = "moe", **overrides) -> MoE:
    """Convert a transformers MoE block into an equivalent ``MoE`` (weights copied, same routing math).

    Supported: ``MixtralSparseMoeBlock`` (softmax, top-k, renormalised; its ``router_jitter_noise`` becomes our
    router-input jitter, whereas transformers also jitters the experts' input), ``Qwen2MoeSparseMoeBlock`` (shared
    expert with a sigmoid gate; ``norm_topk_prob``) and ``DeepseekV2Moe`` (greedy or group-limited top-k, no
    renormalisation, ``routed_scaling_factor``, shared experts). ``overrides`` set other MoEConfig fields (e.g. the
    balance loss, whose transformers counterpart lives in the model, not the block).
    """
    classes = _hf_classes()
    kind = next((k for k, cls in classes.items() if isinstance(block, cls)), None)
    if kind is None:
        raise TypeError(f"from_hf for '{name}': {type(block).__name__} is not supported; expected one of "
                        f"{[c.__name__ for c in classes.values()]}")
    gate, experts = block.gate, block.experts
    E, two_h, d = experts.gate_up_proj.shape
    kw: dict = dict(hidden_size=d, expert_hidden_size=two_h // 2, num_experts=E, top_k=gate.top_k,
                    expert_type="swiglu", activation=activation_name(experts.act_fn, f"from_hf '{name}' experts"),
                    balance_loss=None)
    shared = None
    if kind == "mixtral":
        kw.update(normalize_top_k=True, router_jitter=float(block.jitter_noise))
    elif kind == "qwen2_moe":
        shared = block.shared_expert
        kw.update(normalize_top_k=bool(gate.norm_topk_prob), shared_expert_gate=True)
    else:
        shared = block.shared_experts
        kw.update(normalize_top_k=False, routed_scaling=float(gate.routed_scaling_factor))
        if gate.topk_method == "group_limited_greedy":
            kw.update(num_groups=int(gate.num_group), topk_groups=int(gate.topk_group))
        elif gate.topk_method != "greedy":
            raise ValueError(f"from_hf for '{name}': topk_method={gate.topk_method!r} is not supported")
    if shared is not None:
        spec = dense_ffn_spec(shared, where=f"from_hf for '{name}' shared expert")
        if spec["expert_type"] != "swiglu" or spec["activation"] != kw["activation"]:
            raise ValueError(f"from_hf for '{name}': the shared expert must be a SwiGLU with the experts' activation")
        kw.update(shared_expert_hidden_size=spec["h"])
    kw.update(overrides)
    moe = MoE(MoEConfig(**kw), name=name).to(device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype)
    moe.router.weight.copy_(gate.weight.float())
    moe.experts.gate_up_proj.copy_(experts.gate_up_proj)
    moe.experts.down_proj.copy_(experts.down_proj)
    if shared is not None:
        w = spec["weights"]
        moe.shared_expert.gate_proj.weight.copy_(w["gate"])
        moe.shared_expert.up_proj.weight.copy_(w["up"])
        moe.shared_expert.down_proj.weight.copy_(w["down"])
    if kind == "qwen2_moe":
        moe.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
    return moe


def moe_layer_indices(num_layers: int, mode: str | Sequence[int]) -> list[int]:
    """Decoder layers that get MoE: MoE-LLaVA's modes "sparse" (0, 2, 4, ...), "dense" (all), "first_half",
    "second_half", or an explicit list of indices."""
    if not isinstance(mode, str):
        idx = sorted(set(int(i) for i in mode))
        bad = [i for i in idx if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"MoE layer indices {bad} are outside 0..{num_layers - 1}")
        return idx
    modes = {"sparse": list(range(0, num_layers, 2)), "dense": list(range(num_layers)),
             "first_half": list(range(num_layers // 2)), "second_half": list(range(num_layers // 2, num_layers))}
    if mode not in modes:
        raise ValueError(f"unknown MoE layer mode {mode!r}; use one of {sorted(modes)} or a list of indices")
    return modes[mode]


def upcycle_causal_lm(model: nn.Module, num_experts: int, top_k: int, layers: str | Sequence[int] = "sparse",
                      **overrides) -> list[int]:
    """Replace the MLP of the chosen decoder layers of a transformers causal LM by ``from_dense`` copies.

    The decoder layers are ``model.get_decoder().layers`` (LLaMA, Qwen2, Mistral, Phi, StableLM, ...), each with an
    ``mlp`` attribute. The model keeps working with ``generate``; read the aux loss with ``collect_aux_loss(model)``.
    Returns the indices that were converted.
    """
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    blocks = getattr(decoder, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"upcycle_causal_lm: {type(model).__name__} has no get_decoder().layers ModuleList")
    idx = moe_layer_indices(len(blocks), layers)
    for i in idx:
        mlp = getattr(blocks[i], "mlp", None)
        if mlp is None:
            raise TypeError(f"upcycle_causal_lm: decoder layer {i} ({type(blocks[i]).__name__}) has no .mlp")
        if isinstance(mlp, MoE):
            raise ValueError(f"upcycle_causal_lm: decoder layer {i} is already an MoE layer")
        blocks[i].mlp = from_dense(mlp, num_experts=num_experts, top_k=top_k, name=f"layers.{i}.mlp", **overrides)
    return idx
