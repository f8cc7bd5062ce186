"""DDPM / DDIM / rectified flow: schedules and sampler steps against diffusers' schedulers (skipped without
diffusers), and hand-derived checks (exact oracles for a one-point data distribution, closed-form KL)."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.diffusion import (
    GaussianDiffusion,
    RectifiedFlow,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
)


def toy_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, t-dependent function with a variance half in [-1, 1] (2C channels)."""
    tt = t.float().reshape(-1, 1, 1, 1)
    return torch.cat([0.3 * x + 1e-3 * tt, torch.tanh(x - 5e-4 * tt)], dim=1)


def test_respacing_matches_adm_250() -> None:
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[:4] == [0, 4, 8, 12] and kept[-2:] == [995, 999]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    d = GaussianDiffusion.create(1000, "250")
    base = GaussianDiffusion.create(1000)
    # Respaced alpha_bar equals the original alpha_bar at the kept steps.
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert d.model_t(torch.tensor([249])).item() == 999
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "11")


def test_ddpm_learned_range_loop_matches_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    d = GaussianDiffusion.create(1000, "25")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range",
                                    clip_sample=False, prediction_type="epsilon")
    sched.set_timesteps(timesteps=sorted(d.timestep_map.tolist(), reverse=True))
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = d.p_sample_loop(toy_denoiser, x0.clone(), generator=g1)
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(toy_denoiser(x, t.expand(2)), t, x, generator=g2).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_ddim_loop_matches_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    d = GaussianDiffusion.create(1000, "ddim50", learn_sigma=False)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                    set_alpha_to_one=True, prediction_type="epsilon")
    sched.set_timesteps(50)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))

    def eps_only(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return toy_denoiser(x, t)[:, :3]

    ours = d.ddim_sample_loop(eps_only, x0.clone())
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(eps_only(x, t.expand(2)), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_oracle_denoisers_recover_a_single_data_point() -> None:
    """With one data point x*, the exact eps / velocity are known in closed form; DDIM and Euler land on x*."""
    target = torch.tensor([0.5, -0.25, 0.75]).reshape(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    d = GaussianDiffusion.create(1000, "ddim20", learn_sigma=False)
    base = GaussianDiffusion.create(1000, learn_sigma=False)

    def eps_oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        acp = base.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        return (x - acp.sqrt() * target) / (1 - acp).sqrt()

    noise = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d.ddim_sample_loop(eps_oracle, noise), target, atol=1e-4, rtol=0)
    t = torch.tensor([0, 500])
    assert base.training_losses(eps_oracle, target, t, noise)["mse"].max() < 1e-8

    rf = RectifiedFlow()

    def v_oracle(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (z - target) / t.reshape(-1, 1, 1, 1)

    torch.testing.assert_close(rf.sample(v_oracle, noise, num_steps=7), target, atol=1e-5, rtol=0)
    assert rf.training_losses(v_oracle, target, noise=noise)["loss"].max() < 1e-8


def test_vlb_terms_are_zero_for_the_true_posterior_and_kl_is_exact() -> None:
    d = GaussianDiffusion.create(1000)
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 400, 999])
    xt = d.q_sample(x0, t, noise)
    # eps = true noise gives the true posterior mean; v = -1 gives log sigma^2 = clipped posterior log-variance.
    out = torch.cat([noise, -torch.ones_like(x0)], dim=1)
    assert d.vb_terms(out, x0, xt, t).abs().max() < 1e-4
    # Closed-form KL against torch.distributions.
    m1, m2, lv1, lv2 = torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    # The discretised decoder likelihood of a bin equals the Gaussian mass in it (tanh-approximated CDF: ~1e-3).
    x, mean, log_scale = torch.tensor([0.2]), torch.tensor([0.21]), torch.tensor([math.log(0.05)])
    normal = torch.distributions.Normal(mean, log_scale.exp())
    exact = (normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)).log()
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, mean, log_scale), exact, atol=2e-3, rtol=2e-3)


def test_vb_term_trains_only_the_variance_channels() -> None:
    d = GaussianDiffusion.create(1000)
    x0 = torch.randn(2, 1, 4, 4)
    out_param = torch.zeros(2, 2, 4, 4, requires_grad=True)
    losses = d.training_losses(lambda x, t: out_param * 1.0, x0, torch.tensor([3, 700]))
    losses["vb"].sum().backward()
    assert out_param.grad[:, :1].abs().max() == 0 and out_param.grad[:, 1:].abs().max() > 0
