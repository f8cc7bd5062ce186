"""`zoo sample` and the DiT bench's model pairs (no timing assertions)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import zoo
from eval.bench.dit import equal_active_pair
from zoo.models.dit import count_params
from zoo.sample import main as sample_main
from zoo.sample import parse_classes


def test_bench_pairs_have_equal_activated_parameters() -> None:
    for kw in (dict(d=64, depth=1, heads=4, input_size=16, patch=4, in_channels=1),
               dict(d=384, depth=1, heads=6, input_size=8, patch=2, in_channels=4)):
        dense, moe = equal_active_pair(**kw)
        a, b = count_params(dense)[1], count_params(moe)[1]
        assert abs(a - b) / a < 0.003 and count_params(moe)[0] > 1.5 * count_params(dense)[0]


def test_parse_classes() -> None:
    assert parse_classes("0-3,7", 10) == [0, 1, 2, 3, 7]
    with pytest.raises(ValueError, match=r"unknown class id\(s\) \[10, 11\]"):
        parse_classes("9-11", 10)
    with pytest.raises(ValueError, match="not a class id"):
        parse_classes("a", 10)


def test_zoo_sample_writes_a_grid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = zoo.create_model("dit_tiny", hidden_size=32, depth=1, num_heads=2, patch_size=4, objective="rectified_flow")
    args = {"hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": 4, "objective": "rectified_flow"}
    zoo.save_pretrained(model, tmp_path / "m", "dit_tiny", args)
    out = tmp_path / "grid.png"
    assert sample_main(["--model", str(tmp_path / "m"), "--classes", "0-2", "--per-class", "2", "--steps", "2",
                        "--out", str(out), "--device", "cpu"]) == 0
    img = Image.open(out)
    assert img.size[0] > 2 * 16 and img.size[1] > 3 * 16
    assert sample_main(["--model", str(tmp_path / "m"), "--classes", "12", "--out", str(out), "--device", "cpu"]) == 2
    assert "unknown class id(s) [12]" in capsys.readouterr().err
