"""optim.name: muon -- Muon on hidden matrices (parity with torch.optim.Muon), AdamW on the rest, one optimizer."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from zoo.stages.optimizers import MuonAdamW, is_muon_param, orthogonalise


def test_orthogonalise_brings_singular_values_near_one_for_wide_and_tall():
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 256)
    for m in (g, g.T):
        s = torch.linalg.svdvals(orthogonalise(m))
        assert orthogonalise(m).shape == m.shape
        # the quintic iteration lands singular values in about [0.7, 1.2] rather than exactly at 1
        assert 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())
    assert torch.allclose(orthogonalise(g * 1000.0), orthogonalise(g), atol=1e-5)  # scale-free


def test_which_parameters_muon_takes():
    w = torch.zeros(4, 4)
    assert is_muon_param("llm.lm.model.layers.0.mlp.fc1.weight", w)
    assert not is_muon_param("llm.lm.model.layers.0.mlp.fc1.bias", torch.zeros(4))
    assert not is_muon_param("llm.lm.model.embed_tokens.weight", w)
    assert not is_muon_param("llm.lm.lm_head.weight", w)


def _net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 8))


def _train(net: nn.Sequential, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        loss = (net(x) - x[:, :8]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_parity_with_torch_muon_and_adamw():
    """Muon half against torch.optim.Muon (bfloat16 Newton-Schulz, so close, not equal), AdamW half exact."""
    ours, ref = _net(0), _net(0)
    weights = lambda n: [n[0].weight, n[2].weight]  # noqa: E731
    biases = lambda n: [n[0].bias, n[2].bias]  # noqa: E731
    opt = MuonAdamW([{"params": weights(ours), "weight_decay": 0.1}], [{"params": biases(ours), "weight_decay": 0.0}],
                    lr=1e-2, betas=(0.9, 0.98))  # fmt: skip
    muon = torch.optim.Muon(weights(ref), lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(biases(ref), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.0)

    class Both(torch.optim.Optimizer):  # drive the two references from one training loop
        def __init__(self):
            self.param_groups = muon.param_groups + adamw.param_groups

        def zero_grad(self, set_to_none: bool = True):
            muon.zero_grad(), adamw.zero_grad()

        def step(self, closure=None):
            muon.step(), adamw.step()

    start = [p.detach().clone() for p in weights(ours)]
    _train(ours, opt, 1)
    _train(ref, Both(), 1)
    for p0, p, q in zip(start, weights(ours), weights(ref), strict=True):
        step_ours, step_ref = p.detach() - p0, q.detach() - p0
        rel = (step_ours - step_ref).norm() / step_ref.norm()
        assert step_ref.norm() > 0 and rel < 0.03, rel  # bfloat16 has 8 bits of mantissa
    for p, q in zip(biases(ours), biases(ref), strict=True):
        assert torch.equal(p, q)


def test_scheduler_lr_reaches_both_halves_and_state_round_trips():
    net = _net(0)
    opt = MuonAdamW([{"params": [net[0].weight, net[2].weight]}], [{"params": [net[0].bias, net[2].bias]}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [5e-3, 5e-3]
    assert opt.adamw.param_groups[0]["lr"] == 5e-3  # the AdamW group dict is shared, not copied
    _train(net, opt, 3)
    sched.step()
    buffer = io.BytesIO()  # through bytes, as a checkpoint does: load_state_dict keeps the tensors it is given
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    net2 = _net(0)
    net2.load_state_dict(net.state_dict())
    opt2 = MuonAdamW([{"params": [net2[0].weight, net2[2].weight]}], [{"params": [net2[0].bias, net2[2].bias]}],
                     lr=1e-2)  # fmt: skip
    opt2.load_state_dict(state)
    assert opt2.adamw.param_groups[0] is opt2.param_groups[1]
    _train(net, opt, 2, seed=5)
    _train(net2, opt2, 2, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters(), strict=True))
    with pytest.raises(ValueError, match="expected the"):
        opt2.load_state_dict(torch.optim.AdamW(net2.parameters()).state_dict())


def test_muon_needs_a_matrix():
    with pytest.raises(ValueError, match="no 2-D hidden weight"):
        MuonAdamW([], [{"params": [nn.Parameter(torch.zeros(3))]}], lr=1e-3)
    with pytest.raises(ValueError, match="2-D weights only"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(3))]}], [], lr=1e-3)
