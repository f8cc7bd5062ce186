"""Issue 19, runner side: nothing outside the runs folder is touched, a diverging run never succeeds, runs are locked,
a resume never mixes two configs or unpickles code, and the failures a careless user meets are one-line errors."""

from __future__ import annotations

import copy
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from zoo.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent

TINY = {
    "recipe": "tiny",
    "stages": [
        {
            "name": "a",
            "type": "runner_tiny_regression",
            "data": {"num_samples": 32},
            "batch_size": 8,
            "seed": 1,
            "trainer": {"max_steps": 6, "log_every_n_steps": 2, "ckpt_every_n_steps": 2, "enable_progress_bar": False},
        },
        {
            "name": "b",
            "type": "runner_tiny_regression",
            "init_from": "a",
            "batch_size": 8,
            "trainer": {"max_steps": 2, "enable_progress_bar": False},
        },
    ],
}


def recipe_file(tmp_path: Path, edit=None) -> Path:
    recipe = copy.deepcopy(TINY)
    if edit is not None:
        edit(recipe)
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


def run_cli(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    return subprocess.run([sys.executable, "-m", "zoo.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


# ---- path traversal -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["recipe", "stage"])
@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", ".hidden", ""])
def test_unsafe_recipe_and_stage_names_are_refused(tmp_path, tiny_stage, where, name):
    def edit(r):
        if where == "recipe":
            r["recipe"] = name
        else:
            r["stages"][1]["name"] = name
            del r["stages"][1]["init_from"]

    with pytest.raises(RecipeError, match="names a folder"):
        load_recipe(recipe_file(tmp_path, edit))


def test_stage_folder_symlinked_outside_the_runs_folder_is_refused(tmp_path, tiny_stage):
    """With --force the old runner's rmtree followed the name out of the runs folder; now nothing there is touched."""
    from zoo.train import RunError, train

    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    runs = tmp_path / "runs"
    (runs / "tiny").mkdir(parents=True)
    (runs / "tiny" / "a").symlink_to(outside, target_is_directory=True)
    for force in (False, True):
        with pytest.raises(RunError, match="outside the runs folder"):
            train(recipe_file(tmp_path), stage="a", runs_dir=runs, force=force)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


# ---- a diverging run never succeeds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml_edit, overrides, key",
    [
        ("lr: .inf", [], "stages[0].optim.lr"),
        ("min_lr_ratio: .nan", [], "stages[0].schedule.min_lr_ratio"),
        ("", ["stages.a.optim.lr=nan"], "stages[0].optim.lr"),
        ("", ["stages.a.optim.lr_scale={'fc1.*': -.inf}"], "stages[0].optim.lr_scale.fc1.*"),
        ("", ["stages.a.model.dropout=.nan"], "stages[0].model.dropout"),
    ],
)
def test_non_finite_recipe_floats_are_refused(tmp_path, tiny_stage, yaml_edit, overrides, key):
    def edit(r):
        if yaml_edit.startswith("lr"):
            r["stages"][0]["optim"] = {"lr": float("inf")}
        elif yaml_edit.startswith("min_lr_ratio"):
            r["stages"][0]["schedule"] = {"min_lr_ratio": float("nan")}

    with pytest.raises(RecipeError) as err:
        load_recipe(recipe_file(tmp_path, edit), overrides)
    assert any(f"{key}: expected a finite number" in p for p in err.value.problems), err.value.problems


def diverging(r):
    r["stages"][0]["optim"] = {"name": "sgd", "lr": 1.0e30, "momentum": 0.0}
    r["stages"][0]["model"] = {"dropout": 0.0}
    r["stages"][0]["trainer"].update(max_steps=8, ckpt_every_n_steps=1, nonfinite_patience=2)


def test_diverging_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path, tiny_stage):
    from zoo.train import RunError, train

    with pytest.raises(RunError, match=r"loss is (nan|inf) at step \d+ \(2 micro-batches in a row") as err:
        train(recipe_file(tmp_path, diverging), runs_dir=tmp_path / "runs")
    out = tmp_path / "runs" / "tiny" / "a"
    assert not (out / "summary.json").exists() and not (out / "final").exists()
    assert not (tmp_path / "runs" / "tiny" / "b").exists()  # the next stage never started from it
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert str(out / "checkpoints" / "last.ckpt") in str(err.value)
    step = int(str(err.value).split(" at step ")[1].split()[0])
    assert ckpt["global_step"] < step  # the kept checkpoint predates the divergence ...
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())  # ... and holds finite weights


def test_non_finite_weights_are_never_exported(tmp_path, tiny_stage):
    """With a patience longer than the stage the loop finishes; the export check still refuses the nan weights."""
    from zoo.train import RunError, train

    def edit(r):
        diverging(r)
        r["stages"][0]["trainer"]["nonfinite_patience"] = 100

    with pytest.raises(RunError, match=r"not exporting .*final: \d+ tensors hold nan/inf"):
        train(recipe_file(tmp_path, edit), stage="a", runs_dir=tmp_path / "runs")
    out = tmp_path / "runs" / "tiny" / "a"
    assert not (out / "final").exists() and not (out / "summary.json").exists()


# ---- resume ---------------------------------------------------------------------------------------------------------


class PlantedCode:
    """A pickle that runs code when unpickled without weights_only (it creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_reads_the_checkpoint_with_weights_only(tmp_path, tiny_stage, monkeypatch):
    from zoo.train import train

    path = recipe_file(tmp_path)
    runs = tmp_path / "runs"
    with pytest.raises(Interrupt):
        train(path, stage="a", runs_dir=runs, callbacks=[interrupt_at(3)])
    ckpt = runs / "tiny" / "a" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    marker = tmp_path / "code_ran"
    torch.save({"global_step": 2, "payload": PlantedCode(marker)}, ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # the environment asks torch to unpickle anything
    with pytest.raises(pickle.UnpicklingError):
        train(path, stage="a", runs_dir=runs)
    assert not marker.exists()


def test_resume_with_a_changed_training_config_is_refused(tmp_path, tiny_stage):
    """Also: the temp files of checkpoint / metrics writes killed mid-way are removed when the stage starts again."""
    from zoo.train import RunError, train

    path = recipe_file(tmp_path)
    runs = tmp_path / "runs"
    with pytest.raises(Interrupt):
        train(path, stage="a", runs_dir=runs, callbacks=[interrupt_at(3)])
    with pytest.raises(RunError) as err:
        train(path, stage="a", runs_dir=runs, overrides=["stages.a.trainer.max_steps=9", "stages.a.optim.lr=0.5"])
    text = str(err.value)
    assert "trainer.max_steps: 6 -> 9" in text and "optim.lr: 0.001 -> 0.5" in text and "--force" in text
    assert not (runs / "tiny" / "a" / "summary.json").exists()
    ckpt_dir = runs / "tiny" / "a" / "checkpoints"
    (ckpt_dir / ".last.ckpt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (runs / "tiny" / "a" / ".metrics.csv.x9.tmp").write_text("step\n")
    # A setting added to mmzoo after the run started (missing from its config.yaml) does not block the resume.
    config_file = runs / "tiny" / "a" / "config.yaml"
    saved = yaml.safe_load(config_file.read_text())
    del saved["stage"]["trainer"]["nonfinite_patience"]
    config_file.write_text(yaml.safe_dump(saved, sort_keys=False))
    # Changing what does not affect training (the progress bar) resumes; --force starts over with the new values.
    rows = train(path, stage="a", runs_dir=runs, overrides=["stages.a.trainer.enable_progress_bar=true"])
    assert rows[0]["steps"] == 6 and rows[0]["skipped"] == 0
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
    assert not list((runs / "tiny" / "a").glob(".*.tmp"))
    rows = train(path, stage="a", runs_dir=runs, force=True, overrides=["stages.a.trainer.max_steps=9"])
    assert rows[0]["steps"] == 9


# ---- one run per folder ---------------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, tiny_stage):
    from lightning.pytorch.callbacks import Callback

    from zoo.train import RunError, train

    seen = []

    class Peek(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((runs / "tiny" / ".lock").read_text().split()[0])

    runs = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (runs / "tiny").mkdir(parents=True)
        (runs / "tiny" / ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(RunError, match=rf"in use by another `zoo train` \(pid {holder.pid}"):
            train(recipe_file(tmp_path), stage="a", runs_dir=runs)
        assert not (runs / "tiny" / "a").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, taken over (held by this process while training), released at the end.
    rows = train(recipe_file(tmp_path), stage="a", runs_dir=runs, callbacks=[Peek()])
    assert rows[0]["status"] == "trained" and not (runs / "tiny" / ".lock").exists()
    assert seen and set(seen) == {str(os.getpid())}


# ---- skipped samples reach the summary ------------------------------------------------------------------------------


def test_skipped_samples_are_printed_and_recorded(tmp_path, tiny_stage, capsys):
    from zoo.stages import register_stage
    from zoo.train import train

    @register_stage("runner_tiny_skipping")
    class Skipping(tiny_stage.TinyRegressionStage):
        def skipped_samples(self):
            return {"truncated image": 2, "bad record": 1}

    def edit(r):
        r["stages"][0]["type"] = "runner_tiny_skipping"

    rows = train(recipe_file(tmp_path, edit), stage="a", runs_dir=tmp_path / "runs")
    summary = json.loads((tmp_path / "runs" / "tiny" / "a" / "summary.json").read_text())
    assert summary["skipped"] == {"truncated image": 2, "bad record": 1} == rows[0]["skipped"]
    assert "stage a: skipped 3 samples (truncated image: 2, bad record: 1)" in capsys.readouterr().out


# ---- one-line errors from `zoo train` -------------------------------------------------------------------------------


def test_cli_errors_are_one_line_not_tracebacks(tmp_path, tiny_stage, capsys):
    """In-process, so an exception escaping `zoo train` (a traceback for the user) fails the test."""
    from zoo import cli

    base = ["train", str(recipe_file(tmp_path)), "--import", "tiny_stage"]
    assert cli.main([*base, "--stage", "b", "--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zoo train: ") and len(err.strip().splitlines()) == 1, err
    assert "starts from stage 'a', which has no export" in err and "run it first" in err

    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a runs folder that cannot be created: nothing is writable there
    assert cli.main([*base, "--stage", "a", "--runs-dir", str(blocker / "runs")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"zoo train: the runs folder {blocker / 'runs'} is not writable"), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_runs_folder_fails_before_training(tmp_path, tiny_stage):
    from zoo.train import RunError, train

    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o555)
    try:
        with pytest.raises(RunError, match="is not writable"):
            train(recipe_file(tmp_path), stage="a", runs_dir=runs)
    finally:
        runs.chmod(0o755)


def test_unknown_stage_fails_before_torch_is_imported(tmp_path):
    """`--stage` typos (with and without --check) are caught by the light first phase: no torch, no Lightning."""
    recipe = REPO / "recipes" / "moe_llava" / "shapes_tiny.yaml"
    stages = ", ".join(s.name for s in load_recipe(recipe, check_stage_types=False).stages)
    probe = (
        "import sys; from zoo.cli import main; "
        f"rc = main(['train', {str(recipe)!r}, '--stage', 'c'] + sys.argv[1:]); "
        "print(rc, 'torch' in sys.modules, 'lightning' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra in ([], ["--check"]):
        out = subprocess.run([sys.executable, "-c", probe, *extra], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.stdout.split() == ["2", "False", "False"], out.stdout + out.stderr
        assert f"--stage 'c': no such stage (stages: {stages})" in out.stderr
