"""End-to-end: both digits recipes train from scratch through the runner (about 6 minutes each on one CPU thread)
and reach the acceptance numbers; the MoE run reproduces the shipped weights bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "shipped"),
    [("recipes/dit/digits_tiny.yaml", None), ("recipes/dit_moe/digits_tiny.yaml", "zoo/weights/dit_moe_tiny.digits")],
)
def test_digits_recipe_trains_and_scores(recipe: str, shipped: str | None, tmp_path: Path) -> None:
    from zoo.train import train

    (row,) = train(ROOT / recipe, runs_dir=tmp_path, overrides=[])
    m = row["metrics"]
    assert m["class_acc"] >= 90.0 and m["fid_digits"] < 1.0
    final = Path(row["final_dir"])
    assert (final.parent / "samples_grid.png").is_file()
    if shipped is not None:
        assert (final / "model.safetensors").read_bytes() == (ROOT / shipped / "model.safetensors").read_bytes()
