"""Training throughput of the default job (`make train`): stage I and stage II train steps, as train tokens/s, against
the step of the recipe as it was at commit f236d27 (the baseline of the "twice as fast" issue), measured in the same run.

    python -m eval.bench train [--steps 12] [--rounds 3] [--scenes 400]

Each side builds the stage exactly as `zoo train` does (stage type, model, data, trainable globs, optimizer), from
random weights: a step's cost does not depend on the weights. One step = the stage's ``compute_loss`` (vision
tower, projector, LM), backward, gradient clipping at the stage's value, the optimizer update. Tokens are the real
(non-padding) tokens of the batch, as the recipe's ``train_tokens_per_s``; samples/s is the figure a recipe of a
fixed number of steps pays (a recipe whose samples are shorter does more samples per second at the same tokens/s).
Where the current stage caches the frozen tower's features (``model.cache_tower_features``, on in ``zoo train``
once the tower is frozen), its cache is filled with the timed batches first: a run sees each image about eight
times in stage II, so nearly every step of a run is served from the cache (the f236d27 side never caches: that
commit had no cache). Baseline and current steps are timed in alternating rounds (median over rounds), so both see
the same load; only the ratios are meant to travel between machines.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CURRENT = Path(__file__).resolve().parents[2] / "recipes" / "moe_llava" / "shapes_tiny.yaml"
# The stages of recipes/moe_llava/shapes_tiny.yaml at f236d27, written in today's recipe schema (`type:` was
# `task:` then; nothing else differs in the keys these stages use).
BASELINE = Path(__file__).resolve().parent / "reference" / "moe_llava_shapes_tiny_f236d27.yaml"
STAGES = ("align", "sft")


class StepRunner:
    """One stage of a recipe, built as ``zoo train`` builds it, stepping on the stage's own first batches."""

    def __init__(self, recipe_path: Path, stage_name: str, scenes: int, num_batches: int, cache: bool = False) -> None:
        from itertools import islice

        from torch.utils.data import DataLoader

        from zoo.stages import get_stage_type
        from zoo.stages.base import StepBatchSampler
        from zoo.train import apply_param_globs, check_stage_configs, load_recipe

        overrides = [f"stages.{stage_name}.data.num_scenes={scenes}"]
        recipe = load_recipe(recipe_path, overrides, check_stage_types=False)
        check_stage_configs(recipe)
        stage = next(s for s in recipe.stages if s.name == stage_name)
        torch.manual_seed(stage.seed)
        self.module = get_stage_type(stage.type)(stage.model, stage.data, stage.eval, stage)
        apply_param_globs(self.module.model, stage.trainable, stage.frozen)
        params = [p for p in self.module.parameters() if p.requires_grad]
        o = stage.optim
        self.opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.params, self.clip = params, stage.trainer.gradient_clip_val
        # The stage exports its synthetic data under stage.out_dir (run_stage sets the stage's run folder; the
        # default is the working directory): a temporary folder, gone once the batches are in memory.
        with tempfile.TemporaryDirectory(prefix="mmzoo_bench_train_") as tmp:
            stage.out_dir = Path(tmp)
            ds = self.module.get_train_dataset()
            sampler = StepBatchSampler(len(ds), stage.batch_size, stage.seed)
            # the sampler is endless (steps, not epochs): take the batches the rounds use
            loader = DataLoader(ds, batch_sampler=sampler, collate_fn=self.module.collate_fn)
            self.batches = list(islice(loader, num_batches))
        self.batch_size = stage.batch_size
        self.module.train()
        model = self.module.model
        frozen_tower = not any(p.requires_grad for p in model.vision_tower.parameters())
        self.cached = cache and stage.model.cache_tower_features and frozen_tower
        if self.cached:
            model.cache_tower_features()
            with torch.no_grad():
                for batch in self.batches:
                    model.encode_images(batch["pixel_values"])

    def step(self, batch: dict[str, Any]) -> tuple[int, int]:
        loss, _ = self.module.compute_loss(batch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"bench train: non-finite loss {float(loss)}")
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum()), int(batch["input_ids"].shape[0])

    def rates(self, steps: int, offset: int) -> tuple[float, float]:
        """(train tokens/s, samples/s) over ``steps`` steps from batch ``offset``."""
        tokens = samples = 0
        t0 = time.perf_counter()
        for k in range(steps):
            t, n = self.step(self.batches[(offset + k) % len(self.batches)])
            tokens, samples = tokens + t, samples + n
        dt = time.perf_counter() - t0
        return tokens / dt, samples / dt


def measure(stage: str, steps: int, rounds: int, scenes: int) -> dict[str, float]:
    n = 2 + rounds * steps
    sides = {"f236d27": StepRunner(BASELINE, stage, scenes, n),
             "current": StepRunner(CURRENT, stage, scenes, n, cache=True)}
    for runner in sides.values():
        runner.rates(2, 0)  # warm-up: allocator, first-call paths
    tok: dict[str, list[float]] = {name: [] for name in sides}
    smp: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, runner in sides.items():
            t, s_ = runner.rates(steps, 2 + r * steps)
            tok[name].append(t)
            smp[name].append(s_)
    base, cur = statistics.median(tok["f236d27"]), statistics.median(tok["current"])
    base_s, cur_s = statistics.median(smp["f236d27"]), statistics.median(smp["current"])
    return {"f236d27_tok_s": base, "current_tok_s": cur, "ratio": cur / base,
            "f236d27_samples_s": base_s, "current_samples_s": cur_s, "samples_ratio": cur_s / base_s,
            "cached": sides["current"].cached,
            "batch": sides["current"].batch_size, "baseline_batch": sides["f236d27"].batch_size}


def run(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per side (median)")
    p.add_argument("--scenes", type=int, default=400, help="training scenes to build each stage's data from")
    p.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)  # the default job is CPU-only
    args = p.parse_args(argv)
    print(f"threads: {torch.get_num_threads()}; {args.rounds} rounds x {args.steps} steps per side, alternating")
    print("| default job stage | f236d27 train tokens/s | current train tokens/s | ratio | f236d27 samples/s | "
          "current samples/s | ratio | tower features |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for stage in STAGES:
        m = measure(stage, args.steps, args.rounds, args.scenes)
        print(f"| {stage} (batch {m['baseline_batch']} / {m['batch']}) | {m['f236d27_tok_s'] / 1000:.2f}k | "
              f"{m['current_tok_s'] / 1000:.2f}k | {m['ratio']:.2f}x | {m['f236d27_samples_s']:.1f} | "
              f"{m['current_samples_s']:.1f} | {m['samples_ratio']:.2f}x | "
              f"{'cached (current)' if m['cached'] else 'computed'} |", flush=True)
