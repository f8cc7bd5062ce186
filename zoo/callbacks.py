"""The Lightning callbacks and checkpoint I/O of the staged runner (``zoo.train``).

* :class:`AtomicCheckpointIO`: checkpoints go to a temp file in the same folder, then a rename.
* :class:`StageCheckpoint`: ``checkpoints/last.ckpt`` every ``ckpt_every_n_steps`` and at the last step.
* :class:`StageClock`: training wall time summed over resumed sessions (kept in the checkpoint).
* :class:`MetricsCSV`: ``metrics.csv`` rows every ``log_every_n_steps`` (rows past a resumed step are redone).
* :class:`StepProgressBar`: a TQDM bar whose total is the stage's micro-batches.
* :class:`NonFiniteGuard`: stops a stage whose loss is nan/inf for ``patience`` micro-batches in a row.

This module imports Lightning; ``zoo.train`` imports it only when a stage runs, so recipe validation stays light.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from zoo.registry import atomic_write
from zoo.train import RunError

__all__ = [
    "AtomicCheckpointIO",
    "StageCheckpoint",
    "StageClock",
    "MetricsCSV",
    "StepProgressBar",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "nonfinite_parameters",
]


class NonFiniteLossError(RunError):
    """A stage's loss stayed nan/inf: it diverged, and its weights must not be exported or trained from."""


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the parameters of ``module`` holding a nan or inf (empty when all are finite).

    Buffers are not checked: some hold -inf on purpose (additive attention masks).
    """
    return [n for n, p in module.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temp file in the same directory, then rename: a kill never leaves half a file.

    (Lightning's own save goes through an fsspec transaction whose temp file lives in the system temp dir, so
    its final move can be a non-atomic copy across file systems.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class StageCheckpoint(Callback):
    """Save ``last.ckpt`` every ``every`` optimizer steps and at the last step (all ranks call; rank 0 writes).

    A checkpoint is not written while the weights hold a nan/inf: the last good one stays for a resume with a
    smaller learning rate.
    """

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if step % self.every == 0 or step >= trainer.max_steps:
            bad = nonfinite_parameters(pl_module)
            if bad:
                rank_zero_warn(f"step {step}: not checkpointing, {len(bad)} tensors hold nan/inf (e.g. {bad[0]}); "
                               f"{self.path} keeps the last good weights")
                return
            trainer.save_checkpoint(self.path, weights_only=False)


class NonFiniteGuard(Callback):
    """Raise :class:`NonFiniteLossError` once the loss is nan/inf for ``patience`` micro-batches in a row.

    A single bad micro-batch can be survivable (mixed precision skips such steps), a run of them is divergence;
    without this the stage would train on to the end and export nan weights that the next stage starts from.
    """

    def __init__(self, stage_name: str, patience: int, checkpoint: Path):
        self.stage_name, self.patience, self.checkpoint = stage_name, patience, checkpoint
        self.bad_in_a_row = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or bool(torch.isfinite(torch.as_tensor(loss).detach()).all()):
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        if self.bad_in_a_row >= self.patience:
            kept = (
                f"the last good checkpoint is {self.checkpoint}" if self.checkpoint.is_file() else "no checkpoint was kept"
            )
            raise NonFiniteLossError(
                f"stage {self.stage_name}: loss is {float(torch.as_tensor(loss).detach().float().mean())} at step "
                f"{trainer.global_step} ({self.bad_in_a_row} micro-batches in a row, trainer.nonfinite_patience = "
                f"{self.patience}); the run diverged, stopping without exporting weights. {kept}; lower optim.lr or "
                "set trainer.gradient_clip_val, then rerun the stage with --force"
            )


class StageClock(Callback):
    """Training wall time summed over resumed sessions (kept in the checkpoint)."""

    def __init__(self) -> None:
        self.before, self.started, self.start_step = 0.0, 0.0, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.start_step = time.perf_counter(), trainer.global_step

    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self.started if self.started else 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"train_wall_s": self.elapsed()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.before = float(state.get("train_wall_s", 0.0))


class MetricsCSV(Callback):
    """``metrics.csv``: one row per ``every`` optimizer steps with the task's logged values (rank 0)."""

    def __init__(self, path: Path, every: int, clock: StageClock):
        self.path, self.every, self.clock = path, every, clock
        self.last_step = -1

    def _rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _write(self, rows: list[dict[str, Any]]) -> None:
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)

        atomic_write(self.path, write)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        # Rows logged after the checkpoint we resumed from are about to be redone: drop them.
        rows = [r for r in self._rows() if int(r["step"]) <= trainer.global_step]
        self._write(rows) if rows or self.path.exists() else None
        self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.global_rank != 0 or step == self.last_step:
            return
        if step % self.every and step < trainer.max_steps:
            return
        self.last_step = step
        row = {"step": step, "train_wall_s": round(self.clock.elapsed(), 3), **pl_module.last_logs}
        rows = self._rows()
        if rows and set(row) <= set(rows[0]):
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=list(rows[0])).writerow(row)
        else:
            self._write([*rows, row])


class StepProgressBar(TQDMProgressBar):
    """TQDM bar whose total is the stage's micro-batches (the stream itself is infinite)."""

    def __init__(self, stage_name: str):
        super().__init__()
        self.stage_name = stage_name

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        return trainer.max_steps * trainer.accumulate_grad_batches

    def init_train_tqdm(self) -> Any:
        # Also reached when resuming mid-stream, where on_train_epoch_start is not called.
        bar = super().init_train_tqdm()
        bar.set_description(f"stage {self.stage_name}")
        bar.total = self.total_train_batches
        return bar

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"stage {self.stage_name}")
