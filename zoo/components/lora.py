"""LoRA on plain linear layers (the attention projections of Uni-MoE's stage 3).

``LoRALinear`` wraps a frozen ``nn.Linear`` (composition: the transformers module is replaced in its parent's slot,
as MoE layers replace an MLP; its class is never patched) and adds ``(alpha / r) * B(A(dropout(x)))`` with PEFT's
initialisation (A Kaiming-uniform, B zero, so a fresh wrapper equals its base). ``merged()`` returns a plain
``nn.Linear`` with the delta folded in; the same layout of scale, A and B as MoE LoRA experts (``zoo.moe``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["LoRALinear", "add_lora", "merge_lora"]


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * lora_B(lora_A(dropout(x)))`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank
        if not w.is_meta:
            nn.init.uniform_(self.lora_A.weight, -1.0 / math.sqrt(base.in_features), 1.0 / math.sqrt(base.in_features))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain linear computing the same function (folded in fp32 or wider, then cast to the base's dtype)."""
        w = self.base.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_((w.to(acc) + self.scale * (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc))).to(w.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        out.requires_grad_(False)
        return out


def add_lora(root: nn.Module, names: Iterable[str], rank: int, alpha: float, dropout: float) -> list[str]:
    """Wrap every ``nn.Linear`` child of ``root``'s submodules whose attribute name is in ``names``; returns the
    qualified names wrapped (in module order)."""
    targets = set(names)
    done = []
    for parent_name, parent in list(root.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
                done.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return done


def merge_lora(root: nn.Module) -> int:
    """Replace every ``LoRALinear`` under ``root`` by its merged ``nn.Linear``; returns how many were merged."""
    n = 0
    for _, parent in list(root.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.merged())
                n += 1
    return n
