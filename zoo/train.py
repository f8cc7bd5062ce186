"""The staged recipe runner behind ``zoo train`` and ``make train``.

For each stage of a validated recipe (see :mod:`zoo.recipe`), in order:

1. ``runs/<recipe>/<stage>/summary.json`` exists -> the stage is finished: skip it (``--force`` reruns it).
2. Write the resolved config (``config.yaml``: every default filled in, ``init_from`` resolved to a directory).
3. Build the stage module (seeded), load ``init_from`` unless resuming, apply the ``trainable`` / ``frozen`` globs to the
   stage module's model and report the parameter counts.
4. Fit with a Lightning ``Trainer`` built from the stage's ``trainer`` settings (any Lightning strategy: ddp, fsdp,
   deepspeed). ``checkpoints/last.ckpt`` is written atomically every ``ckpt_every_n_steps`` and at the end; when it
   exists the stage resumes from it, and because data order and RNG are functions of (seed, step) the resumed run
   ends with the same weights and metrics as an uninterrupted one. ``metrics.csv`` gets a row every
   ``log_every_n_steps`` (rows past the resumed step are dropped, then redone).
5. On global rank 0: ``module.evaluate(out_dir)``, ``module.export(out_dir / "final")`` (``zoo.load``-able), and
   ``summary.json`` (metrics, steps, wall time, samples/s, parameter counts), which marks the stage finished.

The runs root is ``--runs-dir``, else ``$MMZOO_RUNS``, else ``./runs``.

Safety: recipe and stage names are safe folder names (``zoo.recipe.SAFE_NAME``) and every path the runner writes or
deletes must resolve inside the runs root (symlinks followed), else :class:`RunError`. ``runs/<recipe>/.lock`` (the
owner's pid and host) admits one ``zoo train`` per run folder; a lock whose process is gone is taken over. A resumed
stage whose training config changed is refused (the differing keys are named). A loss that stays nan/inf stops the
stage (``trainer.nonfinite_patience``), and weights holding a nan/inf are never exported to ``final/``.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zoo.recipe import Recipe, RecipeError, StageSpec, check_stage_configs, load_recipe, to_plain
from zoo.registry import atomic_write, writable_folder_error

__all__ = [
    "train",
    "RunError",
    "run_lock",
    "runs_root",
    "stage_dir",
    "resolve_init_source",
    "apply_param_globs",
    "format_results",
]

log = logging.getLogger("zoo.train")

CHECKPOINT_NAME = "last.ckpt"
LOCK_NAME = ".lock"


class RunError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do (``zoo train`` prints it on one line)."""


def _inside(root: Path, path: Path) -> Path:
    """``path`` resolved (symlinks followed); :class:`RunError` unless it lies inside the resolved ``root``."""
    resolved, top = path.resolve(), root.resolve()
    if resolved != top and top not in resolved.parents:
        raise RunError(f"refusing to write or delete {path}: it resolves to {resolved}, outside the runs folder {top}")
    return resolved


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and a scratch file in it, so an unwritable runs folder fails before any training."""
    why = writable_folder_error(folder)
    if why is not None:
        raise RunError(f"the runs folder {folder} is not writable ({why}); pass --runs-dir DIR "
                       "or set $MMZOO_RUNS to a writable folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


@contextmanager
def run_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/.lock`` (``pid host``) while training; refuse when another live process holds it.

    A lock left by a process that no longer exists on this host (kill -9, a crash) is stale and taken over.
    """
    lock = folder / LOCK_NAME
    me = f"{os.getpid()} {socket.gethostname()}"
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid_text, _, host = lock.read_text().strip().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, host = -1, ""  # unreadable or half-written: nobody holds it in a usable way
            if pid > 0 and (host != socket.gethostname() or _pid_alive(pid)):
                raise RunError(
                    f"{folder} is in use by another `zoo train` (pid {pid} on {host or 'this host'}, lock file "
                    f"{lock}); wait for it to finish, or delete the lock file if that process is gone"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    else:
        raise RunError(f"could not take the lock {lock}: another process keeps recreating it")
    try:
        yield lock
    finally:
        try:
            if lock.read_text().strip() == me:
                lock.unlink()
        except OSError:
            pass


def _remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a killed ``atomic_write`` (checkpoint, metrics, summary) left behind."""
    removed = []
    for folder in (out, out / "checkpoints", out / "final"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                if tmp.is_file():
                    tmp.unlink()
                    removed.append(tmp)
    return removed


def runs_root(runs_dir: str | os.PathLike | None = None) -> Path:
    """``runs_dir``, else ``$MMZOO_RUNS``, else ``./runs``."""
    return Path(runs_dir or os.environ.get("MMZOO_RUNS") or "runs")


def stage_dir(root: Path, recipe: Recipe | str, stage: StageSpec | str) -> Path:
    name = recipe.recipe if isinstance(recipe, Recipe) else recipe
    return root / name / (stage.name if isinstance(stage, StageSpec) else stage)


def _global_rank() -> int:
    """Rank of this process as known before (or after) Lightning sets up distributed training."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "GLOBAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    # Lightning's subprocess launcher sets LOCAL_RANK / NODE_RANK on the processes it starts.
    return int(os.environ.get("LOCAL_RANK", 0)) + int(os.environ.get("NODE_RANK", 0))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resolve_init_source(stage: StageSpec, recipe: Recipe, root: Path) -> Path | None:
    """The directory ``stage.init_from`` points at (an earlier stage's ``final/``, a weights dir, or a dir)."""
    if stage.init_source is None:
        return None
    kind, value = stage.init_source
    if kind == "stage":
        path = stage_dir(root, recipe, value) / "final"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"stage {stage.name!r} starts from stage {value!r}, which has no export at {path}; "
                f"run it first (`zoo train {recipe.path} --stage {value}`)"
            )
        return path
    if kind == "weights":
        from zoo.registry import resolve_weights

        return resolve_weights(value)  # the same path and sha256 check as zoo.load(value)
    return Path(value)


@dataclass
class ParamCounts:
    trainable: int
    frozen: int
    trainable_tensors: int
    frozen_tensors: int


def apply_param_globs(model: Any, trainable: list[str], frozen: list[str], where: str = "") -> ParamCounts:
    """Set ``requires_grad``: a parameter trains if its name matches a ``trainable`` glob and no ``frozen`` glob.

    A glob that matches no parameter name is an error (it is almost always a typo), reported with a few names.
    """
    names = [n for n, _ in model.named_parameters()]
    for key, globs in (("trainable", trainable), ("frozen", frozen)):
        for g in globs:
            if not any(fnmatch.fnmatchcase(n, g) for n in names):
                sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise RecipeError([f"{where}.{key}: glob {g!r} matches no parameter of the model (names look like: "
                                   f"{sample})"])
    counts = ParamCounts(0, 0, 0, 0)
    for name, p in model.named_parameters():
        train = any(fnmatch.fnmatchcase(name, g) for g in trainable) and not any(
            fnmatch.fnmatchcase(name, g) for g in frozen
        )
        p.requires_grad_(train)
        if train:
            counts.trainable += p.numel()
            counts.trainable_tensors += 1
        else:
            counts.frozen += p.numel()
            counts.frozen_tensors += 1
    return counts


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# Stage keys that may change between a run and its resume: they do not affect steps, data order or the weights.
RESUME_FREE_KEYS = {"out_dir", "description", "trainer.enable_progress_bar", "num_workers"}


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """``key.path: old -> new`` for each value that differs between the saved config ``a`` and the new one ``b``.

    Keys present on one side only are settings added to (or removed from) mmzoo since ``a`` was written, at their
    defaults: they do not count, so runs started by an older mmzoo still resume.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) & set(b)):
            out += _diff(a[k], b[k], f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


# ---- running ---------------------------------------------------------------------------------------------------


def _world_size_guess(devices: Any, num_nodes: int) -> int | None:
    if isinstance(devices, int) and devices > 0:
        return devices * num_nodes
    if isinstance(devices, list):
        return len(devices) * num_nodes
    return None


def run_stage(
    recipe: Recipe, stage: StageSpec, root: Path, *, force: bool = False, callbacks: list[Any] | None = None
) -> dict[str, Any]:
    """Run one stage (or skip / resume it); return its summary row."""
    out = stage_dir(root, recipe, stage)
    stage.out_dir = out
    summary_file = out / "summary.json"
    ckpt = out / "checkpoints" / CHECKPOINT_NAME
    rank = _global_rank()

    if rank == 0:
        _inside(root, out)
        if force and (out.exists() or out.is_symlink()):
            shutil.rmtree(out)
        for tmp in _remove_stale_temp_files(out):
            _say(rank, f"stage {stage.name}: removed {tmp.name}, left by a write that was killed")
    _barrier()
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        _say(rank, f"stage {stage.name}: finished earlier ({summary_file}); skipping (use --force to rerun)")
        return {**summary, "status": "skipped (done)"}

    import lightning as L

    # Lazy: Lightning is heavy, and zoo.callbacks imports RunError from this module (an import cycle otherwise).
    from zoo.callbacks import (
        AtomicCheckpointIO,
        MetricsCSV,
        NonFiniteGuard,
        StageCheckpoint,
        StageClock,
        StepProgressBar,
        nonfinite_parameters,
    )
    from zoo.stages import get_stage_type

    resuming = ckpt.is_file()
    source = None if resuming else resolve_init_source(stage, recipe, root)
    resolved = {
        "recipe": recipe.recipe,
        "recipe_file": str(recipe.path),
        "git_commit": _git_commit(),
        "init_from_dir": str(source) if source else None,
        "stage": to_plain(stage),
    }
    cfg_file = out / "config.yaml"
    if resuming and cfg_file.is_file():
        # Checked on every rank (they read the same file), so under torchrun no rank waits for one that stopped.
        before = yaml.safe_load(cfg_file.read_text()).get("stage", {})
        changed = [d for d in _diff(before, resolved["stage"]) if d.split(":")[0] not in RESUME_FREE_KEYS]
        if changed:
            # Steps, schedule and data order are functions of the config: continuing would mix two runs.
            raise RunError(
                f"stage {stage.name}: cannot resume {ckpt}: the config changed since it was written "
                f"({'; '.join(changed)}). To continue, restore those values (they are in {cfg_file}); "
                f"to start this stage over, rerun with --force"
            )
    elif rank == 0:
        atomic_write(cfg_file, lambda tmp: Path(tmp).write_text(yaml.safe_dump(resolved, sort_keys=False)))

    L.seed_everything(stage.seed, workers=True, verbose=False)
    module_cls = get_stage_type(stage.type)
    module = module_cls(stage.model, stage.data, stage.eval, stage)
    if source is not None:
        _say(rank, f"stage {stage.name}: initialising from {source}")
        module.init_from(source)
    counts = apply_param_globs(module.model, stage.trainable, stage.frozen, where=f"{recipe.path}: stage {stage.name}")
    _say(
        rank,
        f"stage {stage.name}: {counts.trainable:,} trainable parameters ({counts.trainable_tensors} tensors), "
        f"{counts.frozen:,} frozen ({counts.frozen_tensors} tensors)",
    )

    t = stage.trainer
    clock = StageClock()
    plugins = [] if t.strategy.startswith("deepspeed") else [AtomicCheckpointIO()]
    cbs = [
        # The guard runs before the checkpoint so a diverged step never overwrites the last good checkpoint.
        NonFiniteGuard(stage.name, t.nonfinite_patience, ckpt),
        StageCheckpoint(ckpt, t.ckpt_every_n_steps),
        clock,
        MetricsCSV(out / "metrics.csv", t.log_every_n_steps, clock),
        *(callbacks or []),
    ]
    if t.enable_progress_bar:
        cbs.append(StepProgressBar(stage.name))
    max_steps = t.max_steps
    if max_steps is None:
        world = _world_size_guess(t.devices, t.num_nodes)
        if world is None:
            raise RecipeError([f"{recipe.path}: stage {stage.name}: max_epochs needs an integer or list `devices`"])
        per_step = stage.batch_size * world * t.accumulate_grad_batches
        max_steps = max(1, int(-(-t.max_epochs * len(module.get_train_dataset()) // per_step)))
    _quiet_lightning()
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        enable_checkpointing=False,  # StageCheckpoint owns checkpoints/last.ckpt
        enable_model_summary=False,
        logger=_loggers(t.loggers, recipe, stage, out) or False,
        callbacks=cbs,
        plugins=plugins,
        use_distributed_sampler=False,  # StepBatchSampler shards by rank itself
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(out),
        **t.extra,  # the recipe's other lightning.Trainer arguments, checked against its signature by zoo.recipe
    )
    if resuming:
        _say(rank, f"stage {stage.name}: resuming from {ckpt}")
    with warnings.catch_warnings():
        # The stream is resumable by construction (a function of seed and step), so this warning does not apply.
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        if not _verbose():  # library deprecation notices are for their developers, not for a recipe's user
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
        # weights_only: a resumed checkpoint is read with torch's safe unpickler whatever the environment says.
        trainer.fit(module, ckpt_path=str(ckpt) if resuming else None, weights_only=True)
    if trainer.interrupted or trainer.global_step < max_steps:
        raise RuntimeError(f"stage {stage.name}: training stopped at step {trainer.global_step} of {max_steps}")

    rank = trainer.global_rank
    # Every rank checks (data-parallel ranks hold the same weights), so all of them stop together.
    bad = nonfinite_parameters(module.model)
    if bad:
        raise RunError(
            f"stage {stage.name}: not exporting {out / 'final'}: {len(bad)} tensors hold nan/inf "
            f"(e.g. {', '.join(bad[:3])}); lower optim.lr and rerun the stage with --force"
        )
    if rank == 0:
        import torch

        module.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in module.evaluate(out).items()}
        eval_s = time.perf_counter() - t0
        module.export(out / "final")
        skipped = module.skipped_samples()
        if skipped:
            _say(rank, f"stage {stage.name}: skipped {_skip_text(skipped)} (data.on_error: skip)")
        wall = clock.elapsed()
        samples = max_steps * stage.batch_size * trainer.world_size * t.accumulate_grad_batches
        summary = {
            "recipe": recipe.recipe,
            "stage": stage.name,
            "type": stage.type,
            "steps": trainer.global_step,
            "samples": samples,
            "train_wall_s": round(wall, 3),
            "samples_per_s": round(samples / wall, 3) if wall > 0 else None,
            "eval_wall_s": round(eval_s, 3),
            "world_size": trainer.world_size,
            "final_train_loss": module.last_logs.get("loss"),
            "params": {"trainable": counts.trainable, "frozen": counts.frozen},
            "init_from": str(source) if source else None,
            "metrics": metrics,
            # Samples the data side skipped as unreadable (on_error: skip), from StageModule.skipped_samples().
            "skipped": skipped,
            "final_dir": str(out / "final"),
        }
        atomic_write(summary_file, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    _barrier()
    summary = json.loads(summary_file.read_text())
    return {**summary, "status": "trained"}


def _skip_text(skipped: int | dict[str, int]) -> str:
    """``3 samples`` or ``3 samples (truncated image: 2, bad record: 1)``."""
    if isinstance(skipped, dict):
        total = sum(skipped.values())
        return f"{total} samples ({', '.join(f'{k}: {v}' for k, v in skipped.items())})"
    return f"{skipped} samples"


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def format_results(rows: list[dict[str, Any]]) -> str:
    """A small fixed-width table: stage, status, steps, wall time, samples/s, metrics."""
    header = ["stage", "status", "steps", "train wall", "samples/s", "metrics"]
    body = []
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in (r.get("metrics") or {}).items())
        wall = r.get("train_wall_s")
        body.append(
            [
                str(r.get("stage", "")),
                str(r.get("status", "")),
                str(r.get("steps", "")),
                f"{wall:.1f} s" if isinstance(wall, (int, float)) else "",
                f"{r['samples_per_s']:.1f}" if isinstance(r.get("samples_per_s"), (int, float)) else "",
                metrics,
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), line, *(fmt(b) for b in body)])


def train(
    recipe_path: str | os.PathLike,
    *,
    stage: str | None = None,
    resume: bool = False,
    force: bool = False,
    overrides: list[str] | None = None,
    runs_dir: str | os.PathLike | None = None,
    imports: list[str] | None = None,
    callbacks: list[Any] | None = None,
) -> list[dict[str, Any]]:
    """Validate ``recipe_path`` completely, then run its stages (or just ``stage``); return the summary rows.

    Args:
        recipe_path: the recipe YAML.
        stage: run only this stage (the stages it starts from must be finished).
        resume: require an existing run to resume (error when ``runs/<recipe>/`` does not exist). Without it,
            interrupted stages still resume and finished ones are skipped.
        force: delete the selected stages' outputs and train them from scratch.
        overrides: ``key.path=value`` edits applied before validation.
        runs_dir: output root (default ``$MMZOO_RUNS`` or ``./runs``).
        imports: modules to import first (stage types defined outside ``zoo/stages``).
        callbacks: extra Lightning callbacks (tests use them to interrupt a run).
    """
    for module in imports or []:
        importlib.import_module(module)
    recipe = load_recipe(recipe_path, overrides, check_stage_types=False)
    check_stage_configs(recipe)
    root = runs_root(runs_dir)
    names = [s.name for s in recipe.stages]
    if stage is not None and stage not in names:
        raise RecipeError([f"{recipe.path}: --stage {stage!r}: no such stage (stages: {', '.join(names)})"])
    if resume and not (root / recipe.recipe).is_dir():
        raise FileNotFoundError(f"--resume: nothing to resume, {root / recipe.recipe} does not exist")
    selected = [s for s in recipe.stages if stage is None or s.name == stage]
    run_folder = root / recipe.recipe
    rows = []
    if _global_rank() == 0:
        _check_writable(root)
        _inside(root, run_folder)
        _check_writable(run_folder)
        with run_lock(run_folder):
            for s in selected:
                rows.append(run_stage(recipe, s, root, force=force, callbacks=callbacks))
    else:  # rank 0 holds the lock for the whole run; Lightning's other ranks run the same stages under it
        for s in selected:
            rows.append(run_stage(recipe, s, root, force=force, callbacks=callbacks))
    if _global_rank() == 0:
        from zoo.loss_plot import plot_stage_losses

        for s in selected:
            png = plot_stage_losses(stage_dir(root, recipe, s))
            if png is not None:
                print(f"loss curves: {png}", flush=True)
        print(f"\nresults: {recipe.recipe} ({root / recipe.recipe})\n" + format_results(rows), flush=True)
    return rows


def _verbose() -> bool:
    return os.environ.get("MMZOO_LOGLEVEL", "WARNING").upper() in {"INFO", "DEBUG"}


def _quiet_lightning() -> None:
    """Lightning's hardware lines ("GPU available: ...", "TPU available: ...", the CUDA_VISIBLE_DEVICES line) and
    its tips are INFO records: shown only with MMZOO_LOGLEVEL=INFO or DEBUG. Warnings and errors always show."""
    if _verbose():
        return
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _loggers(names: list[str], recipe: Recipe, stage: StageSpec, out: Path) -> list[Any]:
    """The Lightning loggers a stage's ``trainer.loggers`` names (metrics.csv is written whatever they are)."""
    import importlib.util

    loggers: list[Any] = []
    for name in names:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
        if importlib.util.find_spec(module) is None:
            raise RecipeError([f"{recipe.path}: stage {stage.name}: trainer.loggers names {name}, which is not "
                               f"installed (pip install 'mmzoo[loggers]')"])  # fmt: skip
        if name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
        else:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(project=recipe.recipe, name=stage.name, save_dir=str(out)))
    return loggers
