"""A moe_llava stage with on_error=skip counts the records its DataLoader workers drop (issue 19: "4 of 8 dropped,
summary says 0"), in summary.json and through ``skipped_samples()``, across a resume too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data import llava
from data.formats import export_llava
from data.shapes import ShapesWorld, WorldConfig

# The toy model of tests/moe_llava/test_stage_moe_llava.py.
VISION = {"kind": "hf", "config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32,
                                   "patch_size": 16}}
LM = {"model_type": "phi", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
      "num_attention_heads": 2, "num_key_value_heads": 2, "partial_rotary_factor": 0.5, "hidden_act": "gelu_new",
      "max_position_embeddings": 256, "tie_word_embeddings": False}

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
    trainer: {max_steps: %(steps)s, ckpt_every_n_steps: 1, enable_progress_bar: false}
"""


def _setup(tmp_path: Path, monkeypatch, steps: int) -> Path:
    """8 records; 4 of their images break right after the first dataset is built and checked."""
    world = ShapesWorld(WorldConfig(image_size=32))
    json_path = export_llava(world, "train", 8, tmp_path / "data", "caption")
    records = json.loads(json_path.read_text())
    broken = [tmp_path / "data" / records[i]["image"] for i in (1, 3, 4, 6)]
    built = llava.LlavaDataset.__init__

    def build_then_break(self, *args, **kwargs):
        # As a disk going bad mid-run would: only the DataLoader workers, which start right after, meet them.
        built(self, *args, **kwargs)
        for path in broken:
            if path.stat().st_size > 100:
                path.write_bytes(path.read_bytes()[:100])  # the PNGs are under 200 bytes

    monkeypatch.setattr(llava.LlavaDataset, "__init__", build_then_break)
    recipe = RECIPE.replace("%(vision)s", json.dumps(VISION)).replace("%(lm)s", json.dumps(LM))
    path = tmp_path / "skips.yaml"
    path.write_text(recipe.replace("%(json)s", str(json_path)).replace("%(steps)s", str(steps)))
    return path


def test_drops_in_dataloader_workers_reach_the_summary(tmp_path, monkeypatch):
    from zoo.train import train

    rows = train(_setup(tmp_path, monkeypatch, steps=1), runs_dir=tmp_path / "runs")
    # The one batch holds all 8 records (batch_size 8): 4 reach the model, 4 are dropped in a worker.
    assert rows[0]["skipped"] == 4
    out = tmp_path / "runs" / "skips" / "align"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == 4 and summary["steps"] == 1
    # The checkpoint carries the drops, so a resumed run still counts the ones seen before it stopped.
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(d[1] for d in ckpt["moe_llava_dropped_samples"]) == ["image"] * 4


def test_a_resumed_stage_counts_each_bad_record_once(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import Callback

    from zoo.train import train

    class Interrupt(RuntimeError):
        pass

    class StopAfterFirstStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:  # after StageCheckpoint wrote last.ckpt for step 1
                raise Interrupt("simulated kill after step 1")

    recipe = _setup(tmp_path, monkeypatch, steps=2)
    with pytest.raises(Interrupt):
        train(recipe, runs_dir=tmp_path / "runs", callbacks=[StopAfterFirstStep()])
    # The resumed run's check skips the 4 broken records up front; the checkpoint says the same 4 were dropped
    # before the interruption: still 4 records, not 8.
    rows = train(recipe, runs_dir=tmp_path / "runs", resume=True)
    assert rows[0]["steps"] == 2 and rows[0]["skipped"] == 4
