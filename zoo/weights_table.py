"""Shipped demo weights of the MoE-LLaVA family (imported by ``zoo.models`` so the names resolve in ``zoo.load``).

``moe_llava_tiny.shapes``: the tiny recipe's stage-III (MoE) model, float16 in ``zoo/weights/moe_llava_tiny.shapes/``
(``zoo.load`` rebuilds it in float32). ``metrics`` holds the run's own evaluation (first 200 documents per task,
in percent) and, under ``demo64/``, what the shipped file scores on the first 64 documents per task, which
``tests/moe_llava/test_demo_weights.py`` checks. Made with ``recipes/moe_llava/ship_demo.py``.
"""

from __future__ import annotations

from zoo.registry import WeightsCfg, register_weights

__all__ = ["MOE_LLAVA_TINY_SHAPES"]

MOE_LLAVA_TINY_SHAPES = WeightsCfg(
    file="moe_llava_tiny.shapes",
    recipe="recipes/moe_llava/shapes_tiny.yaml@4dd51ff8a30e4479e3956c1f14d2d4ed09b400f6",
    metrics={
        'params_total_M': 2.303,
        'params_active_M': 1.7762,
        'shapes_vqa/accuracy': 55.5,
        'shapes_pope_adversarial/f1': 0.0,
        'shapes_pope_popular/f1': 0.0,
        'shapes_pope_random/f1': 0.0,
        'shapes_pope/f1': 0.0,
        'demo64/shapes_vqa/accuracy': 60.9375,
        'demo64/shapes_pope_adversarial/f1': 0.0,
        'demo64/shapes_pope_popular/f1': 0.0,
        'demo64/shapes_pope_random/f1': 0.0,
        'demo64/shapes_pope/f1': 0.0,
    },
    license="apache-2.0",
    notes=(
        "trained with --set stages.clip.trainer.max_steps=200 (CLIP stage shortened for time on a shared CPU); "
        "below the recipe's targets: existence questions collapsed to 'no' (unbalanced POPE probes, fixed since)"
    ),
)

register_weights("moe_llava_tiny", "shapes", MOE_LLAVA_TINY_SHAPES)
