"""Gaussian diffusion (DDPM) with the ADM/DiT conventions: linear betas, epsilon prediction, learned-range variance
trained with the variational bound, timestep respacing, ancestral (DDPM) and DDIM samplers.

Written from the formulas in ``shared/reference/dit_moe.md`` Sec. 3 (Ho et al. 2020; Nichol & Dhariwal 2021), in
float64 tables like the original so that respaced schedules match exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "linear_betas",
    "space_timesteps",
    "GaussianDiffusion",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, model timestep) -> model output (N, C or 2C, H, W)
StepCallback = Callable[[int, Tensor], None]  # (sampling step index, 0 = first/noisiest, model timestep)


def linear_betas(num_steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> Tensor:
    """ADM's linear schedule, scaled so any number of steps spans the same noise range as 1000."""
    scale = 1000 / num_steps
    return torch.linspace(scale * start, scale * end, num_steps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int]) -> list[int]:
    """Kept timesteps for respacing: "250" -> 250 evenly strided indices incl. 0 and T-1; "ddim50" -> a stride that
    gives exactly 50 steps; "10,20" -> sections of the range with 10 and 20 steps each."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} equally strided steps from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return kept


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    # The tanh approximation used by the ADM code, kept so the VLB numbers are comparable.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) for data in [-1, 1] quantised to 256 levels under N(means, e^(2 log_scales)), elementwise."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _take(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] as float32 on like's device, broadcast to like's rank."""
    out = table.to(like.device)[t].float()
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


@dataclass
class GaussianDiffusion:
    """A (possibly respaced) DDPM. Indices 0..num_steps-1 address this process; ``timestep_map`` turns them into
    the timesteps the model was trained on (the original 0..999; no rescaling, as in DiT)."""

    betas: Tensor
    timestep_map: Tensor
    learn_sigma: bool = True

    @classmethod
    def create(cls, num_steps: int = 1000, respacing: str | Iterable[int] | None = None, learn_sigma: bool = True):
        """The DiT setup: linear betas over ``num_steps``; ``respacing`` e.g. "250" or "ddim50" for sampling."""
        base = linear_betas(num_steps)
        if not respacing:
            return cls(base, torch.arange(num_steps), learn_sigma)
        kept = sorted(set(space_timesteps(num_steps, respacing)))
        acp = torch.cumprod(1.0 - base, dim=0)
        new_betas, last = [], 1.0
        for i in kept:
            new_betas.append(1.0 - acp[i].item() / last)
            last = acp[i].item()
        return cls(torch.tensor(new_betas, dtype=torch.float64), torch.tensor(kept), learn_sigma)

    def __post_init__(self) -> None:
        b = self.betas.to(torch.float64)
        self.num_steps = len(b)
        alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance at t=0 is 0; like ADM, use the t=1 value there so the log stays finite.
        var = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([var[1:2], var[1:]])) if len(var) > 1 else var.log()
        self.posterior_mean_coef1 = b * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = b.log()

    # -- forward process ----------------------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return _take(self.sqrt_alphas_cumprod, t, x0) * x0 + _take(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _take(self.posterior_mean_coef1, t, xt) * x0 + _take(self.posterior_mean_coef2, t, xt) * xt
        return mean, _take(self.posterior_log_variance_clipped, t, xt).expand_as(xt)

    # -- reverse process ----------------------------------------------------------------------------------------
    def p_mean_variance(self, out: Tensor, xt: Tensor, t: Tensor, clip_denoised: bool = False) -> dict[str, Tensor]:
        """Model output (eps, [v]) -> mean, log-variance and predicted x0 of p(x_{t-1} | x_t)."""
        c = xt.shape[1]
        eps = out[:, :c]
        if self.learn_sigma:
            if out.shape[1] != 2 * c:
                raise ValueError(f"learned-sigma diffusion needs {2 * c} output channels, the model gave {out.shape[1]}")
            frac = (out[:, c:] + 1) / 2
            log_var = frac * _take(self.log_betas, t, xt) + (1 - frac) * _take(self.posterior_log_variance_clipped, t, xt)
        else:
            log_var = _take(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        pred_x0 = _take(self.sqrt_recip_alphas_cumprod, t, xt) * xt - _take(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_x0, xt, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    def model_t(self, t: Tensor) -> Tensor:
        return self.timestep_map.to(t.device)[t]

    # -- training -----------------------------------------------------------------------------------------------
    def training_losses(self, denoise: DenoiseFn, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample losses: ``mse`` on eps, ``vb`` (bits/dim; only trains the variance head), ``loss`` = sum."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = denoise(xt, self.model_t(t))
        c = x0.shape[1]
        terms = {"mse": _mean_flat((out[:, :c] - noise) ** 2)}
        if self.learn_sigma:
            # Stop-gradient on eps: the bound trains the variance only, the mean is trained by the MSE.
            frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
            terms["vb"] = self.vb_terms(frozen, x0, xt, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def vb_terms(self, out: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits/dim, or the decoder NLL at t = 0."""
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(out, xt, t)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def p_sample_loop(
        self,
        denoise: DenoiseFn,
        noise: Tensor,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """Ancestral sampling from ``noise`` over this process's steps; no noise is added at the last step."""
        x = noise
        for step, i in enumerate(reversed(range(self.num_steps))):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = denoise(x, self.model_t(t))
            if callback is not None:
                callback(step, self.model_t(t))
            p = self.p_mean_variance(out, x, t, clip_denoised)
            if i > 0:
                z = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
                x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z.to(x.device)
            else:
                x = p["mean"]
        return x

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        denoise: DenoiseFn,
        noise: Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """DDIM (Song et al. 2021); eta = 0 is deterministic."""
        x = noise
        for step, i in enumerate(reversed(range(self.num_steps))):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = denoise(x, self.model_t(t))
            if callback is not None:
                callback(step, self.model_t(t))
            p = self.p_mean_variance(out, x, t, clip_denoised)
            # Recompute eps from the (possibly clipped) x0, as the DDIM update is written in terms of both.
            eps = (_take(self.sqrt_recip_alphas_cumprod, t, x) * x - p["pred_x0"]) / _take(
                self.sqrt_recipm1_alphas_cumprod, t, x
            )
            acp = _take(self.alphas_cumprod, t, x)
            acp_prev = _take(self.alphas_cumprod_prev, t, x)
            sigma = eta * ((1 - acp_prev) / (1 - acp)).sqrt() * (1 - acp / acp_prev).sqrt()
            x = acp_prev.sqrt() * p["pred_x0"] + (1 - acp_prev - sigma**2).sqrt() * eps
            if eta > 0 and i > 0:
                z = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
                x = x + sigma * z.to(x.device)
        return x
