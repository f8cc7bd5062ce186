"""Issue 19: a misspelt `zoo eval --tasks` name fails before torch is imported (it took 8-11 s), and the light
name check knows every task and group the full registry knows, so it never refuses a real one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_unknown_task_name_fails_before_torch_is_imported():
    probe = (
        "import sys; from eval.cli import main; "
        "rc = main(['--model', 'no.such_model', '--tasks', 'shapes_vqa,shapes_vqq']); "
        "print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert out.stdout.splitlines()[-1] == "1 False", out.stdout + out.stderr
    assert "unknown eval task or group 'shapes_vqq'" in out.stdout and "shapes_vqa" in out.stdout


def test_light_name_check_knows_every_registered_task_and_group(monkeypatch):
    import eval.registry as registry

    full = set(registry.list_tasks()) | {registry.get_task(n).group for n in registry.list_tasks()}
    monkeypatch.setattr(registry, "_TASKS", {})  # as in a fresh `zoo eval`: only the files are read
    declared = registry.declared_task_names()
    assert full - {None} <= declared and "digits_gen" in declared
