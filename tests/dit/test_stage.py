"""The dit_diffusion task and the DiT recipes: validation, one training step, EMA, evaluation and export, latent
shards for the full-scale recipe (instantiated with tiny overrides)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from zoo.models.dit import count_params
from zoo.recipe import load_recipe
from zoo.stages import get_stage_type

ROOT = Path(__file__).resolve().parents[2]
TINY = ["stages.0.trainer.max_steps=2", "stages.0.eval.samples_per_class=1", "stages.0.eval.num_steps=2",
        "stages.0.eval.metrics=false", "stages.0.eval.val_batches=1"]


def build(recipe: str, overrides: list[str]):
    r = load_recipe(ROOT / recipe, overrides)
    stage = r.stages[0]
    return get_stage_type(stage.type)(stage.model, stage.data, stage.eval, stage), stage


def test_digits_recipes_have_equal_activated_parameters() -> None:
    dense, _ = build("recipes/dit/digits_tiny.yaml", TINY)
    moe, _ = build("recipes/dit_moe/digits_tiny.yaml", TINY)
    d_total, d_active = count_params(dense.model)
    m_total, m_active = count_params(moe.model)
    assert abs(m_active - d_active) / d_active < 0.005
    assert m_total > 2 * d_total * 0.9  # 8 experts: much more capacity at the same activated size
    assert moe.model.cfg.num_experts == 8 and dense.model.cfg.num_experts == 0
    # Everything else identical: same data, schedule, eval.
    assert dense.data_cfg == moe.data_cfg and dense.eval_cfg == moe.eval_cfg


@pytest.mark.parametrize("recipe", ["recipes/dit/digits_tiny.yaml", "recipes/dit_moe/digits_tiny.yaml"])
def test_loss_ema_evaluate_export(recipe: str, tmp_path: Path) -> None:
    task, stage = build(recipe, TINY)
    batch = task.collate_fn([task.get_train_dataset()[i] for i in range(8)])
    loss, logs = task.compute_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and "mse" in logs
    if task.model.cfg.num_experts:
        assert logs["aux"] > 0
    loss.backward()
    assert task.model.final_layer.linear.weight.grad is not None
    # EMA: after a (fake) optimizer step, the EMA moves toward the weights by (1 - decay).
    with torch.no_grad():
        task.model.final_layer.linear.bias.add_(1.0)
    task.model_cfg.ema_warmup = False
    task.on_before_zero_grad(None)
    torch.testing.assert_close(task.ema_model.final_layer.linear.bias,
                               torch.full_like(task.ema_model.final_layer.linear.bias, 1 - task.model_cfg.ema_decay))
    task.eval()
    metrics = task.evaluate(tmp_path)
    assert np.isfinite(metrics["val_loss"])
    out = task.export(tmp_path / "final")
    loaded = zoo.load(out)
    assert torch.equal(loaded.final_layer.linear.bias, task.ema_model.final_layer.linear.bias)


def test_data_and_model_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="data.image_size"):
        build("recipes/dit/digits_tiny.yaml", [*TINY, "stages.0.data.image_size=32"])


def write_latent_shard(path: Path, n: int, skip_one: bool = False) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            np.save(buf, np.full((4, 4, 4), i, np.float16))
            for name, data in ((f"{i:06d}.latent.npy", buf.getvalue()), (f"{i:06d}.cls", str(i % 3).encode())):
                if skip_one and i == 0 and name.endswith(".cls"):
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_full_scale_recipe_instantiates_with_tiny_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_latent_shard(tmp_path / "train-000000.tar", 5, skip_one=True)
    monkeypatch.setenv("IMAGENET_LATENTS", str(tmp_path))
    r = load_recipe(ROOT / "recipes/dit_moe/s2_8e2a_in256.yaml")
    stage = r.stages[0]
    assert (stage.optim.lr, stage.optim.weight_decay, stage.batch_size * stage.trainer.devices) == (1e-4, 0.0, 1024)
    assert stage.model.arch == "dit_moe_s_2_8e2a" and stage.model.ema_decay == 0.9999
    with torch.device("meta"):
        full = zoo.create_model(stage.model.arch, **stage.model.model_args())
    assert abs(count_params(full)[0] - 199.3e6) / 199.3e6 < 0.002
    tiny = ["stages.0.model.depth=1", "stages.0.model.hidden_size=32", "stages.0.model.num_heads=2",
            "stages.0.model.input_size=4", "stages.0.model.num_classes=3", "stages.0.eval.samples_per_class=1",
            "stages.0.eval.num_steps=2", "stages.0.trainer.accelerator=cpu", "stages.0.trainer.devices=1"]
    task, stage = build("recipes/dit_moe/s2_8e2a_in256.yaml", tiny)
    ds = task.get_train_dataset()
    assert len(ds) == 4 and ds.skipped == 1  # the record without a class is skipped and counted
    x, y = ds[0]
    assert x.shape == (4, 4, 4) and x.dtype == torch.float32 and float(x[0, 0, 0]) == 1.0 and int(y) == 1
    loss, logs = task.compute_loss(task.collate_fn([ds[i] for i in range(4)]))
    assert torch.isfinite(loss) and "vb" in logs and "aux" in logs
    task.eval()
    task.evaluate(tmp_path)
    saved = torch.load(tmp_path / "samples_latents.pt")
    assert saved["latents"].shape == (3, 4, 4, 4)


def test_model_config_is_derived_from_dit_config():
    """Every DiTConfig field is an optional recipe key with DiTConfig's type, plus arch and the training settings."""
    import dataclasses

    from zoo.models.dit import DiTConfig
    from zoo.recipe import RecipeError, parse_config
    from zoo.stages.dit import DiTModelConfig

    arch_fields = [f.name for f in dataclasses.fields(DiTConfig)]
    names = [f.name for f in dataclasses.fields(DiTModelConfig)]
    assert names == [*arch_fields, "arch", "ema_decay", "ema_warmup", "cpu_threads"]
    cfg = parse_config(DiTModelConfig, {"arch": "dit_tiny", "depth": 2, "mlp_ratio": 2, "objective": "rectified_flow"})
    assert cfg.model_args() == {"depth": 2, "mlp_ratio": 2.0, "objective": "rectified_flow"}
    with pytest.raises(RecipeError) as err:
        parse_config(DiTModelConfig, {"objective": "rectified_flo", "qk_norm": 1}, file="r.yaml", path="model")
    assert err.value.problems == [
        "r.yaml: model.objective: expected one of 'ddpm', 'rectified_flow', got str 'rectified_flo'; did you mean "
        "'rectified_flow'?",
        "r.yaml: model.qk_norm: expected bool or null, got int 1",
    ]
