"""Where a recipe's training time goes: per-step phases of every stage, measured inside a short real run.

    python recipes/moe_llava/profile_stages.py --runs-dir /tmp/profile --steps align=60,sft=300,moe=60

Runs the recipe (default: the default job, ``recipes/moe_llava/shapes_tiny.yaml``) with fewer steps per stage and a
Lightning callback that timestamps every step's phases:

- **data**: from the end of the previous step to the start of this one (DataLoader fetch and collation; the
  progress bar's update is in here too, it is throttled and costs microseconds);
- **forward**: ``training_step`` up to the backward, split into the vision tower's forward (forward hooks on the
  model's image tower) and the rest (the LM, or CLIP's text tower, projector and losses);
- **backward**; **optimizer**: gradient clipping and the AdamW update (from the end of the backward to torch's
  optimizer step post-hook: Lightning runs forward and backward as a closure inside ``optimizer.step``);
- **bookkeeping**: the rest of the step: ``zero_grad``, the LR scheduler, the step-end callbacks
  (non-finite guard, metrics CSV every ``log_every_n_steps``, checkpoint). Steps that wrote a checkpoint are
  reported apart (``checkpoint``: their extra time over a median step).

It also reports the process's user and system CPU time over the training loop and torch's thread count. The first
``--warmup`` steps of every stage are left out (allocator and caches warming up). Results: a table on stdout and
``profile.json`` under ``--runs-dir``. Time it on an otherwise idle machine: two jobs on 2 cores make every figure
wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

PHASES = ("data", "tower_forward", "other_forward", "backward", "optimizer", "bookkeeping")


class StepPhaseTimer(Callback):
    """Per-step phase timestamps of one stage (see the module docstring)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.stages: dict[str, dict[str, Any]] = {}
        self._cur: dict[str, Any] | None = None

    # -- stage bounds ----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        name = pl_module.stage.name
        every = pl_module.stage.trainer.ckpt_every_n_steps
        self._cur = {"steps": [], "ckpt_every": every, "cpu0": os.times(), "wall0": time.perf_counter()}
        self.stages[name] = self._cur
        self._tower_s = 0.0
        self._t_end = None
        for part in _tower_parts(pl_module):
            part.register_forward_pre_hook(self._tower_pre)
            part.register_forward_hook(self._tower_post)
        # torch's optimizer step post-hook marks the end of the update
        for opt in trainer.optimizers:
            opt.register_step_post_hook(self._opt_post)

    def on_train_end(self, trainer, pl_module) -> None:
        cur, t1 = self._cur, os.times()
        cur["wall"] = time.perf_counter() - cur.pop("wall0")
        c0 = cur.pop("cpu0")
        cur["user_s"], cur["sys_s"] = t1.user - c0.user, t1.system - c0.system
        cur["threads"] = torch.get_num_threads()

    # -- the vision tower ------------------------------------------------------------------------------------------
    def _tower_pre(self, module, args) -> None:
        self._tower_t0 = time.perf_counter()

    def _tower_post(self, module, args, out) -> None:
        self._tower_s += time.perf_counter() - self._tower_t0

    # -- one step ----------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._step = {"data": (now - self._t_end) if self._t_end is not None else float("nan"), "t0": now}
        self._tower_s = 0.0

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        now = time.perf_counter()
        fwd = now - self._step["t0"]
        self._step |= {"tower_forward": self._tower_s, "other_forward": fwd - self._tower_s, "t1": now}

    def on_after_backward(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        self._step |= {"backward": now - self._step["t1"], "t2": now}

    def _opt_post(self, optimizer, args, kwargs) -> None:
        self._step["opt1"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Runs after the built-in step-end callbacks (guard, checkpoint, clock, metrics), before the progress bar.
        now = time.perf_counter()
        s = self._step
        # Lightning runs forward and backward as a closure inside optimizer.step(): after the backward come the
        # gradient clipping and the AdamW update, up to the step's post hook.
        s["optimizer"] = s["opt1"] - s["t2"]
        s["bookkeeping"] = now - s["opt1"]  # zero_grad, the scheduler and the step-end callbacks
        s["checkpoint_step"] = trainer.global_step % self._cur["ckpt_every"] == 0
        self._cur["steps"].append({k: s[k] for k in (*PHASES, "checkpoint_step")})
        self._t_end = time.perf_counter()

    def report(self) -> dict[str, Any]:
        out = {}
        for name, cur in self.stages.items():
            steps = cur["steps"][self.warmup:]
            if not steps:
                continue
            plain = [s for s in steps if not s["checkpoint_step"]]
            med = {p: statistics.median(s[p] for s in plain if s[p] == s[p]) * 1000 for p in PHASES}
            ckpt = [s["bookkeeping"] * 1000 - med["bookkeeping"] for s in steps if s["checkpoint_step"]]
            out[name] = {
                "steps_timed": len(steps),
                "median_ms": {k: round(v, 2) for k, v in med.items()},
                "step_ms": round(sum(med.values()), 2),
                "checkpoint_ms": round(statistics.median(ckpt), 1) if ckpt else None,
                "ckpt_every": cur["ckpt_every"],
                "loop_wall_s": round(cur["wall"], 1),
                "user_s": round(cur["user_s"], 1),
                "sys_s": round(cur["sys_s"], 1),
                "threads": cur["threads"],
            }
        return out


def _tower_parts(pl_module: Any) -> list[torch.nn.Module]:
    """The image tower's patch embedding and blocks: non-overlapping modules that are called (``forward_intermediates``
    calls them, not the tower's own ``forward``), so their hooks add up to the tower's forward."""
    model = getattr(pl_module, "model", None)
    tower = getattr(model, "vision_tower", None)
    visual = getattr(tower, "visual", None) or getattr(model, "visual", None)
    if not isinstance(visual, torch.nn.Module):
        return []
    parts = [m for n, m in visual.named_children() if isinstance(m, torch.nn.Conv2d)]
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return parts + (list(blocks) if blocks is not None else [])


def format_table(report: dict[str, Any]) -> str:
    head = "| stage | step | " + " | ".join(PHASES) + " | checkpoint (every N) | loop wall | user / sys CPU | threads |"
    rows = [head, "|" + "---|" * (len(PHASES) + 6)]
    for name, r in report.items():
        step = r["step_ms"]
        cells = [f"{r['median_ms'][p]:.1f} ({100 * r['median_ms'][p] / step:.0f}%)" for p in PHASES]
        ck = f"{r['checkpoint_ms']:.0f} ms ({r['ckpt_every']})" if r["checkpoint_ms"] is not None else "-"
        rows.append(
            f"| {name} | {step:.1f} ms | " + " | ".join(cells)
            + f" | {ck} | {r['loop_wall_s']:.1f} s | {r['user_s']:.1f} / {r['sys_s']:.1f} s | {r['threads']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from zoo.train import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/moe_llava/shapes_tiny.yaml")
    p.add_argument("--runs-dir", required=True, help="output root (a fresh folder: stages are trained with --force)")
    p.add_argument("--steps", default="align=60,sft=300,moe=60",
                   help="STAGE=STEPS,... the shortened max_steps per stage")
    p.add_argument("--warmup", type=int, default=10, help="first steps of each stage left out of the medians")
    p.add_argument("--set", action="append", default=[], help="extra recipe overrides, as zoo train --set")
    args = p.parse_args(argv)
    overrides = [f"stages.{s.split('=')[0]}.trainer.max_steps={s.split('=')[1]}" for s in args.steps.split(",")]
    # Evaluation is not part of a training step; keep it short so the profile run stays short.
    overrides += [f"stages.{s.split('=')[0]}.eval.limit=20" for s in args.steps.split(",") if s.split("=")[0] in ("sft", "moe")]
    timer = StepPhaseTimer(args.warmup)
    train(args.recipe, force=True, overrides=overrides + args.set, runs_dir=args.runs_dir, callbacks=[timer])
    report = timer.report()
    Path(args.runs_dir, "profile.json").write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
