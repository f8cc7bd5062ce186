"""The staged runner on a tiny regression task: outputs, chaining by name, skip, resume, DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

RECIPE = {
    "recipe": "tiny",
    "stages": [
        {
            "name": "a",
            "type": "runner_tiny_regression",
            "model": {"dim": 8, "hidden": 16},
            "data": {"num_samples": 40},  # not a multiple of the batch: epochs wrap mid-batch
            "optim": {"name": "adamw", "lr": 1.0e-2},
            "schedule": {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
            "batch_size": 8,
            "seed": 3,
            "trainer": {"max_steps": 12, "log_every_n_steps": 2, "ckpt_every_n_steps": 5, "enable_progress_bar": False},
        },
        {
            "name": "b",
            "type": "runner_tiny_regression",
            "init_from": "a",
            "trainable": ["*"],
            "frozen": ["fc1.*"],
            "batch_size": 8,
            "trainer": {"max_steps": 4, "ckpt_every_n_steps": 2, "enable_progress_bar": False},
        },
    ],
}


def write_recipe(tmp_path: Path, recipe: dict = RECIPE) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


class Interrupt(RuntimeError):
    pass


def interrupt_at(step: int):
    from lightning.pytorch.callbacks import Callback

    class Stop(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == step:
                raise Interrupt(f"simulated kill at step {step}")

    return Stop()


def test_two_stages_outputs_chaining_and_skip(tmp_path, tiny_stage, capsys):
    from zoo.registry import load
    from zoo.train import train

    path = write_recipe(tmp_path)
    rows = train(path, runs_dir=tmp_path / "runs")
    assert [r["status"] for r in rows] == ["trained", "trained"]
    a, b = (tmp_path / "runs" / "tiny" / n for n in ("a", "b"))
    for d in (a, b):
        assert (d / "config.yaml").is_file() and (d / "checkpoints" / "last.ckpt").is_file()
        assert (d / "final" / "model.safetensors").is_file() and (d / "final" / "config.json").is_file()
    summary = json.loads((a / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["samples"] == 96
    assert set(summary["metrics"]) == {"eval_mse", "weight_sum"}
    assert summary["params"] == {"trainable": 280, "frozen": 0}
    # metrics.csv: every log_every_n_steps plus the last step, with the task's logs
    with open(a / "metrics.csv") as f:
        rows_csv = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows_csv] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "abs_err", "lr"} <= set(rows_csv[0])
    # stage b started from a's export (by name) and kept fc1 frozen
    resolved = yaml.safe_load((b / "config.yaml").read_text())
    assert resolved["init_from_dir"] == str(a / "final")
    assert json.loads((b / "summary.json").read_text())["params"] == {"trainable": 136, "frozen": 144}
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert torch.equal(wa["fc1.weight"], wb["fc1.weight"]) and not torch.equal(wa["fc2.weight"], wb["fc2.weight"])
    # the export is zoo.load-able
    model = load(b / "final")
    assert torch.equal(model.fc2.weight, wb["fc2.weight"])
    out = capsys.readouterr().out
    assert "results: tiny" in out and "eval_mse=" in out
    # finished stages are skipped on a rerun
    again = train(path, runs_dir=tmp_path / "runs")
    assert [r["status"] for r in again] == ["skipped (done)", "skipped (done)"]
    assert again[0]["metrics"] == summary["metrics"]


def test_stage_needs_its_source_finished(tmp_path, tiny_stage):
    from zoo.train import train

    with pytest.raises(FileNotFoundError, match="run it first"):
        train(write_recipe(tmp_path), stage="b", runs_dir=tmp_path / "runs")


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "adamw_grouped"])
def test_resume_after_interruption_matches_uninterrupted(tmp_path, tiny_stage, monkeypatch, optimizer):
    from zoo.train import train

    recipe = yaml.safe_load(yaml.safe_dump(RECIPE))
    recipe["stages"][0]["optim"]["name"] = optimizer.removesuffix("_grouped")  # muon: both inner states resume
    if optimizer.endswith("_grouped"):  # batches sorted by length within megabatches of 3: resumed mid-megabatch
        recipe["stages"][0].update(type="runner_tiny_lengths", group_by_length=3)
    path = write_recipe(tmp_path, recipe)
    straight = train(path, stage="a", runs_dir=tmp_path / "straight")[0]

    monkeypatch.setenv("MMZOO_RUNS", str(tmp_path / "resumed"))  # also checks the env default for the root
    with pytest.raises(Interrupt):
        train(path, stage="a", callbacks=[interrupt_at(7)])
    out = tmp_path / "resumed" / "tiny" / "a"
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "summary.json").exists()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
    resumed = train(path, stage="a", resume=True)[0]

    assert resumed["metrics"] == straight["metrics"]  # bit-identical, not just close
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    w1 = load_file(tmp_path / "straight" / "tiny" / "a" / "final" / "model.safetensors")
    w2 = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    with open(out / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [2, 4, 6, 8, 10, 12]  # rows logged after the checkpoint were dropped and redone once


def test_force_retrains(tmp_path, tiny_stage):
    from zoo.train import train

    path = write_recipe(tmp_path)
    first = train(path, stage="a", runs_dir=tmp_path / "runs")[0]
    again = train(path, stage="a", runs_dir=tmp_path / "runs", force=True)[0]
    assert again["status"] == "trained" and again["metrics"] == first["metrics"]


def test_glob_matching_nothing_is_an_error(tmp_path, tiny_stage):
    from zoo.recipe import RecipeError
    from zoo.train import train

    recipe = yaml.safe_load(yaml.safe_dump(RECIPE))
    recipe["stages"][0]["frozen"] = ["encoder.*"]
    with pytest.raises(RecipeError, match=r"frozen: glob 'encoder\.\*' matches no parameter"):
        train(write_recipe(tmp_path, recipe), runs_dir=tmp_path / "runs")


def _cli_train(tmp_path: Path, recipe: Path, runs: str, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    cmd = [sys.executable, "-m", "zoo.cli", "train", str(recipe), "--import", "tiny_stage", "--stage", "a",
           "--runs-dir", str(tmp_path / runs)]
    for o in overrides:
        cmd += ["--set", o]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads((tmp_path / runs / "tiny" / "a" / "summary.json").read_text())


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """2 CPU processes (gloo) x batch 4 == 1 process x batch 8: same global batches, averaged gradients."""
    recipe = write_recipe(tmp_path)
    common = ["stages.a.model.dropout=0.0", "stages.a.trainer.max_steps=8"]
    one = _cli_train(tmp_path, recipe, "one", [*common, "stages.a.batch_size=8"])
    two = _cli_train(
        tmp_path, recipe, "two",
        [*common, "stages.a.batch_size=4", "stages.a.trainer.devices=2", "stages.a.trainer.strategy=ddp"],
    )
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["samples"] == one["samples"]
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    w1 = load_file(tmp_path / "one" / "tiny" / "a" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "tiny" / "a" / "final" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_checkpoint_write_is_atomic(tmp_path):
    """A save that dies half-way leaves the previous last.ckpt intact and no stray temp file."""
    from zoo.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 5}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"global_step": 6, "junk": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 5}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_lr_scale_groups_parameters_by_glob():
    import torch

    from zoo.stages.base import param_groups

    net = torch.nn.ModuleDict({"tower": torch.nn.Linear(3, 4), "head": torch.nn.Linear(4, 2)})
    named = list(net.named_parameters())
    groups = param_groups(named, lr=1e-3, weight_decay=0.1, lr_scale={"tower.*": 0.1})
    # base-rate groups first (the logged lr), then the tower's; decay only on matrices
    summary = [(g["lr"], g["weight_decay"], sorted(id(p) for p in g["params"])) for g in groups]
    assert summary == [
        (1e-3, 0.1, [id(net["head"].weight)]),
        (1e-3, 0.0, [id(net["head"].bias)]),
        (pytest.approx(1e-4), 0.1, [id(net["tower"].weight)]),
        (pytest.approx(1e-4), 0.0, [id(net["tower"].bias)]),
    ]
    assert len(param_groups(named, 1e-3, 0.0, {})) == 2
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        param_groups(named, 1e-3, 0.0, {"vision.*": 0.1})
