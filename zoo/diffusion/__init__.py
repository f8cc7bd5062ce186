"""Diffusion objectives and samplers for DiT / DiT-MoE.

- ``GaussianDiffusion``: DDPM with linear betas (1000 steps), epsilon prediction, learned-range variance with the
  VLB term, respacing ("250", "ddim50"), ancestral and DDIM sampling.
- ``RectifiedFlow``: logit-normal t, velocity target, Euler sampling.
- ``sample(model, class_labels, ...)``: the one sampling entry point (with classifier-free guidance) that
  ``DiT.sample`` and ``zoo sample`` use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zoo.diffusion.gaussian import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    space_timesteps,
)
from zoo.diffusion.rectified_flow import RectifiedFlow

__all__ = [
    "GaussianDiffusion",
    "RectifiedFlow",
    "SAMPLERS",
    "guided_denoiser",
    "sample",
    "linear_betas",
    "space_timesteps",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
]

SAMPLERS = ("ddpm", "ddim", "euler")


def guided_denoiser(model: Any, y: Tensor, cfg_scale: float, guidance_channels: int | None = None):
    """(x, t) -> model output for labels ``y``; with cfg_scale != 1 the classifier-free-guided output."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    return lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale, guidance_channels)


@torch.no_grad()
def sample(
    model: Any,
    class_labels: Tensor,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    sampler: str | None = None,
    guidance_channels: int | None = None,
    callback: Any = None,
    noise: Tensor | None = None,
    eta: float = 0.0,
) -> Tensor:
    """Draw samples from a DiT for ``class_labels`` (N,). Returns (N, in_channels, H, W).

    ``sampler`` defaults to the model's objective: "ddpm" (respaced ancestral sampling, the DiT evaluation path)
    for DDPM models and "euler" for rectified-flow models; "ddim" is deterministic (eta = 0) DDPM sampling.
    ``callback(step, t)`` runs after every model call (step 0 = noisiest), e.g. to read routing statistics.
    """
    cfg = model.cfg
    sampler = sampler or ("euler" if cfg.objective == "rectified_flow" else "ddpm")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    if (sampler == "euler") != (cfg.objective == "rectified_flow"):
        raise ValueError(f"sampler {sampler!r} does not fit a model trained with objective {cfg.objective!r}")
    device = next(model.parameters()).device
    y = class_labels.to(device=device, dtype=torch.long)
    model.check_labels(y)
    shape = (y.shape[0], cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=gen_device)
    noise = noise.to(device)
    denoise = guided_denoiser(model, y, cfg_scale, guidance_channels)
    was_training = model.training
    model.eval()
    try:
        if sampler == "euler":
            return RectifiedFlow(time_scale=cfg.time_scale).sample(denoise, noise, num_steps, callback=callback)
        respacing = f"ddim{num_steps}" if sampler == "ddim" else str(num_steps)
        diffusion = GaussianDiffusion.create(1000, respacing, learn_sigma=cfg.learn_sigma)
        if sampler == "ddim":
            return diffusion.ddim_sample_loop(denoise, noise, eta=eta, generator=generator, callback=callback)
        return diffusion.p_sample_loop(denoise, noise, generator=generator, callback=callback)
    finally:
        model.train(was_training)
