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
    recipe="recipes/moe_llava/shapes_tiny.yaml@8d0abc9cc283168584bea2b9060840e289679087",
    metrics={
        'params_total_M': 2.303,
        'params_active_M': 1.7762,
        'shapes_vqa/accuracy': 73.0,
        'shapes_pope_adversarial/f1': 84.9558,
        'shapes_pope_popular/f1': 91.5094,
        'shapes_pope_random/f1': 88.6878,
        'shapes_pope/f1': 88.3843,
        'demo64/shapes_vqa/accuracy': 70.3125,
        'demo64/shapes_pope_adversarial/f1': 82.191781,
        'demo64/shapes_pope_popular/f1': 88.235294,
        'demo64/shapes_pope_random/f1': 83.333333,
        'demo64/shapes_pope/f1': 84.586803,
    },
    license="apache-2.0",
    notes=(
        "stage III (moe) of a full run of the recipe at this commit on an idle 2-core machine (clip 138 s, align "
        "49 s, sft 545 s, moe 66 s); the dense stage-II model of the same run scored ShapesVQA 76.5, POPE F1 89.2"
    ),
)

register_weights("moe_llava_tiny", "shapes", MOE_LLAVA_TINY_SHAPES)
