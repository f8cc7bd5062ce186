"""Optimizers the runner builds by short name beyond torch's own: Muon on hidden matrices with AdamW for the rest."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# Muon orthogonalises the update of a hidden weight matrix; embeddings and the output head are lookups / read-outs
# (Keller Jordan's and Moonshot's setups keep them, and every vector, on AdamW).
MUON_EXCLUDE = ("*embed*", "*lm_head*")


def is_muon_param(name: str, p: Tensor, exclude: tuple[str, ...] = MUON_EXCLUDE) -> bool:
    """Whether Muon updates this parameter: a 2-D weight that is not an embedding or an output head."""
    return p.ndim == 2 and not any(fnmatch.fnmatchcase(name, g) for g in exclude)


def orthogonalise(g: Tensor, steps: int = 5) -> Tensor:
    """Approximately ``U V^T`` of ``g = U S V^T`` by a quintic Newton-Schulz iteration (Muon's).

    The coefficients (3.4445, -4.7750, 2.0315) push every singular value towards 1 in five steps without converging
    exactly (they land in about [0.7, 1.2]), which is all Muon needs. Float32 on CPU: bfloat16 matmuls are emulated
    on CPUs without native support and made ``torch.optim.Muon`` (bfloat16 always) 4x slower per step than AdamW here.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the hidden weight matrices and ``torch.optim.AdamW`` on the rest, as one optimizer.

    Muon (as ``torch.optim.Muon``, in float32 on CPU): Nesterov momentum, then the update orthogonalised
    (``orthogonalise``) and scaled to AdamW's RMS by ``0.2 * sqrt(max(rows, cols))`` (Moonshot's rule, "Muon is
    Scalable for LLM Training"), so both halves take the same learning rate and weight decay (decoupled). One object, so that one LR scheduler, one Lightning optimizer and
    one checkpointed state cover both: the Muon groups are its own, the AdamW groups are the inner AdamW's group dicts
    themselves, so a scheduler's lr writes reach them.
    """

    def __init__(
        self,
        muon_groups: list[dict[str, Any]],
        adamw_groups: list[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.95,
        ns_steps: int = 5,
    ) -> None:
        if not muon_groups:
            raise ValueError("MuonAdamW: no 2-D hidden weight to give Muon (use adamw for this stage)")
        for group in muon_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"MuonAdamW: Muon takes 2-D weights only, got a tensor of shape {tuple(p.shape)}")
        super().__init__(muon_groups, {"lr": lr, "weight_decay": 0.0, "momentum": momentum, "ns_steps": ns_steps})
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps) if adamw_groups else None
        self.num_muon_groups = len(self.param_groups)
        if self.adamw is not None:
            self.param_groups.extend(self.adamw.param_groups)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups[: self.num_muon_groups]:
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1.0 - mu)
                update = orthogonalise(p.grad.lerp(buf, mu), group["ns_steps"])  # Nesterov
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        muon = super().state_dict()
        muon["param_groups"] = muon["param_groups"][: self.num_muon_groups]
        return {"muon": muon, "adamw": None if self.adamw is None else self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("MuonAdamW.load_state_dict: expected the {'muon', 'adamw'} state this optimizer saves")
        adamw_groups = self.param_groups[self.num_muon_groups :]
        self.param_groups = self.param_groups[: self.num_muon_groups]
        try:
            super().load_state_dict(state_dict["muon"])
        finally:
            self.param_groups.extend(adamw_groups)
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
            self.param_groups[self.num_muon_groups :] = self.adamw.param_groups
