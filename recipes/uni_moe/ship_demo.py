"""Turn a finished tiny Uni-MoE run into the shipped demo weights ``uni_moe_tiny.shapes_av``.

    python recipes/uni_moe/ship_demo.py runs/uni_moe_shapes_av_tiny/moe/final

Writes ``zoo/weights/uni_moe_tiny.shapes_av/`` (config.json + model.safetensors in float16; ``zoo.load`` rebuilds
the model in float32), then evaluates the shipped weights exactly as ``tests/uni_moe/test_demo_weights.py`` does
(the four synthetic-world tasks, first DEMO_LIMIT documents each) and prints the numbers and the sha256 to record in
``zoo/weights_table.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_TASKS = ["shapes_vqa", "shapes_video_qa", "shapes_audio_qa", "shapes_speech_vqa"]
DEMO_LIMIT = 32


def demo_scores(model) -> dict[str, float]:
    """The recorded numbers: primary metrics of the demo tasks on their first DEMO_LIMIT documents."""
    import eval as zoo_eval
    from zoo.stages.moe_llava import summarise_eval

    res = zoo_eval.run(model, DEMO_TASKS, limit=DEMO_LIMIT, batch_size=DEMO_LIMIT, progress=False)
    return {k: round(v, 6) for k, v in summarise_eval(res).items() if not k.endswith("tokens_per_s")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("final_dir", type=Path, help="the moe stage's final/ directory")
    p.add_argument("--out", type=Path, default=ROOT / "zoo" / "weights" / "uni_moe_tiny.shapes_av")
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
    weights = args.out / "model.safetensors"
    shipped = zoo.load(args.out)
    scores = demo_scores(shipped)
    print(json.dumps({"size_MiB": round(weights.stat().st_size / 2**20, 2),
                      "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "params": counts,
                      "demo_scores": scores}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
