"""A small CNN digit classifier: the feature network for FID-digits and the judge of class accuracy.

There are no Inception weights offline (../shared/reference/offline_assets.md Sec. 6), so for the digits recipes we
measure generated samples in the feature space of a classifier trained on real digits (the usual "classifier FID"
for MNIST-like generators). The network sees 1-channel images in [-1, 1] at ``image_size``; other sizes are resized
bilinearly to it. Its penultimate activations (``feature_dim`` wide, after the last nonlinearity) are the FID/KID
features and its logits give IS-digits and class accuracy.

Shipped weights ``digit_cnn.digits`` (``zoo/weights_table.py``) were trained by
``eval/generation/train_digit_classifier.py``; the evaluation helpers around the model live in
``eval/generation/digit_classifier.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from zoo.registry import register_model

__all__ = ["DigitCNNConfig", "DigitCNN", "digit_cnn"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DigitCNNConfig:
    image_size: int = 16
    in_chans: int = 1
    widths: tuple[int, ...] = (16, 32, 64)  # one conv stage each; every stage after the first halves the resolution
    feature_dim: int = 64
    num_classes: int = 10
    dropout: float = 0.1


class DigitCNN(nn.Module):
    def __init__(self, cfg: DigitCNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = cfg.in_chans
        for i, c in enumerate(cfg.widths):
            layers += [
                nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
        self.stem = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc_feat = nn.Linear(c_in, cfg.feature_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def _prepare(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected images (N, C, H, W); got shape {tuple(x.shape)}")
        if x.shape[1] != self.cfg.in_chans:
            if x.shape[1] == 3 and self.cfg.in_chans == 1:
                x = x.mean(dim=1, keepdim=True)  # RGB samples of a grey dataset: average the channels
            else:
                raise ValueError(f"expected {self.cfg.in_chans} channel(s), got {x.shape[1]}")
        if x.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            x = F.interpolate(
                x, size=(self.cfg.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True
            )
        return x.float()

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate features (N, feature_dim): the FID-digits feature space."""
        h = self.pool(self.stem(self._prepare(x))).flatten(1)
        return F.relu(self.fc_feat(h))

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.head(self.drop(feats))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(family="digit_cnn")
def digit_cnn(**kwargs: Any) -> DigitCNN:
    if "widths" in kwargs:
        kwargs["widths"] = tuple(kwargs["widths"])  # config.json stores tuples as lists
    return DigitCNN(DigitCNNConfig(**kwargs))
