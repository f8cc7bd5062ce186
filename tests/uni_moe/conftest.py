"""Uni-MoE tests: make the shared small configurations importable (pytest runs with --import-mode=importlib), and
run single-threaded (small tensors; on a shared CPU torch's thread pool spends more time waiting than computing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
