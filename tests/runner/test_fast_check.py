"""Recipe validation (``load_recipe`` + ``check_stage_configs``, i.e. ``zoo train --check`` and the check before any
training) imports neither torch, transformers nor Lightning, for every stage type, and still finds every mistake.

The stage types' config dataclasses live in ``zoo/stages/configs`` (and the nested ones in ``zoo.moe.settings``,
``zoo.components.vision_config``, ``zoo.models.dit_config``); ``zoo.stages.stage_configs`` finds them by reading the
stage module with ``ast``. The first test checks ``sys.modules`` in a fresh interpreter (not a timing); the others
check that what the ``ast`` reading finds is what the stage classes use.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from zoo.stages import _config_sources, list_stage_types, stage_configs

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "lightning")

# In a fresh interpreter: validate each shipped recipe, then copies with one mistake each, the CLI's --check on the
# nested typo too, and report the problems and which heavy packages got imported.
PROBE = r"""
import contextlib, io, json, sys
from pathlib import Path
from zoo.cli import main
from zoo.recipe import RecipeError, load_recipe

cases, out = json.loads(sys.argv[1]), {"errors": {}, "types": []}
for path in cases["valid"]:
    out["types"] += [s.type for s in load_recipe(path).stages]
for path in cases["broken"]:
    try:
        load_recipe(path)
        out["errors"][path] = None
    except RecipeError as e:
        out["errors"][path] = str(e)
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    out["cli_rc"] = main(["train", cases["cli"], "--check"])
out["cli_err"] = err.getvalue()
out["heavy"] = sorted(m for m in ("torch", "transformers", "lightning") if m in sys.modules)
print("RESULT" + json.dumps(out))
"""


def _with_first_model_key(recipe: Path, out: Path, key: str, value: object) -> Path:
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    first = raw["stages"][0]
    first["model"] = {**(first.get("model") or {}), key: value}  # a new mapping: anchors shared it with later stages
    out.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return out


def _broken_copies(tmp_path: Path, recipes: list[Path]) -> dict[str, str]:
    """Recipe copies with one mistake each -> the key path the error must name."""
    broken: dict[str, str] = {}
    # An unknown key in the first stage's model section of every shipped recipe (every stage type in recipes/).
    for i, recipe in enumerate(recipes):
        path = _with_first_model_key(recipe, tmp_path / f"unknown_model_key_{i}.yaml", "not_a_key", 1)
        broken[str(path)] = "stages[0].model.not_a_key: unknown key"
    tiny = (REPO / "recipes/moe_llava/shapes_tiny.yaml").read_text(encoding="utf-8")
    # The case: a typo deep in the nested MoESettings of the last stage.
    assert tiny.count("num_experts: 4") == 1
    (tmp_path / "moe_typo.yaml").write_text(tiny.replace("num_experts: 4", "num_expertz: 4"), encoding="utf-8")
    broken[str(tmp_path / "moe_typo.yaml")] = "stages[2].model.moe.num_expertz: unknown key. Did you mean 'num_experts'?"
    # VisionTowerConfig's own __post_init__ check, now in zoo.components.vision_config.
    assert tiny.count("kind: zoo,") == 1
    (tmp_path / "vision_kind.yaml").write_text(tiny.replace("kind: zoo,", "kind: zooo,"), encoding="utf-8")
    broken[str(tmp_path / "vision_kind.yaml")] = "vision tower kind 'zooo' unknown"
    # A DiTConfig-derived override field with the wrong type (the derived dataclass in zoo.stages.configs.dit).
    path = _with_first_model_key(REPO / "recipes/dit/digits_tiny.yaml", tmp_path / "dit_depth.yaml", "depth", "deep")
    broken[str(path)] = "stages[0].model.depth"
    return broken


def test_validating_every_recipe_and_its_mistakes_imports_no_torch_transformers_or_lightning(tmp_path):
    recipes = sorted(REPO.glob("recipes/**/*.yaml"))
    broken = _broken_copies(tmp_path, recipes)
    cases = {"valid": [str(p.relative_to(REPO)) for p in recipes], "broken": list(broken),
             "cli": str(tmp_path / "moe_typo.yaml")}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    out = json.loads(lines[0][len("RESULT"):])
    # Every stage type of zoo/stages is exercised by a shipped recipe, so each one's configs were imported light.
    assert set(out["types"]) == set(list_stage_types()) - {"runner_tiny_regression"}
    for path, expected in broken.items():
        assert out["errors"][path] is not None, f"{path} validated although it is broken"
        assert expected in out["errors"][path], out["errors"][path]
    assert out["cli_rc"] == 2 and "stages[2].model.moe.num_expertz: unknown key" in out["cli_err"], out
    assert out["heavy"] == [], f"recipe validation imported {out['heavy']}"


def test_configs_found_by_reading_the_sources_are_the_stage_classes_own(tiny_stage):
    from zoo.stages import get_stage_type

    for name in list_stage_types():
        light = stage_configs(name)
        cls = get_stage_type(name)
        assert (light.model, light.data, light.eval) == (cls.ModelConfig, cls.DataConfig, cls.EvalConfig), name
    # The test stage (outside zoo/stages, registered by importing it) is answered from its class.
    assert stage_configs("runner_tiny_regression").model is tiny_stage.TinyModelConfig


def _sources(code: str, module: str = "zoo.stages.example") -> dict[str, tuple[str, str]] | None:
    tree = ast.parse(code)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    return _config_sources(tree, cls, module)


def test_config_sources_follow_imports_and_fall_back_when_defined_in_the_stage_module():
    imported = (
        "from zoo.stages.configs.a import M as Model, D\n"
        "from .configs.b import E\n"
        "class S:\n    ModelConfig = Model\n    DataConfig = D\n    EvalConfig: type = E\n"
    )
    assert _sources(imported) == {
        "ModelConfig": ("zoo.stages.configs.a", "M"),
        "DataConfig": ("zoo.stages.configs.a", "D"),
        "EvalConfig": ("zoo.stages.configs.b", "E"),
    }
    # A config class defined in the stage module, or one not named at all: import the stage module instead.
    local = "from x import D, E\nclass M: pass\nclass S:\n    ModelConfig = M\n    DataConfig = D\n    EvalConfig = E\n"
    assert _sources(local) is None
    assert _sources("from x import D\nclass S:\n    DataConfig = D\n") is None
    # A relative import above the top package is left for the stage module's own import to report.
    above = "from ....far import M, D, E\nclass S:\n    ModelConfig = M\n    DataConfig = D\n    EvalConfig = E\n"
    assert _sources(above) is None


def test_vision_tower_kinds_match_the_builders():
    from zoo.components.vision import _BUILDERS
    from zoo.components.vision_config import VISION_TOWER_KINDS

    assert sorted(VISION_TOWER_KINDS) == sorted(_BUILDERS)
