"""Issue 19: a misspelt `zoo eval --tasks` name fails before torch is imported (it took 8-11 s). That the fast name
index knows every registered task and group is tests/eval/test_cli_habits.py's job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_unknown_task_name_fails_before_torch_is_imported():
    probe = (
        "import sys; from eval.cli import main; "
        "rc = main(['--model', 'moe_llava_tiny.shapes', '--tasks', 'shapes_vqa,shapes_vqq']); "
        "print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert out.stdout.splitlines()[-1] == "2 False", out.stdout + out.stderr
    assert "unknown task 'shapes_vqq'. Did you mean shapes_vqa" in out.stderr
