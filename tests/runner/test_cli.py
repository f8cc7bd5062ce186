"""The `zoo` command line: help, list, dispatch to modules other packages provide."""

from __future__ import annotations

import importlib.util

import pytest

from zoo import cli


def test_help_mentions_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "list", "eval", "chat", "sample", "convert"):
        assert command in out


def test_train_help_explains_outputs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for text in ("--stage", "--resume", "--set", "--runs-dir", "MMZOO_RUNS", "summary.json", "checkpoints/last.ckpt"):
        assert text in out


def test_list_models_tasks_and_stage_types(capsys):
    """`--tasks` lists benchmarks (as lmms-eval's word), `--stage-types` what a recipe stage's `type:` may be."""
    assert cli.main(["list", "clip_*"]) == 0
    assert "clip_vit_tiny" in capsys.readouterr().out.split()
    assert cli.main(["list", "--stage-types"]) == 0
    stage_types = capsys.readouterr().out.split()
    assert {"clip_contrastive", "moe_llava", "dit_diffusion"} <= set(stage_types)
    assert cli.main(["list", "--tasks", "shapes_*"]) == 0
    tasks = capsys.readouterr().out.split()
    assert "shapes_vqa" in tasks and "clip_contrastive" not in tasks


def test_old_task_key_names_its_new_name(tmp_path):
    from zoo.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: r\nstages:\n  - name: a\n    task: clip_contrastive\n    batch_size: 2\n"
                      "    trainer: {max_steps: 1}\n")
    with pytest.raises(RecipeError, match=r"stages\[0\]\.task: unknown key\. It was renamed 'type'"):
        load_recipe(recipe, check_stage_types=False)


def test_dispatch_import_errors_propagate(monkeypatch):
    """Every dispatched module exists; a failing import is a real error and keeps its traceback."""
    for module, _ in cli.DISPATCH.values():
        assert importlib.util.find_spec(module) is not None, module
    monkeypatch.setitem(cli.DISPATCH, "chat", ("zoo._no_such_module_", "chat"))
    with pytest.raises(ModuleNotFoundError, match="zoo._no_such_module_"):
        cli.main(["chat", "--model", "x"])


def test_dispatch_passes_argv_through(monkeypatch):
    import sys
    import types

    seen = {}
    fake = types.ModuleType("zoo_fake_sample")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "zoo_fake_sample", fake)
    monkeypatch.setitem(cli.DISPATCH, "sample", ("zoo_fake_sample", "sample"))
    assert cli.main(["sample", "--help", "-n", "4"]) == 0
    assert seen["argv"] == ["--help", "-n", "4"]


def test_check_validates_and_prints_plan(tmp_path, capsys):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "clip" / "shapes_tiny.yaml"
    assert cli.main(["train", str(recipe), "--check", "--set", "stages.clip.trainer.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "clip: clip_contrastive, 7 steps" in out
