"""Turn a finished tiny MoE-LLaVA run into the shipped demo weights ``moe_llava_tiny.shapes``.

    python recipes/moe_llava/ship_demo.py runs/moe_llava_shapes_tiny/moe/final

Writes ``zoo/weights/moe_llava_tiny.shapes/`` (config.json + model.safetensors in float16, about 5 MB; the model is
rebuilt in float32 by ``zoo.load``), then evaluates the shipped weights exactly as
``tests/moe_llava/test_demo_weights.py`` does (ShapesVQA and ShapesPOPE, first 64 documents per task) and prints
the numbers to record in ``zoo/weights_table.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoo.demo_weights import ROOT, ship_demo
from zoo.demo_weights import demo_scores as _scores

DEMO_TASKS = ["shapes_vqa", "shapes_pope"]
DEMO_LIMIT = 64


def demo_scores(model) -> dict[str, float]:
    """The recorded numbers: primary metrics of the demo tasks on their first DEMO_LIMIT documents."""
    return _scores(model, DEMO_TASKS, DEMO_LIMIT, batch_size=64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("final_dir", type=Path, help="the moe stage's final/ directory")
    p.add_argument("--out", type=Path, default=ROOT / "zoo" / "weights" / "moe_llava_tiny.shapes")
    args = p.parse_args(argv)
    print(json.dumps(ship_demo(args.final_dir, args.out, DEMO_TASKS, DEMO_LIMIT, batch_size=64), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
