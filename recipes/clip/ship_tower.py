"""Turn a finished run of ``recipes/clip/shapes_tiny4_patch.yaml`` into the shipped tower ``clip_vit_tiny4.shapes``.

    python recipes/clip/ship_tower.py runs/clip_shapes_tiny4_patch/clip/final

Writes ``zoo/weights/clip_vit_tiny4.shapes/`` (config.json + model.safetensors in float16; ``zoo.load`` rebuilds the
CLIP in float32), then scores the shipped file as ``tests/clip/test_tower_weights.py`` does (zero-shot colour x
shape accuracy on the first ``DEMO_SCENES`` single-object test scenes, the stage's own templates) and prints what to
record in ``zoo/weights_table.py``. The tiny MoE-LLaVA recipe (``recipes/moe_llava/shapes_tiny.yaml``) starts its
stage I from this tower, as MoE-LLaVA starts from a released CLIP.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NAME = "clip_vit_tiny4.shapes"
RECIPE = ROOT / "recipes" / "clip" / "shapes_tiny4_patch.yaml"
DEMO_SCENES = 200


def demo_scores(model: Any, num_samples: int = DEMO_SCENES) -> dict[str, float]:
    """Zero-shot metrics of ``model`` (a CLIP) with the recipe's eval settings on ``num_samples`` test scenes."""
    import dataclasses

    from zoo.models.clip import get_tokenizer, image_transform
    from zoo.recipe import load_recipe
    from zoo.stages.clip import make_world, zero_shot_report

    stage = load_recipe(RECIPE).stages[0]
    eval_cfg = dataclasses.replace(stage.eval, num_samples=num_samples)
    world = make_world(dataclasses.replace(stage.data, min_objects=1, max_objects=eval_cfg.max_objects))
    report = zero_shot_report(model.eval(), get_tokenizer(stage.model.architecture), image_transform(model, is_train=False),
                              world, eval_cfg)
    return {k: round(v, 6) for k, v in report["metrics"].items()}


def main(argv: list[str] | None = None) -> int:
    import zoo
    from zoo.registry import save_pretrained

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("final_dir", type=Path, help="the clip stage's final/ directory")
    p.add_argument("--out", type=Path, default=ROOT / "zoo" / "weights" / NAME)
    args = p.parse_args(argv)
    src = json.loads((args.final_dir / "config.json").read_text())
    model = zoo.load(args.final_dir)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    save_pretrained(model.half(), args.out, src["architecture"], src["model_args"],
                    source="/".join(args.final_dir.resolve().parts[-4:]), dtype="float16", commit=commit)
    weights = args.out / "model.safetensors"
    print(json.dumps({"size_MiB": round(weights.stat().st_size / 2**20, 2),
                      "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                      "full_run": demo_scores(zoo.load(args.final_dir), 600),
                      f"demo{DEMO_SCENES}": demo_scores(zoo.load(args.out))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
