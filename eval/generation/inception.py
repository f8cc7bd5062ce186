"""Inception-v3 FID features from a local weights file (never downloaded).

torchmetrics' own Inception path (``feature=2048``) builds torch-fidelity's ``FeatureExtractorInceptionV3``, which
downloads ``weights-inception-2015-12-05-6726825d.pth`` when no path is given, and ``KernelInceptionDistance`` /
``InceptionScore`` take no weights path at all. So we build the torch-fidelity extractor ourselves from the user's
file and give torchmetrics its outputs (see ``eval.generation.metrics``). The file is torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` or pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the same TF
graph ported; both load strictly into torch-fidelity's module).

Input pipeline (eval_metrics.md Sec. 3.1): images in [-1, 1] -> uint8 with DiT's ``clamp(127.5 x + 128)`` ->
grey repeated to RGB -> torch-fidelity's TF1-compatible bilinear resize to 299 -> (x - 128) / 128 -> pool3 (2048-d)
and the 1008-way logits without bias (``logits_unbiased``, as ADM and torch-fidelity compute IS). This matches
torch-fidelity and torchmetrics < 1.8 (``antialias=False``), not torchmetrics >= 1.8's antialiased default.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from eval.generation.grid import to_uint8

__all__ = ["InceptionExtractor"]


class InceptionExtractor:
    """:class:`eval.generation.metrics.FeatureExtractor` over torch-fidelity's Inception-v3 with local weights."""

    name = "inception_v3_tf"
    num_features = 2048
    num_classes = 1008

    def __init__(
        self, weights_path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64
    ) -> None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights {path} not found. mmzoo never downloads them: fetch torch-fidelity's "
                "weights-inception-2015-12-05-6726825d.pth (or pytorch-fid's pt_inception-2015-12-05-6726825d.pth) "
                "yourself and pass its path, or use the digit classifier for FID-digits."
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "Inception FID needs torch-fidelity (`pip install torch-fidelity`); it is not needed for FID-digits"
            ) from e
        # torch-fidelity reads the file with torch.load(weights_only=False); refuse anything that is not a plain
        # tensor state dict before handing it over, so a pickle never executes code.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a plain PyTorch state dict of tensors ({e})") from e
        if not isinstance(state, dict) or "fc.weight" not in state:
            raise ValueError(
                f"{path}: not an Inception-v3 FID state dict (no 'fc.weight'); keys: {list(state)[:8]}"
            )
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
            )
        except RuntimeError as e:
            raise ValueError(f"{path}: does not load into torch-fidelity's Inception-v3: {e}") from e
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1|3, H, W) in [-1, 1]; got shape {tuple(images.shape)}")
        feats, logits = [], []
        for chunk in images.split(self.batch_size):
            x = to_uint8(chunk)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            f, z = self.net(x.contiguous().to(self.device))
            feats.append(f.float())
            logits.append(z.float())
        return torch.cat(feats), torch.cat(logits)
