"""Recipe validation: every problem names the file, the key path and what was expected."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from zoo.recipe import RecipeError, apply_overrides, load_recipe

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "recipe": "tiny",
    "description": "runner test",
    "stages": [
        {
            "name": "a",
            "type": "runner_tiny_regression",
            "model": {"dim": 8, "hidden": 16},
            "data": {"num_samples": 64},
            "batch_size": 8,
            "trainer": {"max_steps": 4},
        },
        {
            "name": "b",
            "type": "runner_tiny_regression",
            "init_from": "a",
            "batch_size": 8,
            "trainer": {"max_steps": 4},
        },
    ],
}


def write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def problems(path: Path, overrides: list[str] | None = None, check_stage_types: bool = True) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides, check_stage_types=check_stage_types)
    assert all(p.startswith(str(path)) for p in err.value.problems), err.value.problems
    return err.value.problems


def test_valid_recipe_loads_with_defaults(tmp_path, tiny_stage):
    recipe = load_recipe(write(tmp_path, BASE))
    a, b = recipe.stages
    assert recipe.recipe == "tiny"
    assert a.model == tiny_stage.TinyModelConfig(dim=8, hidden=16)
    assert a.trainer.max_steps == 4 and a.trainer.strategy == "auto" and a.optim.name == "adamw"
    assert a.trainable == ["*"] and a.frozen == []
    assert b.init_source == ("stage", "a")


def test_unknown_key_names_path_allowed_keys_and_suggestion(tmp_path, tiny_stage):
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    bad["stages"][1]["trainer"]["max_stepz"] = 5
    (msg,) = problems(write(tmp_path, bad))
    assert "stages[1].trainer.max_stepz" in msg
    assert "Did you mean 'max_steps'?" in msg
    assert "Allowed keys: max_steps, max_epochs, accelerator" in msg


def test_unknown_key_in_task_section_uses_task_dataclass(tmp_path, tiny_stage):
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    bad["stages"][0]["model"]["hiden"] = 3
    (msg,) = problems(write(tmp_path, bad))
    assert "stages[0].model.hiden" in msg and "Did you mean 'hidden'?" in msg and "dim, hidden, dropout" in msg


def test_wrong_types_are_all_reported(tmp_path, tiny_stage):
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    bad["stages"][0]["batch_size"] = "eight"
    bad["stages"][0]["optim"] = {"lr": "fast", "betas": [0.9]}
    bad["stages"][1]["trainer"]["devices"] = 1.5
    msgs = problems(write(tmp_path, bad))
    joined = "\n".join(msgs)
    assert "stages[0].batch_size: expected an integer, got str 'eight'" in joined
    assert "stages[0].optim.lr: expected a number" in joined
    assert "stages[0].optim.betas: expected a list of 2 values" in joined
    assert "stages[1].trainer.devices: expected int or str or a list of int" in joined
    assert len(msgs) == 4


def test_numeric_bounds_and_literals(tmp_path, tiny_stage):
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    bad["stages"][0]["batch_size"] = 0
    bad["stages"][0]["schedule"] = {"name": "cosin"}
    joined = "\n".join(problems(write(tmp_path, bad)))
    assert "stages[0].batch_size: must be >= 1, got 0" in joined
    assert "stages[0].schedule.name: expected one of 'cosine', 'linear', 'constant'" in joined
    assert "did you mean 'cosine'?" in joined


def test_missing_file(tmp_path, tiny_stage):
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    bad["stages"][0]["data"]["notes_file"] = str(tmp_path / "nope.txt")
    (msg,) = problems(write(tmp_path, bad))
    assert "stages[0].data.notes_file: file not found" in msg and "nope.txt" in msg
    (tmp_path / "nope.txt").write_text("here now")
    load_recipe(write(tmp_path, bad))


def test_missing_init_dir_and_recipe_file(tmp_path, tiny_stage):
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    bad["stages"][0]["init_from"] = {"dir": str(tmp_path / "no_such_dir")}
    (msg,) = problems(write(tmp_path, bad), check_stage_types=False)
    assert "stages[0].init_from: directory not found" in msg
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_init_from_later_or_unknown_stage(tmp_path, tiny_stage):
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    bad["stages"][0]["init_from"] = "b"
    (msg,) = problems(write(tmp_path, bad), check_stage_types=False)
    assert "stages[0].init_from: 'b' is a later stage" in msg
    bad["stages"][0]["init_from"] = {"stage": "zz"}
    (msg,) = problems(write(tmp_path, bad), check_stage_types=False)
    assert "stages[0].init_from: no earlier stage named 'zz'" in msg
    # A bare string that is neither a stage, a directory nor a weights name fails in the registry check.
    bad["stages"][0]["init_from"] = "not_a_thing.tag"
    (msg,) = problems(write(tmp_path, bad))
    assert "stages[0].init_from: 'not_a_thing.tag' is not an earlier stage" in msg and "weights name" in msg


def test_unknown_task_and_duplicate_stage(tmp_path, tiny_stage):
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    bad["stages"][0]["type"] = "runner_tiny_regresion"
    bad["stages"][1]["name"] = "a"
    bad["stages"][1].pop("init_from")
    joined = "\n".join(problems(write(tmp_path, bad), check_stage_types=False))
    assert "stages[0].type: unknown stage type 'runner_tiny_regresion'. Did you mean 'runner_tiny_regression'?" in joined
    assert "stages[1].name: duplicate stage name 'a'" in joined


def test_missing_required_and_steps(tmp_path, tiny_stage):
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    del bad["stages"][0]["batch_size"]
    bad["stages"][0]["trainer"] = {}
    joined = "\n".join(problems(write(tmp_path, bad)))
    assert "stages[0].batch_size: missing required key (expected int)" in joined
    assert "stages[0].trainer.max_steps: give max_steps or max_epochs" in joined


def test_overrides_are_typed_and_validated(tmp_path, tiny_stage):
    path = write(tmp_path, BASE)
    recipe = load_recipe(
        path,
        ["stages.a.trainer.max_steps=50", "stages[1].optim.lr=1e-3", "stages.1.frozen=[fc1.*]", "description=x y"],
    )
    assert recipe.stages[0].trainer.max_steps == 50
    assert recipe.stages[1].optim.lr == pytest.approx(1e-3)
    assert recipe.stages[1].frozen == ["fc1.*"]
    assert recipe.description == "x y"
    (msg,) = problems(path, ["stages.a.trainer.max_stepz=3"])
    assert "stages[0].trainer.max_stepz: unknown key" in msg
    with pytest.raises(RecipeError, match="no stage 'zz'"):
        apply_overrides(yaml.safe_load(path.read_text()), ["stages.zz.seed=1"])


def test_misspelt_key_fails_before_heavy_imports(tmp_path):
    """The CLI rejects a misspelt runner key without importing lightning or the model families."""
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    bad["stages"][0]["type"] = "clip_contrastive"
    bad["stages"][0]["trainer"] = {"max_stepz": 5}
    path = write(tmp_path, bad)
    code = textwrap.dedent(
        f"""
        import sys
        from zoo.cli import main
        rc = main(["train", {str(path)!r}])
        heavy = sorted(m for m in ("lightning", "open_clip", "transformers", "timm") if m in sys.modules)
        print("RC", rc, "HEAVY", heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "RC 2 HEAVY []" in out.stdout, out.stdout + out.stderr
    assert f"{path}: stages[0].trainer.max_stepz: unknown key. Did you mean 'max_steps'?" in out.stderr


@pytest.mark.parametrize(
    "recipe_file", sorted(REPO.glob("recipes/**/*.yaml")), ids=lambda p: str(p.relative_to(REPO))
)
def test_every_shipped_recipe_validates(recipe_file, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name files relative to the repository root
    recipe = load_recipe(recipe_file.relative_to(REPO))
    assert recipe.stages


def test_models_components_moe_never_import_lightning_data_or_eval():
    """zoo/models, zoo/components, zoo/moe and zoo/methods are plain nn.Modules: check their imports statically
    (every import, lazy ones too). The building blocks (components, moe) are lower still: they never reach the
    registry or a model family; a family builds what a component needs (a registered vision tower) and passes it in."""
    offenders = []
    for pkg in ("models", "components", "moe", "methods"):
        building_block = pkg in ("components", "moe")
        for path in sorted((REPO / "zoo" / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    forbidden = name.split(".")[0] in ("lightning", "pytorch_lightning", "data", "eval") or name.startswith(
                        ("zoo.stages", "zoo.train", "zoo.callbacks", "zoo.recipe", "zoo.cli")
                    )
                    if building_block and name.startswith(("zoo.registry", "zoo.models", "zoo.convert")):
                        forbidden = True
                    if forbidden:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not offenders, offenders


def test_model_packages_import_without_lightning():
    """...and dynamically: importing them (and building the registry) leaves lightning out of sys.modules."""
    code = (
        "import sys, importlib, pkgutil, zoo.models, zoo.registry\n"
        "for pkg in ('zoo.components', 'zoo.moe'):\n"
        "    try:\n"
        "        importlib.import_module(pkg)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "zoo.registry.list_models()\n"
        "print('LOADED', sorted(m for m in ('lightning', 'pytorch_lightning', 'data', 'eval') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


TINY_LLAVA = """\
recipe: nested_typo
stages:
  - name: sft
    type: moe_llava
    model: &model
      vision: {kind: zoo, model_name: clip_vit_tiny}
      vocab_world: &world {image_size: 32}
    data: &data {source: shapes, kind: vqa, world: *world, num_scenes: 4}
    batch_size: 2
    trainer: {max_steps: 1}
  - name: moe
    type: moe_llava
    init_from: sft
    model:
      <<: *model
      moe: {num_experts: 4, top_k: 2, layers: sparse, capacity_factr: 1.5}
    data: *data
    batch_size: 2
    trainer: {max_steps: 1}
"""


def test_typo_deep_in_the_last_stage_fails_before_stage_0(tmp_path):
    """model.moe / data.world / model.vision are typed by MoESettings / WorldConfig / VisionTowerConfig, so
    `zoo train` rejects a misspelt key inside the last stage with file, key path and suggestion, and runs nothing."""
    from zoo.cli import main

    path = tmp_path / "nested.yaml"
    path.write_text(TINY_LLAVA)
    runs = tmp_path / "runs"
    overrides = ["--set", "stages.moe.data.world.max_objets=2", "--set", "stages.moe.model.vision.selct_layer=-1"]
    rc = main(["train", str(path), "--runs-dir", str(runs), *overrides])
    assert rc == 2 and not runs.exists()
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides[1::2])
    assert err.value.problems == [
        f"{path}: stages[1].model.vision.selct_layer: unknown key. Did you mean 'select_layer'? Allowed keys: kind, "
        "model_name, config, select_layer, select_feature, drop_first_token, mean, std",
        f"{path}: stages[1].model.moe.capacity_factr: unknown key. Did you mean 'capacity_factor'? Allowed keys: "
        "num_experts, top_k, layers, capacity_factor, eval_capacity_factor, min_capacity, aux_loss_coef, "
        "second_choice_noise",
        f"{path}: stages[1].data.world.max_objets: unknown key. Did you mean 'max_objects'? Allowed keys: "
        "image_size, seed, min_objects, max_objects, background, clutter, colors, shapes, sizes, skew",
    ]
    # The --set edits reached only the stage they name, although both stages share the YAML anchors.
    fixed = TINY_LLAVA.replace("capacity_factr", "capacity_factor")
    path.write_text(fixed)
    recipe = load_recipe(path, ["stages.moe.data.world.max_objects=2", "stages.moe.model.moe.layers=[0, 2]"])
    sft, moe = recipe.stages
    assert (sft.data.world.max_objects, moe.data.world.max_objects) == (3, 2)
    assert moe.model.moe.layers == (0, 2) and moe.model.moe.capacity_factor == 1.5
    assert sft.model.vision.model_name == "clip_vit_tiny" and sft.model.vocab_world.image_size == 32
    # The dataclasses' own checks (__post_init__) are reported as problems of the block.
    (msg,) = problems(path, ["stages.sft.data.world.background=nois"])
    assert msg.startswith(f"{path}: stages[0].data.world: WorldConfig.background must be one of")
    (msg,) = problems(path, ["stages.moe.model.moe.layers=[0, x]"])
    assert msg == f"{path}: stages[1].model.moe.layers[1]: expected an integer, got str 'x'"


@pytest.mark.parametrize(
    "recipe_file", sorted(REPO.glob("recipes/**/*.yaml")), ids=lambda p: str(p.relative_to(REPO))
)
def test_recipe_comments_are_one_line_each(recipe_file):
    """A recipe comment says why in one line; measurements and history live in the recipe folder's README.md."""
    lines = recipe_file.read_text(encoding="utf-8").splitlines()
    runs = [i + 1 for i in range(1, len(lines)) if lines[i].lstrip().startswith("#")
            and lines[i - 1].lstrip().startswith("#")]
    assert not runs, f"{recipe_file.relative_to(REPO)}: comment blocks longer than one line at lines {runs}"
    assert (recipe_file.parent / "README.md").is_file()
