"""Shipped demo weights of the MoE-LLaVA family (imported by ``zoo.models`` so the names resolve in ``zoo.load``).

``moe_llava_tiny.shapes``: the tiny recipe's stage-III (MoE) model, float16 in ``zoo/weights/moe_llava_tiny.shapes/``
(``zoo.load`` rebuilds it in float32). ``metrics`` holds the run's own evaluation (first 1000 documents per task,
in percent) and, under ``demo64/``, what the shipped file scores on the first 64 documents per task, which
``tests/moe_llava/test_demo_weights.py`` checks. Made with ``recipes/moe_llava/ship_demo.py``.
"""

from __future__ import annotations

from zoo.registry import WeightsCfg, register_weights

__all__ = ["MOE_LLAVA_TINY_SHAPES"]

MOE_LLAVA_TINY_SHAPES = WeightsCfg(
    file="moe_llava_tiny.shapes",
    recipe="recipes/moe_llava/shapes_tiny.yaml@a2e415963aa7511be28cefc816f1792a3cabe34c",
    metrics={
        'params_total_M': 2.5013,
        'params_active_M': 1.9744,
        'shapes_vqa/accuracy': 85.2,
        'shapes_pope_adversarial/f1': 95.76,
        'shapes_pope_popular/f1': 98.14,
        'shapes_pope_random/f1': 97.41,
        'shapes_pope/f1': 97.1,
        'demo64/shapes_vqa/accuracy': 84.375,
        'demo64/shapes_pope_adversarial/f1': 96.875,
        'demo64/shapes_pope_popular/f1': 98.412698,
        'demo64/shapes_pope_random/f1': 96.875,
        'demo64/shapes_pope/f1': 97.387566,
    },
    license="apache-2.0",
    notes=(
        "stage III (moe) of `make train` on a fresh clone of this commit, idle 2-core machine (clip 265 s, align "
        "62 s, sft 556 s, moe 70 s; 18:00 in all, install included); the dense stage-II model of the same run "
        "scored ShapesVQA 85.1, POPE F1 97.0 (first 1000 documents per task)"
    ),
)


register_weights("moe_llava_tiny", "shapes", MOE_LLAVA_TINY_SHAPES)
