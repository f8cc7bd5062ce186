"""``data/`` holds the data code the training tasks use (moved out of ``zoo/stages``) and stays free of Lightning and
of the training layer, so ``eval`` and scripts can read the same data without paying for either."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_data_modules_import_without_lightning_or_the_training_layer():
    code = (
        "import sys\n"
        "import data.latents, data.llava, data.seeding, data.shapes_clip, data.shapes_llava\n"
        "bad = ('lightning', 'zoo.stages', 'zoo.train', 'zoo.callbacks', 'zoo.models', 'eval')\n"
        "print('LOADED', sorted(m for m in bad if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


def test_mix_seed_gives_distinct_reproducible_seeds():
    from data.seeding import mix_seed

    # Distinct tuples give distinct 63-bit seeds; the same tuple the same one.
    seeds = {mix_seed(s, i) for s in range(4) for i in range(64)}
    assert len(seeds) == 256 and all(0 <= x < 2**63 for x in seeds)
    assert mix_seed(3, 5) == mix_seed(3, 5) != mix_seed(5, 3)
