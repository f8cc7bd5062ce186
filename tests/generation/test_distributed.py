"""Two gloo processes, each holding half of the real and generated images, reduce to the single-process metrics
(slow: spawns Python)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eval.generation.digit_classifier import DigitClassifierExtractor, load_digit_classifier
from eval.generation.digits_data import load_real_digits
from eval.generation.metrics import GenerationMetrics, GenerationMetricsConfig

CFG = {"kid_subsets": 1, "kid_subset_size": 10_000, "is_splits": 1}  # full-set KID/IS: independent of order

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from eval.generation.digit_classifier import DigitClassifierExtractor, load_digit_classifier
    from eval.generation.digits_data import load_real_digits
    from eval.generation.metrics import GenerationMetrics, GenerationMetricsConfig

    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    x, y = load_real_digits(16)
    gm = GenerationMetrics(DigitClassifierExtractor(load_digit_classifier()), GenerationMetricsConfig(**{cfg!r}))
    gm.update_real(x[:900][r::w])
    fake = torch.nn.functional.avg_pool2d(x[900:], 3, 1, 1)
    gm.update_fake(fake[r::w], y[900:][r::w])
    out = gm.compute()
    if r == 0:
        json.dump(out, open(sys.argv[1], "w"))
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path) -> None:
    x, y = load_real_digits(16)
    gm = GenerationMetrics(DigitClassifierExtractor(load_digit_classifier()), GenerationMetricsConfig(**CFG))
    gm.update_real(x[:900])
    gm.update_fake(torch.nn.functional.avg_pool2d(x[900:], 3, 1, 1), y[900:])
    single = gm.compute()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(cfg=CFG))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "r.json")], env=env,
                                      cwd=Path(__file__).parents[2]))  # fmt: skip
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    two = json.loads((tmp_path / "r.json").read_text())
    assert two["n_real"] == 900 and two["n_fake"] == 897
    assert set(two) == set(single)
    # float32 features of different batch compositions differ in the last bits; the cubic KID kernel amplifies it
    assert two == pytest.approx(single, rel=1e-4, abs=1e-9)
    assert two["fid"] == pytest.approx(single["fid"], rel=1e-6)
