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
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_TASKS = ["shapes_vqa", "shapes_pope"]
DEMO_LIMIT = 64


def demo_scores(model) -> dict[str, float]:
    """The recorded numbers: primary metrics of the demo tasks on their first DEMO_LIMIT documents."""
    import eval as zoo_eval
    from zoo.stages.moe_llava import summarise_eval

    res = zoo_eval.run(model, DEMO_TASKS, limit=DEMO_LIMIT, batch_size=64, progress=False)
    return {k: round(v, 6) for k, v in summarise_eval(res).items() if not k.endswith("tokens_per_s")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("final_dir", type=Path, help="the moe stage's final/ directory")
    p.add_argument("--out", type=Path, default=ROOT / "zoo" / "weights" / "moe_llava_tiny.shapes")
    args = p.parse_args(argv)

    import zoo
    from zoo.registry import save_pretrained

    src = json.loads((args.final_dir / "config.json").read_text())
    model = zoo.load(args.final_dir)
    counts = model.num_parameters()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    save_pretrained(model.half(), args.out, src["architecture"], src["model_args"],
                    # the run-relative stage folder, not the absolute path of the machine that made it
                    source="/".join(args.final_dir.resolve().parts[-4:]), dtype="float16", commit=commit)
    shipped = zoo.load(args.out)
    scores = demo_scores(shipped)
    size = (args.out / "model.safetensors").stat().st_size / 2**20
    print(json.dumps({"size_MiB": round(size, 2), "params": counts, "demo_scores": scores}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
