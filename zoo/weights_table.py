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
    recipe="recipes/moe_llava/shapes_tiny.yaml@cacab8a5dace2c2334911ceabee575dfc2b800da",
    metrics={
        'params_total_M': 2.303,
        'params_active_M': 1.7762,
        'shapes_vqa/accuracy': 70.0,
        'shapes_pope_adversarial/f1': 80.1619,
        'shapes_pope_popular/f1': 88.1057,
        'shapes_pope_random/f1': 86.6953,
        'shapes_pope/f1': 84.9876,
        'demo64/shapes_vqa/accuracy': 64.0625,
        'demo64/shapes_pope_adversarial/f1': 79.012346,
        'demo64/shapes_pope_popular/f1': 86.486486,
        'demo64/shapes_pope_random/f1': 85.333333,
        'demo64/shapes_pope/f1': 83.610722,
    },
    license="apache-2.0",
    notes=(
        "stages sft and moe of this commit on top of the clip and align stages of an earlier run (commit 435c225, "
        "--set stages.clip.trainer.max_steps=200, the CLIP recipe's settings of that time): the CLIP stage was "
        "shortened for time on a shared CPU, and its shape zero-shot accuracy of 31% caps the shape questions"
    ),
)

register_weights("moe_llava_tiny", "shapes", MOE_LLAVA_TINY_SHAPES)
