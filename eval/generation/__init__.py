"""Image-generation evaluation: FID/KID/IS (torchmetrics) in a pluggable feature space, class accuracy of
class-conditional samples, sample grids and the DiT-MoE expert-specialisation heatmaps.

Feature spaces: :class:`InceptionExtractor` (Inception-v3 pool3 from a local torch-fidelity / pytorch-fid weights
file; standard FID) or :class:`DigitClassifierExtractor` over the shipped digit classifier ``digit_cnn.digits``
("FID-digits", for the pixel-space digits recipes; numbers are not comparable with Inception FID).

    from eval.generation import GenerationMetrics, DigitClassifierExtractor, load_digit_classifier
    m = GenerationMetrics(DigitClassifierExtractor(load_digit_classifier()))
    m.update_real(real_images)                 # (N, 1, 16, 16) in [-1, 1]
    m.update_fake(samples, labels)             # the conditioning classes give class_acc
    m.compute()   # {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "class_acc", "class_acc_<c>" (percent), ...}
"""

from eval.generation.digit_classifier import (
    DigitClassifierExtractor,
    DigitCNN,
    DigitCNNConfig,
    load_digit_classifier,
)
from eval.generation.grid import save_sample_grid, to_uint8
from eval.generation.inception import InceptionExtractor
from eval.generation.metrics import (
    FeatureExtractor,
    FeaturePassthrough,
    GenerationMetrics,
    GenerationMetricsConfig,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from eval.generation.routing import RoutingCollector, RoutingCounts, sample_with_routing

__all__ = [
    "DigitCNN",
    "DigitCNNConfig",
    "DigitClassifierExtractor",
    "FeatureExtractor",
    "FeaturePassthrough",
    "GenerationMetrics",
    "GenerationMetricsConfig",
    "InceptionExtractor",
    "RoutingCollector",
    "RoutingCounts",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_digit_classifier",
    "sample_with_routing",
    "save_sample_grid",
    "to_uint8",
]
