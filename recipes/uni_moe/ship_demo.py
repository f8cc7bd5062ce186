"""Turn a finished tiny Uni-MoE run into the shipped demo weights ``uni_moe_tiny.shapes_av``.

    python recipes/uni_moe/ship_demo.py runs/uni_moe_shapes_av_tiny/moe/final

Writes ``zoo/weights/uni_moe_tiny.shapes_av/`` (config.json + model.safetensors in float16; ``zoo.load`` rebuilds
the model in float32), then evaluates the shipped weights exactly as ``tests/uni_moe/test_demo_weights.py`` does
(the four synthetic-world tasks, first DEMO_LIMIT documents each) and prints the numbers and the sha256 to record in
``zoo/weights_table.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoo.demo_weights import ROOT, ship_demo
from zoo.demo_weights import demo_scores as _scores

DEMO_TASKS = ["shapes_vqa", "shapes_video_qa", "shapes_audio_qa", "shapes_speech_vqa"]
DEMO_LIMIT = 32


def demo_scores(model) -> dict[str, float]:
    """The recorded numbers: primary metrics of the demo tasks on their first DEMO_LIMIT documents."""
    return _scores(model, DEMO_TASKS, DEMO_LIMIT, batch_size=DEMO_LIMIT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("final_dir", type=Path, help="the moe stage's final/ directory")
    p.add_argument("--out", type=Path, default=ROOT / "zoo" / "weights" / "uni_moe_tiny.shapes_av")
    args = p.parse_args(argv)
    print(json.dumps(ship_demo(args.final_dir, args.out, DEMO_TASKS, DEMO_LIMIT, batch_size=DEMO_LIMIT), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
