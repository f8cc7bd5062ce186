"""The digit classifier as an evaluation tool: FID-digits features and class-accuracy logits.

The model itself (:class:`zoo.models.digit_cnn.DigitCNN`) lives in ``zoo`` so that ``zoo.load("digit_cnn.digits")``
works without importing ``eval``; this module wraps it as a feature extractor for
:class:`eval.generation.metrics.GenerationMetrics`. Shipped weights: ``zoo/weights/digit_cnn.digits/`` (trained by
``eval/generation/train_digit_classifier.py``); ``config.json`` records the data split and the held-out accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from zoo.models.digit_cnn import DigitCNN, DigitCNNConfig
from zoo.registry import SHIPPED_WEIGHTS_DIR, load
from zoo.weights_table import DIGIT_CNN_DIGITS

__all__ = ["DigitCNNConfig", "DigitCNN", "DigitClassifierExtractor", "load_digit_classifier", "SHIPPED_DIR"]

SHIPPED_DIR = SHIPPED_WEIGHTS_DIR / DIGIT_CNN_DIGITS.file


class DigitClassifierExtractor:
    """:class:`eval.generation.metrics.FeatureExtractor` over a :class:`DigitCNN` (always in eval mode)."""

    name = "digit_cnn"

    def __init__(self, model: DigitCNN, device: str | torch.device = "cpu", batch_size: int = 512) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.num_features = model.cfg.feature_dim
        self.num_classes = model.cfg.num_classes

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats, logits = [], []
        for chunk in images.split(self.batch_size):
            f = self.model.forward_features(chunk.to(self.device))
            feats.append(f)
            logits.append(self.model.forward_head(f))
        return torch.cat(feats), torch.cat(logits)


def load_digit_classifier(path: str | Path | None = None) -> DigitCNN:
    """Load the shipped classifier (or one written by the training script to ``path``)."""
    model = load(path if path is not None else "digit_cnn.digits")
    if not isinstance(model, DigitCNN):
        raise TypeError(f"{path}: expected a digit_cnn checkpoint, got {type(model).__name__}")
    return model
