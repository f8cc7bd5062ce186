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
    recipe="recipes/moe_llava/shapes_tiny.yaml@1630b8eb82734f2cf36b13f7b767a58d582205ea",
    metrics={
        'params_total_M': 2.5013,
        'params_active_M': 1.9744,
        'shapes_vqa/accuracy': 75.0,
        'shapes_pope_adversarial/f1': 90.5660,
        'shapes_pope_popular/f1': 96.5174,
        'shapes_pope_random/f1': 94.2308,
        'shapes_pope/f1': 93.7714,
        'demo64/shapes_vqa/accuracy': 76.5625,
        'demo64/shapes_pope_adversarial/f1': 92.537313,
        'demo64/shapes_pope_popular/f1': 96.875,
        'demo64/shapes_pope_random/f1': 92.537313,
        'demo64/shapes_pope/f1': 93.983209,
    },
    license="apache-2.0",
    notes=(
        "stage III (moe) of a full run of the recipe at this commit on an idle 2-core machine (clip 256 s, align "
        "57 s, sft 506 s, moe 58 s; 917 s in all); the dense stage-II model of the same run scored ShapesVQA 75.5, "
        "POPE F1 93.3"
    ),
)

register_weights("moe_llava_tiny", "shapes", MOE_LLAVA_TINY_SHAPES)
