"""The wheel a user gets from `pip install mmzoo`: built from the source, installed into a fresh virtual environment
with the checkout off the path, it ships every weight, task file and recipe, and its documented first commands run.

Nothing downloads: the wheel is built without build isolation (setuptools from this environment), and the fresh
environment sees this environment's third-party packages through a plain path entry (not a site dir, so the
editable install's finder does not come along) while mmzoo itself is imported from the installed wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "zoo", "data", "eval", "recipes"]


def _shipped_files() -> list[str]:
    """Source files a wheel must carry, as wheel paths: weights, task files, CLIP configs and the recipes."""
    files = [p for pattern in ("zoo/weights/*/*", "zoo/models/clip_configs/*.json", "eval/tasks/*/*.yaml")
             for p in ROOT.glob(pattern)]  # fmt: skip
    names = [p.relative_to(ROOT).as_posix() for p in files]
    names += [f"zoo/_recipes/{p.relative_to(ROOT / 'recipes').as_posix()}" for p in ROOT.glob("recipes/*/*.yaml")]
    return names


def _run(cmd: list[str], **kwargs) -> str:
    """Run ``cmd``; on failure the assertion shows its output (pip's reasons are in stderr)."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the built wheel, the fresh environment's bin folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:  # a copy, so building writes nothing into the checkout
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name, **(
            {"ignore": junk} if (ROOT / name).is_dir() else {}))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"), str(src)],
         env=env, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("mmzoo-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    vpython = venv / "bin" / "python"
    purelib = _run([str(vpython), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    Path(purelib, "_outer_site_packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run([*pip, "--python", str(vpython), "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
         env=env, cwd=tmp)
    return wheel, venv / "bin"


def test_wheel_carries_weights_tasks_and_recipes(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _shipped_files()
    assert any(n.startswith("zoo/weights/moe_llava_tiny.shapes/") for n in expected)
    assert "zoo/_recipes/moe_llava/shapes_tiny.yaml" in expected
    missing = [n for n in expected if n not in names]
    assert not missing, f"the wheel leaves out {missing}"
    # The three import packages and nothing else at the top level (no tests, no build folders).
    assert {n.split("/")[0] for n in names if not n.startswith("mmzoo-")} == {"zoo", "data", "eval"}


def test_installed_commands_run_without_the_checkout(installed, tmp_path):
    _, bindir = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    where = subprocess.run([str(bindir / "python"), "-c", "import zoo, eval, data; print(zoo.__file__, eval.__file__)"],
                           cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert str(ROOT) not in where and str(bindir.parent) in where, where
    check = subprocess.run([str(bindir / "zoo"), "train", "moe_llava/shapes_tiny", "--check"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "zoo/_recipes/moe_llava/shapes_tiny.yaml: valid" in check.stdout
    out = tmp_path / "out"
    run = subprocess.run([str(bindir / "zoo"), "eval", "--model", "moe_llava_tiny.shapes", "--limit", "4",
                          "--output-dir", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) >= {"shapes_vqa", "shapes_pope_random"}
    assert all(n["effective"] == 4 for n in results["n-samples"].values())
