"""Rectified flow as trained by DiT-MoE XL/G: z_t = (1 - t) x0 + t eps (t = 1 is noise), logit-normal t,
velocity target eps - x0, Euler sampler from t = 1 to 0. Facts from ``shared/reference/dit_moe.md`` Sec. 3.2."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RectifiedFlow"]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor], None]


@dataclass(frozen=True)
class RectifiedFlow:
    """``time_scale`` multiplies t before the model's timestep embedding: 1.0 is the released models' convention
    (raw t in [0, 1]); 1000 spreads t over the DDPM timestep range, which small models learn faster."""

    time_scale: float = 1.0
    logit_normal: bool = True

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else device
        if self.logit_normal:
            t = torch.sigmoid(torch.randn(n, generator=generator, device=gen_device))
        else:
            t = torch.rand(n, generator=generator, device=gen_device)
        return t.to(device)

    def training_losses(
        self, denoise: DenoiseFn, x0: Tensor, t: Tensor | None = None, noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-sample MSE between the predicted and the true velocity; extra output channels are ignored."""
        noise = torch.randn_like(x0) if noise is None else noise
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        tb = t.reshape(-1, *([1] * (x0.dim() - 1)))
        zt = (1 - tb) * x0 + tb * noise
        pred = denoise(zt, t * self.time_scale)[:, : x0.shape[1]]
        mse = ((pred - (noise - x0)) ** 2).mean(dim=tuple(range(1, x0.dim())))
        return {"mse": mse, "loss": mse}

    @torch.no_grad()
    def sample(self, denoise: DenoiseFn, noise: Tensor, num_steps: int = 50, callback: StepCallback | None = None) -> Tensor:
        """Euler steps t = 1, 1 - 1/N, ..., 1/N with z <- z - v / N."""
        z = noise
        dt = 1.0 / num_steps
        for step, i in enumerate(range(num_steps, 0, -1)):
            t = torch.full((z.shape[0],), i / num_steps, device=z.device, dtype=torch.float32)
            v = denoise(z, t * self.time_scale)[:, : z.shape[1]]
            if callback is not None:
                callback(step, t * self.time_scale)
            z = z - dt * v
        return z
