"""Lightning habits in recipes: the trainer block takes lightning.Trainer's own arguments (checked against its
signature), optimizers by import path, optional loggers, `zoo train --print-config`, quiet hardware lines, and
loss curves per stage written at the end of `zoo train`."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import yaml

from zoo.recipe import RecipeError, load_recipe

RECIPE = {
    "recipe": "habits",
    "stages": [{
        "name": "a", "type": "runner_tiny_regression", "model": {"dim": 8, "hidden": 16},
        "data": {"num_samples": 40}, "batch_size": 8,
        "optim": {"name": "torch.optim.RAdam", "lr": 1.0e-2, "args": {"eps": 1.0e-6}},
        "trainer": {"max_steps": 6, "log_every_n_steps": 2, "ckpt_every_n_steps": 3, "enable_progress_bar": False,
                    "reload_dataloaders_every_n_epochs": 2},
    }],
}  # fmt: skip


def _write(tmp_path, recipe=RECIPE):
    path = tmp_path / "habits.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_trainer_arguments_optimizer_path_quiet_logs_and_loss_png(tmp_path, tiny_stage, capfd):
    from lightning.pytorch.callbacks import Callback

    from zoo.train import train

    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["optimizer"] = type(trainer.optimizers[0])
            seen["eps"] = trainer.optimizers[0].defaults["eps"]
            seen["reload"] = trainer.reload_dataloaders_every_n_epochs

    train(_write(tmp_path), runs_dir=tmp_path / "runs", callbacks=[Probe()])
    assert seen == {"optimizer": torch.optim.RAdam, "eps": 1.0e-6, "reload": 2}
    png = tmp_path / "runs" / "habits" / "a" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capfd.readouterr()
    assert f"loss curves: {png}" in printed.out
    for noise in ("GPU available", "TPU available", "Tip:"):
        assert noise not in printed.out + printed.err


def test_trainer_block_is_checked_against_the_trainer_signature(tmp_path):
    bad = copy.deepcopy(RECIPE)
    bad["stages"][0]["trainer"] |= {"benchmarc": True, "callbacks": [], "loggers": ["csv"]}
    bad["stages"][0]["optim"]["name"] = "radam"
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, bad), check_stage_types=False)
    text = str(e.value)
    assert "trainer.benchmarc: unknown key. Did you mean 'benchmark'?" not in text  # not one of the block's own
    assert "trainer.benchmarc: unknown key." in text and "and the arguments of lightning.Trainer" in text
    assert "trainer.callbacks: set by the runner" in text
    assert "trainer.loggers" in text and "optim.name 'radam'" in text
    ok = load_recipe(_write(tmp_path), check_stage_types=False)
    assert ok.stages[0].trainer.extra == {"reload_dataloaders_every_n_epochs": 2}


def test_a_logger_that_is_not_installed_is_named(tmp_path, tiny_stage):
    from zoo.train import train

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here; the missing-logger message needs it absent")
    recipe = copy.deepcopy(RECIPE)
    recipe["stages"][0]["trainer"]["loggers"] = ["tensorboard"]
    with pytest.raises(RecipeError, match=r"trainer.loggers names tensorboard, which is not installed.*mmzoo\[loggers\]"):
        train(_write(tmp_path, recipe), runs_dir=tmp_path / "runs")


def test_print_config_prints_a_recipe_that_validates_again(tmp_path, capsys):
    from zoo import cli

    src = _write(tmp_path)
    assert cli.main(["train", str(src), "--print-config", "--set", "stages.a.trainer.max_steps=9",
                     "--import", "tiny_stage"]) == 0  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    trainer = printed["stages"][0]["trainer"]
    assert trainer["max_steps"] == 9 and trainer["reload_dataloaders_every_n_epochs"] == 2
    assert printed["stages"][0]["schedule"]["name"] == "cosine"  # defaults filled in
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert load_recipe(again, check_stage_types=False).stages[0].trainer.max_steps == 9
