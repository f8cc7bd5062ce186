"""``DiTConfig``: the architecture of a DiT / DiT-MoE, in a module of its own that imports no torch, so that recipes
(``zoo train --check``) validate their ``DiTConfig`` overrides without loading torch. ``zoo.models.dit`` builds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["OBJECTIVES", "DiTConfig"]

OBJECTIVES = ("ddpm", "rectified_flow")


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """Architecture of a DiT / DiT-MoE. Defaults are DiT-XL/2 at 256 px (latent 32x32x4)."""

    input_size: int = 32  # spatial size of the model input (latent side, or pixels for pixel-space models)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 adds the null class row used by classifier-free guidance
    num_classes: int = 1000
    learn_sigma: bool = True  # output 2*C channels: eps (or velocity) and the variance interpolation value
    qk_norm: bool = False  # per-head LayerNorm on q and k (DiT-MoE XL/G, the flash-attention variant)
    # Mixture of experts (num_experts == 0 -> the dense DiT MLP with GELU-tanh).
    num_experts: int = 0
    top_k: int = 2
    expert_hidden: int | None = None  # routed SwiGLU width; None -> mlp_ratio * hidden_size (the official 4D)
    shared_hidden: int | None = None  # shared SwiGLU width; None -> num_shared_experts * hidden_size (official 2D)
    num_shared_experts: int = 2
    aux_loss_alpha: float = 0.01  # expert-level balance loss weight (official code 0.01; the paper says 0.005)
    moe_every: int = 1  # MoE in blocks with index % moe_every == moe_every - 1 (1: every block, as released)
    # Which objective the weights are trained with; sample() uses it. Released DiT-MoE XL/G are rectified flow.
    objective: Literal["ddpm", "rectified_flow"] = "ddpm"
    time_scale: float = 1.0  # rectified flow: t in [0, 1] times this goes into the timestep embedding (released: 1)

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DiTConfig: input_size {self.input_size} is not divisible by patch_size {self.patch_size}; "
                f"pick an input_size that is a multiple of {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"DiTConfig: objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.num_experts and not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"DiTConfig: top_k {self.top_k} must be in 1..num_experts ({self.num_experts})")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def null_class(self) -> int:
        return self.num_classes

    def is_moe_block(self, index: int) -> bool:
        return self.num_experts > 0 and index % self.moe_every == self.moe_every - 1
