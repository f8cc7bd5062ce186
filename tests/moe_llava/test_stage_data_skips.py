"""A moe_llava stage with on_error=skip counts the records its DataLoader workers drop (issue 19: "4 of 8 dropped,
summary says 0"), in summary.json and through ``skipped_samples()``."""

from __future__ import annotations

import json

import torch

from data.formats import export_llava
from data.shapes import ShapesWorld, WorldConfig
from tests.moe_llava.test_stage_moe_llava import LM, VISION

RECIPE = """
recipe: skips
stages:
  - name: align
    type: moe_llava
    model: {architecture: moe_llava_tiny, vision: %(vision)s, lm: %(lm)s, template: phi_nosystem,
            vocab_world: {image_size: 32}, vocab_scenes: 8}
    data: {source: llava_json, json_paths: ["%(json)s"], template: plain, on_error: skip}
    trainable: ["mm_projector.*"]
    batch_size: 8
    num_workers: 2
    trainer: {max_steps: 1, enable_progress_bar: false}
"""


def test_drops_in_dataloader_workers_reach_the_summary(tmp_path, monkeypatch):
    from data import llava
    from zoo.train import train

    world = ShapesWorld(WorldConfig(image_size=32))
    json_path = export_llava(world, "train", 8, tmp_path / "data", "caption")
    records = json.loads(json_path.read_text())
    broken = [tmp_path / "data" / records[i]["image"] for i in (1, 3, 4, 6)]
    recipe = RECIPE.replace("%(vision)s", json.dumps(VISION)).replace("%(lm)s", json.dumps(LM))
    (tmp_path / "skips.yaml").write_text(recipe.replace("%(json)s", str(json_path)))
    built = llava.LlavaDataset.__init__

    def build_then_break(self, *args, **kwargs):
        # Truncate half the images once the dataset has been built and checked, as a disk going bad mid-run
        # would: only the DataLoader workers, which start right after, meet them.
        built(self, *args, **kwargs)
        for path in broken:
            path.write_bytes(path.read_bytes()[:100])  # the PNGs are under 200 bytes

    monkeypatch.setattr(llava.LlavaDataset, "__init__", build_then_break)
    rows = train(tmp_path / "skips.yaml", runs_dir=tmp_path / "runs")
    # The one batch holds all 8 records (batch_size 8): 4 reach the model, 4 are dropped in a worker.
    assert rows[0]["metrics"]["data_skipped_records"] == 4.0
    summary = json.loads((tmp_path / "runs" / "skips" / "align" / "summary.json").read_text())
    assert summary["metrics"]["data_skipped_records"] == 4.0 and summary["steps"] == 1
    # The checkpoint carries the drops, so a resumed run still counts the ones seen before it stopped.
    ckpt = torch.load(tmp_path / "runs" / "skips" / "align" / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(d[1] for d in ckpt["moe_llava_dropped_samples"]) == ["image"] * 4
