"""Stage type ``dit_diffusion``: train a DiT / DiT-MoE with DDPM (eps + learned-range VLB) or rectified flow.

- model: a registered architecture (``arch``) plus any ``DiTConfig`` field as an override; an EMA copy of the
  weights (DiT keeps one with decay 0.9999; tiny recipes use a shorter one) is what ``evaluate`` samples from
  and what ``export`` writes.
- data: the embedded real digits (``data.digits``, pixel space) or, for full scale, pre-encoded ImageNet latents in
  webdataset shards (``recipes/dit_moe/encode_imagenet_latents.py`` writes them).
- loss: the objective's per-sample loss averaged over the batch, plus the MoE balance losses (which DiT-MoE feeds
  into the gradient without logging them in the loss; we add them and log ``aux`` separately).
- evaluate: a held-out denoising loss on fixed (t, noise), a sample grid, and, when ``eval/generation`` and its
  shipped digit classifier are importable, FID-digits / KID / IS in the classifier's feature space and the share of
  samples classified as their conditioning class.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoo.registry import save_pretrained
from zoo.stages import register_stage
from zoo.stages.base import StageModule
from zoo.stages.configs.dit import DiTDataConfig, DiTEvalConfig, DiTModelConfig

__all__ = [
    "DiTModelConfig",
    "DiTDataConfig",
    "DiTEvalConfig",
    "DiTDiffusionStage",
    "sample_labels",
    "evaluate_generator",
    "digits_metrics",
]

log = logging.getLogger(__name__)


def sample_labels(num_classes: int, per_class: int) -> Tensor:
    """0,0,...,1,1,... : ``per_class`` samples of every class, in class order."""
    return torch.arange(num_classes).repeat_interleave(per_class)


@register_stage("dit_diffusion")
class DiTDiffusionStage(StageModule):
    ModelConfig = DiTModelConfig
    DataConfig = DiTDataConfig
    EvalConfig = DiTEvalConfig

    def __init__(self, model_cfg: DiTModelConfig, data_cfg: DiTDataConfig, eval_cfg: DiTEvalConfig, stage: Any):
        super().__init__(model_cfg, data_cfg, eval_cfg, stage)
        from zoo.registry import create_model

        self.architecture, self.model_args = model_cfg.arch, model_cfg.model_args()
        self.model = create_model(self.architecture, **self.model_args)
        cfg = self.model.cfg
        if data_cfg.source != "latents" and (data_cfg.image_size != cfg.input_size or data_cfg.channels != cfg.in_channels):
            raise ValueError(
                f"stage {stage.name}: data gives {data_cfg.channels}x{data_cfg.image_size}x{data_cfg.image_size} images "
                f"but the model takes {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}; make data.image_size / "
                "data.channels match model.input_size / model.in_channels"
            )
        self.ema_model = None
        if model_cfg.ema_decay > 0:
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        if cfg.objective == "ddpm":
            from zoo.diffusion import GaussianDiffusion

            self.diffusion = GaussianDiffusion.create(1000, learn_sigma=cfg.learn_sigma)
        else:
            from zoo.diffusion import RectifiedFlow

            self.diffusion = RectifiedFlow(time_scale=cfg.time_scale)

    def on_fit_start(self) -> None:
        if self.model_cfg.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(self.model_cfg.cpu_threads)

    def init_from(self, source: Path) -> None:
        super().init_from(source)
        if self.ema_model is not None:
            self.ema_model.load_state_dict(self.model.state_dict())

    # ---- data ------------------------------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        d = self.data_cfg
        if d.source == "latents":
            if not d.shards:
                raise ValueError(f"stage {self.stage.name}: data.source 'latents' needs data.shards (a glob of .tar)")
            from data.latents import LatentShards

            return LatentShards(d.shards)
        from data.digits import DigitsConfig, DigitsDataset

        return DigitsDataset(DigitsConfig(source=d.source, image_size=d.image_size, channels=d.channels, split=d.split))

    # ---- training --------------------------------------------------------------------------------------------------
    def denoise_losses(self, x0: Tensor, y: Tensor, t: Tensor | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
        model = self.model

        def denoise(xt: Tensor, tt: Tensor) -> Tensor:
            return model(xt, tt, y)

        if self.model.cfg.objective == "ddpm" and t is None:
            t = torch.randint(0, self.diffusion.num_steps, (x0.shape[0],), device=x0.device)
        return self.diffusion.training_losses(denoise, x0, t, noise)

    def compute_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor | float]]:
        x0, y = batch
        if self.data_cfg.hflip:
            flip = torch.rand(x0.shape[0], device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        terms = self.denoise_losses(x0, y)
        loss = terms["loss"].mean()
        logs: dict[str, Tensor | float] = {"mse": terms["mse"].mean().detach()}
        if "vb" in terms:
            logs["vb"] = terms["vb"].mean().detach()
        if self.model.cfg.num_experts:
            aux = self.model.aux_loss()
            loss = loss + aux
            logs["aux"] = aux.detach()
        return loss, logs

    def on_before_zero_grad(self, optimizer: Any) -> None:
        # Called once per optimizer step, after the step: the EMA follows the weights just updated.
        if self.ema_model is None:
            return
        decay = self.model_cfg.ema_decay
        if self.model_cfg.ema_warmup:
            s = self.trainer.global_step
            decay = min(decay, (1 + s) / (10 + s))
        with torch.no_grad():
            ema = list(self.ema_model.parameters())
            cur = list(self.model.parameters())
            torch._foreach_lerp_(ema, cur, 1.0 - decay)

    def sampling_model(self) -> torch.nn.Module:
        return self.ema_model if self.ema_model is not None else self.model

    # ---- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, out_dir: Path) -> dict[str, float]:
        model = self.sampling_model().eval()
        metrics: dict[str, float] = {}
        if self.eval_cfg.val_batches and self.data_cfg.source != "latents":
            metrics["val_loss"] = self.validation_loss(model, self.eval_cfg.val_batches)
        return metrics | evaluate_generator(model, self.eval_cfg, self.data_cfg, out_dir)

    def validation_loss(self, model: torch.nn.Module, batches: int) -> float:
        """Mean denoising loss of ``model`` on held-out digits at fixed timesteps and noise (seeded)."""
        from data.digits import DigitsConfig, DigitsDataset

        d = self.data_cfg
        ds = DigitsDataset(DigitsConfig(source=d.source, image_size=d.image_size, channels=d.channels, split="heldout"))
        gen = torch.Generator().manual_seed(1234)
        device = next(model.parameters()).device
        saved, self.model = self.model, model
        try:
            total, n = 0.0, 0
            for _ in range(batches):
                idx = torch.randint(0, len(ds), (64,), generator=gen)
                x0, y = ds.images[idx].to(device), ds.labels[idx].to(device)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                if model.cfg.objective == "ddpm":
                    t = torch.randint(0, 1000, (64,), generator=gen).to(device)
                else:
                    t = torch.sigmoid(torch.randn(64, generator=gen)).to(device)
                total += float(self.denoise_losses(x0, y, t, noise)["mse"].sum())
                n += 64
        finally:
            self.model = saved
        return total / n

    # ---- export ----------------------------------------------------------------------------------------------------
    def export(self, out_dir: Path) -> Path:
        """Write the EMA weights (the ones evaluated), as DiT releases its EMA weights."""
        extra = {"stage_type": self.stage_type, "stage": self.stage.name, "weights": "ema" if self.ema_model else "raw"}
        return save_pretrained(self.sampling_model(), out_dir, self.architecture, self.model_args, **extra)


@torch.no_grad()
def evaluate_generator(model: torch.nn.Module, e: DiTEvalConfig, d: DiTDataConfig, out_dir: Path | None) -> dict[str, float]:
    """Sample ``e.samples_per_class`` images of every class (seeded, in class order) and score them: sample grid,
    FID-digits / KID / IS in the shipped digit classifier's feature space and class accuracy (pixel-space digits),
    or the raw samples saved for an external evaluator (latents). The shipped weights' test calls this too."""
    if e.samples_per_class == 0:
        return {}
    cfg = model.cfg
    device = next(model.parameters()).device
    labels = sample_labels(cfg.num_classes, e.samples_per_class)
    gen = torch.Generator().manual_seed(e.seed)
    images = []
    for chunk in labels.split(e.batch_size):
        images.append(
            model.sample(chunk.to(device), num_steps=e.num_steps, cfg_scale=e.cfg_scale, generator=gen,
                         sampler=e.sampler, guidance_channels=e.guidance_channels).cpu()
        )
    samples = torch.cat(images)
    if d.source == "latents":
        if out_dir is not None:
            torch.save({"latents": samples, "labels": labels}, Path(out_dir) / "samples_latents.pt")
        return {}
    return digits_metrics(samples, labels, e, d, out_dir)


def digits_metrics(samples: Tensor, labels: Tensor, e: DiTEvalConfig, d: DiTDataConfig, out_dir: Path | None) -> dict[str, float]:
    """Sample grid + FID-digits, KID, IS and class accuracy (when eval/generation is available)."""
    out: dict[str, float] = {}
    per_class = int((labels == 0).sum())
    if out_dir is not None:
        try:
            from eval.generation.grid import save_sample_grid
        except ImportError as err:
            log.warning("no sample grid: eval.generation.grid is not importable (%s)", err)
        else:
            keep = torch.cat([torch.nonzero(labels == c).flatten()[:10] for c in labels.unique()])
            save_sample_grid(samples[keep], labels[keep], Path(out_dir) / "samples_grid.png", nrow=min(10, per_class))
    if not e.metrics:
        return out
    try:
        from eval.generation.digit_classifier import DigitClassifierExtractor, load_digit_classifier
        from eval.generation.metrics import GenerationMetrics

        classifier = load_digit_classifier()
    except (ImportError, FileNotFoundError, KeyError) as err:
        log.warning("FID-digits / class accuracy skipped: the digit classifier is not available (%s)", err)
        return out
    from data.digits import DigitsConfig, DigitsDataset

    real = DigitsDataset(DigitsConfig(source=d.source, image_size=d.image_size, channels=d.channels,
                                      split=e.reference_split)).images
    gm = GenerationMetrics(DigitClassifierExtractor(classifier))
    gm.update_real(real[:, :1])
    gm.update_fake(samples[:, :1].clamp(-1, 1), labels)
    scores = gm.compute()
    return out | {"fid_digits": scores["fid"], "kid_digits": scores["kid_mean"], "is_digits": scores["is_mean"],
                  "class_acc": scores["class_acc"]}
