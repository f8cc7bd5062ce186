"""Turning a finished recipe run into shipped demo weights (``zoo/weights/<name>/``), and the scores recorded for them.

Used by the recipes' ``ship_demo.py`` scripts and re-checked by their ``test_demo_weights.py``: the weights are saved
in float16 with the run's stage folder and the commit, loaded back as a user would (``zoo.load``, which rebuilds the
model in float32), and scored on the first documents of the demo tasks.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def demo_scores(model: Any, tasks: list[str], limit: int, batch_size: int) -> dict[str, float]:
    """Primary metrics of ``tasks`` on their first ``limit`` documents (throughputs left out: they are not recorded)."""
    import eval as zoo_eval
    from zoo.stages.moe_llava import summarise_eval

    res = zoo_eval.run(model, tasks, limit=limit, batch_size=batch_size, progress=False)
    return {k: round(v, 6) for k, v in summarise_eval(res).items() if not k.endswith("tokens_per_s")}


def ship_demo(final_dir: Path, out: Path, tasks: list[str], limit: int, batch_size: int) -> dict[str, Any]:
    """Save the stage export ``final_dir`` as float16 demo weights in ``out``; return what ``weights_table`` records:
    size, sha256 of the weights file, parameter counts and the shipped weights' demo scores."""
    import zoo
    from zoo.registry import save_pretrained

    src = json.loads((final_dir / "config.json").read_text())
    model = zoo.load(final_dir)
    counts = model.num_parameters()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    save_pretrained(model.half(), out, src["architecture"], src["model_args"],
                    # the run-relative stage folder, not the absolute path of the machine that made it
                    source="/".join(final_dir.resolve().parts[-4:]), dtype="float16", commit=commit)
    weights = out / "model.safetensors"
    return {"size_MiB": round(weights.stat().st_size / 2**20, 2),
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "params": counts,
            "demo_scores": demo_scores(zoo.load(out), tasks, limit, batch_size)}
