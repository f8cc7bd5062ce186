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
    recipe="recipes/moe_llava/shapes_tiny.yaml@2e2d0274f9415571e3fa84cf25625c5d8ef29348",
    metrics={
        'params_total_M': 2.5013,
        'params_active_M': 1.9744,
        'shapes_vqa/accuracy': 80.5,
        'shapes_pope_adversarial/f1': 95.0,
        'shapes_pope_popular/f1': 97.9592,
        'shapes_pope_random/f1': 97.0,
        'shapes_pope/f1': 96.6531,
        'demo64/shapes_vqa/accuracy': 82.8125,
        'demo64/shapes_pope_adversarial/f1': 95.238095,
        'demo64/shapes_pope_popular/f1': 96.774194,
        'demo64/shapes_pope_random/f1': 95.238095,
        'demo64/shapes_pope/f1': 95.750128,
    },
    license="apache-2.0",
    notes=(
        "stage III (moe) of a full run of the recipe at this commit on an idle 2-core machine (clip 270 s, align "
        "63 s, sft 573 s, moe 73 s; 1021 s in all); the dense stage-II model of the same run scored ShapesVQA 82.0, "
        "POPE F1 96.5; on the first 1000 documents both score ShapesVQA 82.3"
    ),
)

register_weights("moe_llava_tiny", "shapes", MOE_LLAVA_TINY_SHAPES)
