"""FID / KID / IS: our torchmetrics pipeline against torchmetrics used directly, scipy, and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from eval.generation.metrics import (
    FeaturePassthrough,
    GenerationMetrics,
    GenerationMetricsConfig,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)


class TableExtractor:
    """Treats each 'image' as a row of precomputed (features | logits), so tests control the feature space."""

    name = "table"

    def __init__(self, num_features: int, num_classes: int) -> None:
        self.num_features, self.num_classes = num_features, num_classes

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rows[:, : self.num_features], rows[:, self.num_features :]


def _gaussians(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = (
        torch.randn(n, d, generator=g, dtype=torch.float64) @ (torch.eye(d, dtype=torch.float64) + 0.5 * mix)
    ) + 0.3
    return a, b


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The TTUR formula written out with scipy's sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_parity_with_torchmetrics_and_scipy(d: int) -> None:
    a, b = _gaussians(400, d, seed=d)
    tm = FrechetInceptionDistance(feature=FeaturePassthrough(d))
    tm.update(a, real=True)
    tm.update(b, real=False)
    ref_tm = float(tm.compute())
    ref_scipy = _scipy_fid(a.numpy(), b.numpy())
    ours_np = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    gm = GenerationMetrics(TableExtractor(d, 3), GenerationMetricsConfig(kid_subset_size=50, kid_subsets=2))
    for chunk in a.split(128):  # batched updates must give the same running statistics
        gm.update_real(torch.cat([chunk, torch.zeros(len(chunk), 3, dtype=chunk.dtype)], 1))
    gm.update_fake(torch.cat([b, torch.zeros(len(b), 3, dtype=b.dtype)], 1))
    ours_tm = gm.compute()["fid"]
    assert ref_tm > 0.05 * d  # the sets differ, so this is not a 0 == 0 comparison
    assert ours_np == pytest.approx(ref_scipy, rel=1e-9, abs=1e-9)
    assert ref_tm == pytest.approx(ref_scipy, rel=1e-6)
    assert ours_tm == pytest.approx(ref_tm, rel=1e-9)


def test_frechet_closed_form_diagonal() -> None:
    # Commuting (diagonal) covariances: Tr sqrt(S1 S2) = sum sqrt(s1_i s2_i), so
    # FID = |mu1 - mu2|^2 + sum (sqrt(s1_i) - sqrt(s2_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_singular_covariances_fall_back_to_offset() -> None:
    # Rank-deficient covariances (fewer samples than dimensions) must still give a finite, non-negative value.
    a, b = _gaussians(5, 12, seed=3)
    value = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert math.isfinite(value) and value > 0


def test_frechet_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_kid_matches_unbiased_mmd_formula() -> None:
    # One subset of all samples: the subset permutation does not change the unbiased MMD^2, so torchmetrics'
    # KID equals the closed formula on the full sets.
    a, b = _gaussians(60, 8, seed=1)
    gm = GenerationMetrics(TableExtractor(8, 2), GenerationMetricsConfig(kid_subsets=1, kid_subset_size=60))
    pad = torch.zeros(60, 2, dtype=a.dtype)
    gm.update_real(torch.cat([a, pad], 1))
    gm.update_fake(torch.cat([b, pad], 1))
    out = gm.compute()
    ref = kernel_inception_distance(a.numpy(), b.numpy())
    assert ref > 0.01
    assert out["kid_mean"] == pytest.approx(ref, rel=1e-9)
    assert out["kid_std"] == 0.0
    # equal distributions: unbiased MMD^2 is near 0 (and may be slightly negative)
    c, _ = _gaussians(60, 8, seed=2)
    assert abs(kernel_inception_distance(a.numpy(), c.numpy())) < 0.2 * ref


def test_kid_subset_size_is_clamped_and_reported() -> None:
    a, b = _gaussians(30, 4, seed=5)
    gm = GenerationMetrics(TableExtractor(4, 2))  # default subset size 1000 > 30 samples
    pad = torch.zeros(30, 2, dtype=a.dtype)
    gm.update_real(torch.cat([a, pad], 1))
    gm.update_fake(torch.cat([b, pad], 1))
    out = gm.compute()
    assert out["kid_subset_size"] == 30
    assert out == gm.compute()  # seeded: repeated computes agree


def test_inception_score_parity_and_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=g, dtype=torch.float64) * 3
    tm = InceptionScore(feature=FeaturePassthrough(10), splits=1)
    tm.update(logits)
    ref_mean, _ = tm.compute()
    mean, std = inception_score(logits.numpy(), splits=1)
    assert mean == pytest.approx(float(ref_mean), rel=1e-9)
    assert std == 0.0
    # confident and uniform over C classes -> IS = C; always the same class -> IS = 1
    sharp = torch.full((100, 10), -1e4, dtype=torch.float64)
    sharp[torch.arange(100), torch.arange(100) % 10] = 0
    assert inception_score(sharp.numpy())[0] == pytest.approx(10.0, rel=1e-9)
    sharp_one = torch.full((100, 10), -1e4, dtype=torch.float64)
    sharp_one[:, 3] = 0
    assert inception_score(sharp_one.numpy())[0] == pytest.approx(1.0, rel=1e-9)
    # through GenerationMetrics (torchmetrics inside)
    gm = GenerationMetrics(TableExtractor(2, 10), GenerationMetricsConfig(is_splits=1))
    gm.update_real(torch.cat([torch.randn(100, 2, dtype=torch.float64), sharp], 1))
    gm.update_fake(torch.cat([torch.randn(100, 2, dtype=torch.float64), sharp], 1))
    assert gm.compute()["is_mean"] == pytest.approx(10.0, rel=1e-6)


def test_class_accuracy_and_reset_keeps_real() -> None:
    n = 20
    logits = torch.full((n, 4), -5.0, dtype=torch.float64)
    pred = torch.arange(n) % 4
    logits[torch.arange(n), pred] = 5.0
    labels = pred.clone()
    labels[:5] = (labels[:5] + 1) % 4  # 5 of 20 wrong
    rows = torch.cat([torch.randn(n, 3, dtype=torch.float64), logits], 1)
    gm = GenerationMetrics(TableExtractor(3, 4), GenerationMetricsConfig(kid_subset_size=10, kid_subsets=2))
    gm.update_real(rows)
    gm.update_fake(rows, labels)
    out = gm.compute()
    assert out["class_acc"] == pytest.approx(100 * 15 / 20)  # percent
    assert out["fid"] == pytest.approx(0.0, abs=1e-6)  # identical sets
    assert sum(out[f"class_acc_{c}"] * int((labels == c).sum()) for c in range(4)) == pytest.approx(100 * 15)
    gm.reset_fake()
    gm.update_fake(
        rows + torch.cat([torch.ones(n, 3, dtype=torch.float64), torch.zeros(n, 4, dtype=torch.float64)], 1)
    )
    out2 = gm.compute()
    assert out2["n_real"] == n and out2["n_fake"] == n and "class_acc" not in out2
    assert out2["fid"] == pytest.approx(3.0, rel=1e-6)  # mean shifted by 1 in 3 dims, same covariance
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        gm.update_fake(rows, torch.full((n,), 7))
    empty = GenerationMetrics(TableExtractor(3, 4))
    with pytest.raises(RuntimeError, match="at least 2 real"):
        empty.compute()
