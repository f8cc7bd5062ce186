"""FID, KID and IS through torchmetrics over features from any extractor, plus independent reference formulas.

torchmetrics' ``FrechetInceptionDistance``, ``KernelInceptionDistance`` and ``InceptionScore`` accept any
``nn.Module`` as ``feature``; with a custom module they pass their input through unchanged. We run the feature
extractor ourselves once per batch (one forward yields both the feature vector and the class logits) and hand
torchmetrics the finished features through :class:`FeaturePassthrough`. This keeps one forward per image for all
three metrics and lets the same code serve the Inception network (when the user has its weights file) and the
shipped digit classifier.

The numpy/scipy functions at the bottom (:func:`frechet_distance`, :func:`kernel_inception_distance`,
:func:`inception_score`) are written from the papers' formulas, independently of torchmetrics, and serve as the
reference in the parity tests and for precomputed statistics (e.g. an ADM reference batch's ``mu``/``sigma``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

__all__ = [
    "FeatureExtractor",
    "FeaturePassthrough",
    "GenerationMetrics",
    "GenerationMetricsConfig",
    "feature_statistics",
    "frechet_distance",
    "kernel_inception_distance",
    "inception_score",
]


class FeatureExtractor(Protocol):
    """What the metrics need from a feature network.

    ``__call__(images)`` takes images in [-1, 1], shape (N, C, H, W), and returns ``(features, logits)``:
    features (N, num_features) for FID/KID and class logits (N, num_classes) for IS and class accuracy.
    """

    num_features: int
    num_classes: int
    name: str

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]: ...


class FeaturePassthrough(nn.Module):
    """Identity "feature network" for torchmetrics: the inputs already are features of width ``num_features``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        # torchmetrics reads this attribute instead of probing the module with a dummy 299x299 image.
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected features of shape (N, {self.num_features}), got {tuple(x.shape)}")
        return x


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationMetricsConfig:
    kid_subsets: int = 100
    kid_subset_size: int = (
        1000  # clamped to the smaller sample count at compute time (reported as kid_subset_size)
    )
    is_splits: int = 10
    seed: int = 0  # KID subsets and the IS shuffle draw from torch's RNG; we fork and seed it so runs repeat


class GenerationMetrics:
    """Accumulate real and generated images, then compute FID, KID, IS and class accuracy in one feature space.

    Real statistics survive :meth:`reset_fake`, so one reference set serves several generators (dense vs MoE).
    """

    def __init__(self, extractor: FeatureExtractor, cfg: GenerationMetricsConfig | None = None) -> None:
        self.extractor = extractor
        self.cfg = cfg or GenerationMetricsConfig()
        d = extractor.num_features
        self.fid = FrechetInceptionDistance(feature=FeaturePassthrough(d), reset_real_features=False)
        with warnings.catch_warnings():
            # KID and IS warn that they buffer all features; that is how they work, and our features are small
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(
                feature=FeaturePassthrough(d),
                subsets=self.cfg.kid_subsets,
                subset_size=self.cfg.kid_subset_size,
                reset_real_features=False,
            )
            self.inception_score = InceptionScore(
                feature=FeaturePassthrough(extractor.num_classes), splits=self.cfg.is_splits
            )
        # torchmetrics states (not Python counters), so that a distributed run reduces them like FID's sums
        self.confusion = MulticlassConfusionMatrix(extractor.num_classes)  # rows: conditioning class
        self.num_real = SumMetric()
        self.num_fake = SumMetric()

    @torch.no_grad()
    def update_real(self, images: Tensor) -> None:
        feats, _ = self.extractor(images)
        # metric states live on the CPU whatever device the feature network runs on
        feats = feats.detach().double().cpu()
        self.fid.update(feats, real=True)
        self.kid.update(feats, real=True)
        self.num_real.update(feats.shape[0])

    @torch.no_grad()
    def update_fake(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Add generated images; with ``labels`` (their conditioning classes) also count class accuracy.

        Returns the feature network's predicted class per image (for per-sample records).
        """
        feats, logits = self.extractor(images)
        feats, logits = feats.detach().double().cpu(), logits.detach().cpu()
        self.fid.update(feats, real=False)
        self.kid.update(feats, real=False)
        self.inception_score.update(logits.double())
        self.num_fake.update(feats.shape[0])
        if labels is not None:
            labels = torch.as_tensor(labels).long().reshape(-1).cpu()
            if labels.shape[0] != logits.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for {logits.shape[0]} images")
            if labels.min() < 0 or labels.max() >= self.extractor.num_classes:
                raise ValueError(
                    f"labels must lie in [0, {self.extractor.num_classes}) for {self.extractor.name}; "
                    f"got min {int(labels.min())}, max {int(labels.max())}"
                )
            self.confusion.update(logits.argmax(dim=1), labels)
        return logits.argmax(dim=1)

    def reset_fake(self) -> None:
        """Forget generated images, keep the real reference statistics."""
        self.fid.reset()
        self.kid.reset()
        self.inception_score.reset()
        self.confusion.reset()
        self.num_fake.reset()

    def compute(self) -> dict[str, float]:
        n_real, n_fake = (int(m.compute()) if m.update_called else 0 for m in (self.num_real, self.num_fake))
        if n_real < 2 or n_fake < 2:
            raise RuntimeError(
                f"need at least 2 real and 2 generated images, have {n_real} real and {n_fake} generated"
            )
        out: dict[str, float] = {"fid": float(self.fid.compute())}
        subset = min(self.cfg.kid_subset_size, n_real, n_fake)
        self.kid.subset_size = subset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            kid_mean, kid_std = self.kid.compute()
            with warnings.catch_warnings():
                # fewer samples than splits gives empty chunks; torchmetrics warns, the result is still defined
                warnings.simplefilter("ignore")
                is_mean, is_std = self.inception_score.compute()
        out |= {
            "kid_mean": float(kid_mean),
            "kid_std": float(kid_std),
            "kid_subset_size": float(subset),
            "is_mean": float(is_mean),
            "is_std": float(is_std) if self.cfg.is_splits > 1 else 0.0,  # one split: no spread (not NaN)
            "n_real": float(n_real),
            "n_fake": float(n_fake),
        }
        cm = self.confusion.compute().long() if self.confusion.update_called else None
        per_class_total = cm.sum(dim=1) if cm is not None else None
        if cm is not None and per_class_total.sum() > 0:
            # Percent, as every accuracy mmzoo reports (eval tables, stage summaries, README).
            out["class_acc"] = 100 * int(cm.diagonal().sum()) / int(per_class_total.sum())
            for c in per_class_total.nonzero().flatten().tolist():
                out[f"class_acc_{c}"] = 100 * int(cm[c, c]) / int(per_class_total[c])
        return out


# ---------------------------------------------------------------------------------------------------------------
# Reference formulas (numpy / scipy), independent of torchmetrics
# ---------------------------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (N-1) covariance of ``features`` (N, d), in float64, as in TTUR/ADM (``np.cov``)."""
    f = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, d); got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) with scipy's sqrtm.

    As in the TTUR/ADM evaluators: if the square root is not finite (singular product), retry with ``eps * I``
    added to both covariances; a small imaginary part from round-off is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(
                f"matrix square root has a large imaginary component ({imag:.3g}); covariances are not PSD"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float | None, coef: float) -> np.ndarray:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * x @ y.T + coef) ** degree


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, degree: int = 3, gamma: float | None = None, coef: float = 1.0
) -> float:
    """Unbiased MMD^2 with the polynomial kernel (Binkowski et al. 2018) on one pair of equal-size feature sets."""
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = x.shape[0]
    if y.shape[0] != m:
        raise ValueError(f"KID on one subset needs equal sizes; got {m} real and {y.shape[0]} fake")
    kxx, kyy, kxy = (_poly_kernel(a, b, degree, gamma, coef) for a, b in ((x, x), (y, y), (x, y)))
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2.0 * kxy.sum() / (m * m))


def inception_score(logits: np.ndarray, splits: int = 1) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over ``splits`` consecutive chunks; returns (mean, unbiased std over chunks)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    scores = []
    for chunk in np.array_split(logp, splits):
        p = np.exp(chunk)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_py = np.log(p.mean(axis=0, keepdims=True))
            kl = np.where(p > 0, p * (chunk - log_py), 0.0)  # 0 log 0 = 0
        scores.append(np.exp(kl.sum(axis=1).mean()))
    s = np.asarray(scores)
    return float(s.mean()), float(s.std(ddof=1)) if len(s) > 1 else 0.0
