"""DiT (Peebles & Xie, 2023) and DiT-MoE (Fei et al., 2024): class-conditional diffusion transformers.

Written from the facts in ``shared/reference/dit_moe.md`` (no upstream code copied). The state dict of ``DiT`` uses
the official DiT key names (``x_embedder``, ``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks.N.attn.qkv``,
``blocks.N.mlp.fc1``, ``blocks.N.adaLN_modulation.1``, ``final_layer``), so released DiT ``.pt`` files load without
renaming; DiT-MoE checkpoints (``blocks.N.moe.*`` and, for XL/G, ``attn.Wqkv``/``out_proj``) go through
``checkpoint_filter_fn``. The MoE feed-forward is ``zoo.moe.MoE`` (SwiGLU routed experts, a shared expert, top-k
without renormalisation, expert-level balance loss).

Sections: layers, model, checkpoint filter, size table, registered names (``DiTConfig`` is in ``zoo.models.dit_config``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.checkpoint import load_state_dict_strict
from zoo.models.dit_config import DiTConfig
from zoo.moe import MoE, MoEConfig, collect_aux_loss
from zoo.registry import register_model

__all__ = [
    "DiTConfig",
    "DiT",
    "checkpoint_filter_fn",
    "load_official_checkpoint",
    "unwrap_training_state",
    "count_params",
    "DIT_SIZES",
    "DIT_MOE_VARIANTS",
]


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[sin(pos * w), cos(pos * w)] with w_m = 10000^(-m / (dim/2)); float64 like the original."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.reshape(-1, 1).to(torch.float64) * omega
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed (grid*grid, dim) table: first half encodes the column index, second half the row index."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = p, flattened row-major into (N, T, D)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.input_size = cfg.input_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"DiT input has spatial size {tuple(x.shape[-2:])} but the model is built for "
                f"{self.input_size}x{self.input_size} (patch {self.patch_size})"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """256 frequencies [cos, sin] -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def frequencies(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return F.pad(emb, (0, dim % 2))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra null row (index num_classes) when label dropout is on."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: Tensor, force_drop: Tensor | None = None) -> Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        if force_drop is not None:
            labels = torch.where(force_drop.bool(), torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Fused-qkv multi-head self-attention; rows of ``qkv`` are [q; k; v], each head-major (timm layout)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # DiT-MoE's flash variant: affine LayerNorm over each head's q and k (eps 1e-6).
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """The dense DiT MLP: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_moe(cfg: DiTConfig, index: int) -> nn.Module:
    """The DiT-MoE feed-forward from the shared MoE core: SwiGLU routed experts (4D wide by default), one fused
    shared SwiGLU (num_shared_experts * D wide), softmax top-k without renormalisation, dropless, expert-level
    balance loss over all k choices."""
    return MoE(
        MoEConfig(
            hidden_size=cfg.hidden_size,
            expert_hidden_size=cfg.expert_hidden or int(cfg.mlp_ratio * cfg.hidden_size),
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            expert_type="swiglu",
            normalize_top_k=False,
            capacity_factor=None,
            num_shared_experts=1 if cfg.num_shared_experts else 0,
            shared_expert_hidden_size=cfg.shared_hidden or cfg.num_shared_experts * cfg.hidden_size,
            balance_loss="topk",
            balance_loss_coef=cfg.aux_loss_alpha,
        ),
        name=f"blocks.{index}.moe",
    )


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate_msa * attn(mod(LN x)); x += gate_mlp * ffn(mod(LN x))."""

    def __init__(self, cfg: DiTConfig, index: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.is_moe = cfg.is_moe_block(index)
        if self.is_moe:
            self.moe = build_moe(cfg, index)
        else:
            self.mlp = Mlp(d, int(cfg.mlp_ratio * d))
        # Chunks in order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def ffn(self, h: Tensor) -> Tensor:
        return self.moe(h) if self.is_moe else self.mlp(h)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.ffn(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Class-conditional diffusion transformer; ``forward(x, t, y)`` -> (N, out_channels, H, W)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        # Fixed, saved in the state dict (the official checkpoints carry it), never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2, cfg.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The DiT init: xavier Linears, sin-cos positions, N(0, .02) embeddings, zeroed adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.pos_embed.copy_(sincos_2d(self.cfg.hidden_size, self.cfg.grid_size).unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        for block in self.blocks:
            if block.is_moe:
                # Official experts are nn.Linear layers with xavier init; ours are stacked [E, out, in] tensors.
                experts = block.moe.experts
                bound = math.sqrt(6.0 / (experts.hidden + experts.d))
                nn.init.uniform_(experts.gate_up_proj, -bound, bound)
                nn.init.uniform_(experts.down_proj, -bound, bound)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p*p*C) with channel fastest -> (N, C, H, W)."""
        p, c, g = self.cfg.patch_size, self.cfg.out_channels, self.cfg.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def check_labels(self, y: Tensor) -> None:
        """Class ids must be in 0..num_classes-1, or the null class when the model has one."""
        top = self.cfg.num_classes + (1 if self.cfg.class_dropout_prob > 0 else 0)
        bad = (y < 0) | (y >= top)
        if bad.any():
            vals = sorted(set(y[bad].tolist()))[:10]
            null = f" (null class {self.cfg.num_classes} for guidance)" if top > self.cfg.num_classes else ""
            raise ValueError(f"unknown class id(s) {vals}: this DiT knows classes 0..{self.cfg.num_classes - 1}{null}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.check_labels(y)
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, guidance_channels: int | None = None) -> Tensor:
        """Classifier-free guidance in one batched pass over [x; x] with labels [y; null].

        ``guidance_channels=3`` reproduces the original DiT sampler, which guides only eps channels 0..2 (a GLIDE
        leftover kept for the published FIDs); ``None`` guides every prediction channel (in_channels of them).
        The remaining prediction channels and the variance channels are the conditional output.
        """
        n = x.shape[0]
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.cfg.null_class)]))
        cond, uncond = out[:n], out[n:]
        k = self.cfg.in_channels if guidance_channels is None else guidance_channels
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    @torch.no_grad()
    def sample(
        self,
        class_labels: Tensor,
        num_steps: int = 250,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        guidance_channels: int | None = None,
    ) -> Tensor:
        """Generate (N, in_channels, H, W) samples for ``class_labels``; pixel-space models return [-1, 1].

        ``sampler``: "ddpm" (respaced ancestral), "ddim" or "euler" (rectified flow); default from the objective.
        """
        from zoo.diffusion import sample as diffusion_sample

        return diffusion_sample(
            self,
            class_labels,
            num_steps=num_steps,
            cfg_scale=cfg_scale,
            generator=generator,
            sampler=sampler,
            guidance_channels=guidance_channels,
        )

    def aux_loss(self) -> Tensor:
        """Sum of the MoE layers' balance losses from the last training forward (0 for dense models)."""
        if not any(b.is_moe for b in self.blocks):
            return self.pos_embed.new_zeros(())
        return collect_aux_loss(self)

    def routing_stats(self) -> dict[int, Any]:
        """Per MoE block index, the MoE core's ``last_stats`` (chosen experts per token) from the last forward."""
        return {i: getattr(b.moe, "last_stats", None) for i, b in enumerate(self.blocks) if b.is_moe}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, activated) parameters; activated counts top_k of num_experts routed experts per MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    if not isinstance(model, DiT) or model.cfg.num_experts == 0:
        return total, total
    cfg = model.cfg
    inactive = 0
    for block in model.blocks:
        if block.is_moe:
            routed = sum(p.numel() for n, p in block.moe.named_parameters() if n.startswith("experts"))
            inactive += routed * (cfg.num_experts - cfg.top_k) // cfg.num_experts
    return total, total - inactive


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint filter: official DiT / DiT-MoE state dicts -> ours
# ----------------------------------------------------------------------------------------------------------------


def unwrap_training_state(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Accept a raw state dict or the training wrappers {"ema"|"model"|"module": ...}; strip "module." prefixes."""
    for key in ("ema", "model", "module", "state_dict"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def checkpoint_filter_fn(state: Mapping[str, Any], model: DiT) -> dict[str, Tensor]:
    """Map an official DiT or DiT-MoE state dict onto ``model``'s names.

    DiT keys are already ours. DiT-MoE: ``attn.Wqkv``/``attn.out_proj`` (flash variant) -> ``attn.qkv``/``attn.proj``,
    and ``moe.gate.weight``, ``moe.experts.i.{gate,up,down}_proj.weight``, ``moe.shared_experts.*`` -> the MoE
    core's ``router.weight``, stacked ``experts.*`` and ``shared_expert.*``.
    """
    state = unwrap_training_state(state)
    out: dict[str, Tensor] = {}
    moe_groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.replace(".attn.Wqkv.", ".attn.qkv.").replace(".attn.out_proj.", ".attn.proj.")
        if ".moe." in key:
            prefix, rest = key.split(".moe.", 1)
            moe_groups.setdefault(prefix + ".moe", {})[rest] = value
        else:
            out[key] = value
    for prefix, group in moe_groups.items():
        out.update({f"{prefix}.{k}": v for k, v in _convert_moe_keys(group, model).items()})
    return out


def _convert_moe_keys(group: dict[str, Tensor], model: DiT) -> dict[str, Tensor]:
    """Official ``SparseMoeBlock`` keys -> the MoE core: per-expert Linears are stacked into
    ``experts.gate_up_proj [E, 2h, D]`` (gate rows first) and ``experts.down_proj [E, D, h]``."""
    out: dict[str, Tensor] = {}
    experts: dict[int, dict[str, Tensor]] = {}
    for key, value in group.items():
        if key == "gate.weight":
            out["router.weight"] = value
        elif key.startswith("shared_experts."):
            out["shared_expert." + key[len("shared_experts."):]] = value
        elif key.startswith("experts.") and key.count(".") == 3:
            _, idx, proj, _ = key.split(".")
            experts.setdefault(int(idx), {})[proj] = value
        else:
            out[key] = value  # left for the strict check to report
    if experts:
        ids = sorted(experts)
        if ids != list(range(len(ids))) or any(set(experts[i]) != {"gate_proj", "up_proj", "down_proj"} for i in ids):
            raise KeyError(
                f"routed experts in the checkpoint are incomplete: ids {ids}, projections "
                f"{sorted({p for e in experts.values() for p in e})} (need gate_proj, up_proj, down_proj for 0..E-1)"
            )
        out["experts.gate_up_proj"] = torch.stack([torch.cat([experts[i]["gate_proj"], experts[i]["up_proj"]]) for i in ids])
        out["experts.down_proj"] = torch.stack([experts[i]["down_proj"] for i in ids])
    return out


def load_official_checkpoint(
    model: DiT, source: Mapping[str, Any] | str | os.PathLike, where: str = "checkpoint"
) -> DiT:
    """Strictly load an official DiT / DiT-MoE checkpoint into ``model``: a ``.pt`` path (read with
    ``torch.load(weights_only=True)``) or an already loaded dict (``where`` names it in errors); raw state dicts and
    {"ema"|"model"|"module": ...} wrappers are accepted. Missing, unexpected and shape-mismatched keys are listed in
    the error."""
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        source = torch.load(source, map_location="cpu", weights_only=True)
    try:
        mapped = checkpoint_filter_fn(source, model)
    except KeyError as e:
        raise KeyError(f"{where}: {e.args[0]}") from None
    cfg = model.cfg
    arch = f"DiT(depth={cfg.depth}, hidden={cfg.hidden_size}, experts={cfg.num_experts}, qk_norm={cfg.qk_norm})"
    return load_state_dict_strict(model, mapped, where, arch)


# ----------------------------------------------------------------------------------------------------------------
# Size tables
# ----------------------------------------------------------------------------------------------------------------

# name -> (depth, hidden, heads); DiT Table 1 (+ G from DiT-MoE).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "s": (12, 384, 6),
    "b": (12, 768, 12),
    "l": (24, 1024, 16),
    "xl": (28, 1152, 16),
    "g": (40, 1408, 16),
}

# Released DiT-MoE checkpoints: name -> (size, experts, top_k, qk_norm, objective). S/B: timm attention + DDPM;
# XL/G: the flash-attention variant with qk-norm, trained with rectified flow.
DIT_MOE_VARIANTS: dict[str, tuple[str, int, int, bool, str]] = {
    "dit_moe_s_2_8e2a": ("s", 8, 2, False, "ddpm"),
    "dit_moe_s_2_16e2a": ("s", 16, 2, False, "ddpm"),
    "dit_moe_b_2_8e2a": ("b", 8, 2, False, "ddpm"),
    "dit_moe_l_2_8e2a": ("l", 8, 2, False, "ddpm"),
    "dit_moe_xl_2_8e2a": ("xl", 8, 2, True, "rectified_flow"),
    "dit_moe_g_2_16e2a": ("g", 16, 2, True, "rectified_flow"),
}


def _build(size: str, patch: int, **kwargs: Any) -> DiT:
    depth, hidden, heads = DIT_SIZES[size]
    base = DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    return DiT(replace(base, **kwargs))


# ----------------------------------------------------------------------------------------------------------------
# Registered names
# ----------------------------------------------------------------------------------------------------------------


@register_model
def dit_s_2(**kw: Any) -> DiT:
    return _build("s", 2, **kw)


@register_model
def dit_s_4(**kw: Any) -> DiT:
    return _build("s", 4, **kw)


@register_model
def dit_s_8(**kw: Any) -> DiT:
    return _build("s", 8, **kw)


@register_model
def dit_b_2(**kw: Any) -> DiT:
    return _build("b", 2, **kw)


@register_model
def dit_b_4(**kw: Any) -> DiT:
    return _build("b", 4, **kw)


@register_model
def dit_b_8(**kw: Any) -> DiT:
    return _build("b", 8, **kw)


@register_model
def dit_l_2(**kw: Any) -> DiT:
    return _build("l", 2, **kw)


@register_model
def dit_l_4(**kw: Any) -> DiT:
    return _build("l", 4, **kw)


@register_model
def dit_l_8(**kw: Any) -> DiT:
    return _build("l", 8, **kw)


@register_model
def dit_xl_2(**kw: Any) -> DiT:
    return _build("xl", 2, **kw)


@register_model
def dit_xl_4(**kw: Any) -> DiT:
    return _build("xl", 4, **kw)


@register_model
def dit_xl_8(**kw: Any) -> DiT:
    return _build("xl", 8, **kw)


def _moe(name: str, **kw: Any) -> DiT:
    size, experts, top_k, qk_norm, objective = DIT_MOE_VARIANTS[name]
    return _build(size, 2, **{"num_experts": experts, "top_k": top_k, "qk_norm": qk_norm, "objective": objective, **kw})


@register_model
def dit_moe_s_2_8e2a(**kw: Any) -> DiT:
    return _moe("dit_moe_s_2_8e2a", **kw)


@register_model
def dit_moe_s_2_16e2a(**kw: Any) -> DiT:
    return _moe("dit_moe_s_2_16e2a", **kw)


@register_model
def dit_moe_b_2_8e2a(**kw: Any) -> DiT:
    return _moe("dit_moe_b_2_8e2a", **kw)


@register_model
def dit_moe_l_2_8e2a(**kw: Any) -> DiT:
    return _moe("dit_moe_l_2_8e2a", **kw)


@register_model
def dit_moe_xl_2_8e2a(**kw: Any) -> DiT:
    return _moe("dit_moe_xl_2_8e2a", **kw)


@register_model
def dit_moe_g_2_16e2a(**kw: Any) -> DiT:
    return _moe("dit_moe_g_2_16e2a", **kw)


# The digits models: 16x16x1 pixels, patch 4 (16 tokens), D 64, depth 4. dit_moe_tiny's FFN (8 SwiGLU experts of
# width 64, top-2, shared SwiGLU of width 42, router) activates 33,152 parameters per block, the dense MLP 33,088.
DIGITS_TINY = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=64, depth=4, num_heads=4, num_classes=10)
DIGITS_TINY_MOE = dict(num_experts=8, top_k=2, expert_hidden=64, shared_hidden=42)


@register_model
def dit_tiny(**kw: Any) -> DiT:
    """The dense digits DiT; every DiTConfig field can be overridden (tests build smaller ones from it)."""
    return DiT(DiTConfig(**{**DIGITS_TINY, **kw}))


@register_model
def dit_moe_tiny(**kw: Any) -> DiT:
    """The digits DiT-MoE with the same activated parameters as dit_tiny."""
    return DiT(DiTConfig(**{**DIGITS_TINY, **DIGITS_TINY_MOE, **kw}))
