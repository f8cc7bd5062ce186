"""Loss curves a person can look at: ``loss.png`` beside each stage's ``metrics.csv``, written at the end of
``zoo train``. Every logged loss column (``loss``, ``*_loss``) is drawn against the optimizer step (one panel),
and the learning rate, when logged, in a second panel below."""

from __future__ import annotations

import csv
import math
from pathlib import Path

__all__ = ["read_metrics", "plot_stage_losses"]


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` -> column -> [(step, value)] over the rows where the column holds a finite number."""
    columns: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            try:
                step = int(row["step"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: line {i}: field 'step' is not an integer ({row.get('step')!r})") from None
            for key, text in row.items():
                if key == "step" or text in (None, ""):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue  # a text column (none are logged today) is not a curve
                if math.isfinite(value):
                    columns.setdefault(key, []).append((step, value))
    return columns


def plot_stage_losses(stage_dir: str | Path) -> Path | None:
    """Write ``<stage_dir>/loss.png`` from ``<stage_dir>/metrics.csv``; None when there is nothing to draw."""
    stage_dir = Path(stage_dir)
    src = stage_dir / "metrics.csv"
    if not src.is_file():
        return None
    columns = read_metrics(src)
    losses = {k: v for k, v in columns.items() if k == "loss" or k.endswith("_loss")}  # not ratios of losses
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zoo.registry import atomic_write

    lr = columns.get("lr")
    fig, axes = plt.subplots(2 if lr else 1, 1, figsize=(7, 5.5 if lr else 3.8), sharex=True, squeeze=False,
                             constrained_layout=True, height_ratios=[3, 1] if lr else None)  # fmt: skip
    ax = axes[0][0]
    for name, points in sorted(losses.items()):
        ax.plot(*zip(*points, strict=True), label=name, linewidth=1.4)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{stage_dir.parent.name} / {stage_dir.name}")
    if lr:
        axes[1][0].plot(*zip(*lr, strict=True), color="gray", linewidth=1.2)
        axes[1][0].set_ylabel("lr")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    out = stage_dir / "loss.png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
