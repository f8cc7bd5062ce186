"""StageModule: the LightningModule every recipe stage type derives from.

A stage module is *model + loss + data + evaluation* for one kind of stage. Subclasses write the parts that differ; the base
class owns the training loop plumbing so that every family resumes, shards and schedules the same way::

    @register_stage("my_stage")
    class MyStage(StageModule):
        ModelConfig = MyModelConfig        # dataclasses: the recipe's `model:`, `data:` and `eval:` sections are
        DataConfig = MyDataConfig          # validated against them (unknown key / wrong type -> error naming the
        EvalConfig = MyEvalConfig          # file and key path) and passed in as instances

        def __init__(self, model_cfg, data_cfg, eval_cfg, stage):
            super().__init__(model_cfg, data_cfg, eval_cfg, stage)
            self.architecture, self.model_args = "my_model_tiny", {"width": model_cfg.width}
            self.model = create_model(self.architecture, **self.model_args)   # a plain nn.Module

        def train_dataset(self) -> Dataset: ...                  # map-style, deterministic per index
        def compute_loss(self, batch) -> tuple[Tensor, dict]: ... # (loss, {"name": value} to log)
        def evaluate(self, out_dir: Path) -> dict[str, float]: ...# after training, on global rank 0

Optional overrides: ``collate_fn`` (default: torch's default collate), ``init_from(source)`` (default: strict load
of an exported directory into ``self.model``; override e.g. to upcycle a dense checkpoint into MoE experts) and
``export(out_dir)`` (default: ``save_pretrained(self.model, out_dir, self.architecture, self.model_args)``).
A stage that reads other stages' exports besides ``init_from`` (Uni-MoE's ``model.expert_sources``) gives its
``ModelConfig`` a method ``earlier_stage_refs() -> [(key path, stage name)]``; the recipe validator checks that each
names an earlier stage, before anything runs (on the torch-free config, so validation stays light).

What the base class supplies:

- ``train_dataloader``: an infinite, resumable stream (:class:`StepBatchSampler`). Micro-batch ``k`` on rank ``r``
  is a pure function of ``(seed, k, r)``, so a run resumed from a checkpoint sees exactly the batches an
  uninterrupted run would have seen, and ``N`` processes with ``batch_size = B / N`` see the same global batches as
  one process with ``batch_size = B``. A stage with ``group_by_length: N`` gets :class:`LengthGroupedBatchSampler`
  instead (same guarantees; batches of similar length), over the lengths its ``sample_lengths()`` reports and its
  ``DataConfig`` declares (``reports_sample_lengths = True``), which the recipe validator checks.
- ``on_train_batch_start``: reseeds ``torch``/``numpy``/``random`` from ``(seed, step, micro-batch, rank)`` so
  randomness in the forward pass (dropout, noise, timesteps) is a function of the step (Lightning checkpoints do not
  store RNG state). Randomness in ``train_dataset`` items or ``collate_fn`` must instead be seeded by the sample
  index (e.g. ``random.Random(mix_seed(seed, index))``): Lightning collates batches ahead of the step hooks.
- ``training_step`` (logs ``loss``, the module's logs and ``lr``), ``configure_optimizers`` (over parameters with
  ``requires_grad``; weight decay only on tensors with ``ndim >= 2``; warmup + cosine/linear/constant schedule,
  stepped per optimizer step).

The runner (``zoo/train.py``) constructs the module, calls ``init_from`` (fresh stages only: a resumed stage gets its
weights from the checkpoint), applies the recipe's ``trainable``/``frozen`` globs to ``self.model``, fits, then calls
``evaluate`` and ``export``. The config dataclasses live in a torch-free ``zoo/stages/configs/<name>.py`` that the
stage module imports with ``from ... import``: the recipe validator reads that import with ``ast`` and imports only
the configs module, never the stage module (``zoo.stages.stage_configs``). Keep the stage module's top-level imports
light too (torch, lightning): import model families inside ``__init__`` via ``zoo.registry.create_model``. A module holds
model + loss + which parameters train + evaluation glue; datasets, world construction and sample builders live in
``data/`` (e.g. ``data.shapes_llava``, ``data.shapes_clip``, ``data.latents``). Nested config blocks are typed by
the dataclass their code takes (``moe: MoESettings | None``), so the recipe validator checks inside them too.
"""

from __future__ import annotations

import fnmatch
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from data.seeding import mix_seed
from zoo.registry import CONFIG_NAME, WEIGHTS_NAME, save_pretrained

if TYPE_CHECKING:
    from zoo.recipe import StageSpec

__all__ = ["LengthGroupedBatchSampler", "StageModule", "StepBatchSampler", "build_lr_lambda", "mix_seed"]


class StepBatchSampler(Sampler[list[int]]):
    """An infinite stream of micro-batches of dataset indices, each a pure function of its position.

    The global sample stream walks a fresh seeded permutation of the dataset every epoch. Micro-batch ``k``
    (counted from the start of the stage) covers global positions ``[k*B*W + r*B, k*B*W + (r+1)*B)`` on rank ``r`` of
    ``W`` ranks with per-rank batch ``B``. ``start`` is where a resumed run picks up (``global_step * accumulate``).
    It has no ``__len__``: training length comes from ``trainer.max_steps``.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if num_samples <= 0:
            raise ValueError("the training dataset is empty")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=gen)
        return int(self._perm[offset])

    def batch(self, k: int) -> list[int]:
        first = k * self.batch_size * self.world_size + self.rank * self.batch_size
        return [self._index(p) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


class LengthGroupedBatchSampler(StepBatchSampler):
    """:class:`StepBatchSampler` whose batches hold samples of similar length, so a padded batch wastes little.

    The global stream is cut into megabatches of ``group`` global batches (``group * B * W`` consecutive positions
    of the seeded per-epoch permutation); each megabatch is sorted by sample length, cut back into ``group``
    batches, and those batches are visited in a seeded random order. Micro-batch ``k`` is still a pure function of
    ``(seed, k, rank)``, so resuming and sharding behave exactly as in the base class; within a megabatch every
    sample is seen once, as before. This is LLaVA's ``group_by_modality_length`` idea: a random batch of the tiny
    recipe's VQA records (88-163 tokens) is about 10% padding, a batch grouped over 32 batches under 1%.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, lengths: list[int] | np.ndarray, group: int,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        super().__init__(num_samples, batch_size, seed, rank=rank, world_size=world_size, start=start)
        if len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for a dataset of {num_samples} samples")
        if group < 1:
            raise ValueError(f"group is {group}; it must be >= 1 (batches per length-sorted megabatch)")
        self.lengths, self.group = np.asarray(lengths), group
        self._mega, self._mega_batches = -1, []

    def batch(self, k: int) -> list[int]:
        mega, slot = divmod(k, self.group)
        if mega != self._mega:
            span = self.batch_size * self.world_size
            first = mega * self.group * span
            indices = np.array([self._index(p) for p in range(first, first + self.group * span)])
            # longest first, ties in stream order: the sort is stable, so equal lengths keep their random order
            indices = indices[np.argsort(-self.lengths[indices], kind="stable")]
            order = torch.randperm(self.group, generator=torch.Generator().manual_seed(mix_seed(self.seed, mega, 1)))
            self._mega = mega
            self._mega_batches = [indices[int(b) * span : (int(b) + 1) * span].tolist() for b in order]
        own = self._mega_batches[slot]
        return own[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


def build_lr_lambda(name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Multiplier on the base lr at optimizer step ``s``: linear warmup, then cosine / linear decay or constant."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return fn


class StageModule(L.LightningModule, ABC):
    """Base class of recipe stage types; see the module docstring for the contract."""

    ModelConfig: ClassVar[type]
    DataConfig: ClassVar[type]
    EvalConfig: ClassVar[type]
    stage_type: ClassVar[str]  # set by @register_stage

    #: set by subclasses in __init__: the registered architecture and the kwargs that rebuild ``self.model``
    architecture: str
    model_args: dict[str, Any]
    model: nn.Module

    def __init__(self, model_cfg: Any, data_cfg: Any, eval_cfg: Any, stage: StageSpec):
        super().__init__()
        self.model_cfg, self.data_cfg, self.eval_cfg, self.stage = model_cfg, data_cfg, eval_cfg, stage
        self._train_dataset: Dataset | None = None
        self.last_logs: dict[str, float] = {}

    # ---- hooks for subclasses -------------------------------------------------------------------------------------

    @abstractmethod
    def train_dataset(self) -> Dataset:
        """The map-style training dataset (item ``i`` must be a deterministic function of ``i``)."""

    def collate_fn(self, samples: list[Any]) -> Any:
        """Turn a list of dataset items into a batch (default: torch's default collate)."""
        return torch.utils.data.default_collate(samples)

    @abstractmethod
    def compute_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Return ``(loss, logs)``; ``logs`` values are logged under their names (scalars)."""

    def evaluate(self, out_dir: Path) -> dict[str, float]:
        """Numbers for summary.json and the results table, computed after training on global rank 0."""
        return {}

    def sample_lengths(self) -> list[int] | None:
        """Each training sample's length (what padding follows, e.g. tokens), for ``group_by_length``; default None
        (the stage type cannot group by length)."""
        return None

    def skipped_samples(self) -> int | dict[str, int]:
        """Training samples skipped as unreadable (``data.on_error: skip``), summed over DataLoader workers.

        An int, or counts by reason (``{"truncated image": 3}``). The runner prints it at the end of the stage and
        records it as ``skipped`` in ``summary.json``. Default: 0 (a stage type whose data never skips).
        """
        return 0

    def init_from(self, source: Path) -> None:
        """Load an exported directory (``config.json`` + ``model.safetensors``) into ``self.model``, strictly."""
        import json

        from zoo.checkpoint import load_file_strict

        source = Path(source)
        config = json.loads((source / CONFIG_NAME).read_text())
        if config.get("architecture") != self.architecture:
            raise ValueError(
                f"{source}: holds a {config.get('architecture')!r} model but stage type {self.stage_type!r} builds "
                f"{self.architecture!r}; override {type(self).__name__}.init_from to convert between them"
            )
        load_file_strict(self.model, source / WEIGHTS_NAME, self.architecture)

    def export(self, out_dir: Path) -> Path:
        """Write the trained model as a ``zoo.load``-able directory."""
        extra = {"stage_type": self.stage_type, "stage": self.stage.name}
        return save_pretrained(self.model, out_dir, self.architecture, self.model_args, **extra)

    # ---- supplied by the base class -------------------------------------------------------------------------------

    def get_train_dataset(self) -> Dataset:
        """``train_dataset()``, built once."""
        if self._train_dataset is None:
            self._train_dataset = self.train_dataset()
        return self._train_dataset

    @property
    def micro_batches_done(self) -> int:
        trainer = self._trainer
        return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        dataset = self.get_train_dataset()
        trainer = self.trainer
        where = dict(rank=trainer.global_rank, world_size=trainer.world_size, start=self.micro_batches_done)
        if self.stage.group_by_length:
            lengths = self.sample_lengths()
            if lengths is None:
                raise ValueError(f"stage {self.stage.name!r}: group_by_length is set, but stage type "
                                 f"{self.stage_type!r} does not report sample lengths; remove group_by_length")
            sampler: StepBatchSampler = LengthGroupedBatchSampler(
                len(dataset), self.stage.batch_size, self.stage.seed, lengths, self.stage.group_by_length, **where
            )
        else:
            sampler = StepBatchSampler(len(dataset), self.stage.batch_size, self.stage.seed, **where)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.stage.num_workers,
            persistent_workers=False,
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        accumulate = self.trainer.accumulate_grad_batches
        seed = mix_seed(self.stage.seed, self.trainer.global_step, batch_idx % accumulate, self.trainer.global_rank)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, logs = self.compute_loss(batch)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, batch_size=self.stage.batch_size)
        values = {"loss": float(loss.detach())}
        for name, value in logs.items():
            value = float(value.detach()) if isinstance(value, Tensor) else float(value)
            self.log(name, value, on_step=True, batch_size=self.stage.batch_size)
            values[name] = value
        values["lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("lr", values["lr"], on_step=True, batch_size=self.stage.batch_size)
        self.last_logs = values
        return loss

    def configure_optimizers(self) -> Any:
        optim, sched = self.stage.optim, self.stage.schedule
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {self.stage.name!r}: no trainable parameters (check `trainable` / `frozen`)")
        named = [(n.removeprefix("model."), p) for n, p in params]
        groups = param_groups(named, optim.lr, optim.weight_decay, optim.lr_scale)
        if optim.name == "muon":
            from zoo.stages.optimizers import MuonAdamW, is_muon_param

            def groups_of(part: list[tuple[str, Any]]) -> list[dict[str, Any]]:
                # the globs were checked against all parameters above; keep those that match within this part
                scale = {g: s for g, s in optim.lr_scale.items() if any(fnmatch.fnmatchcase(n, g) for n, _ in part)}
                return param_groups(part, optim.lr, optim.weight_decay, scale) if part else []

            opt = MuonAdamW(
                groups_of([(n, p) for n, p in named if is_muon_param(n, p)]),
                groups_of([(n, p) for n, p in named if not is_muon_param(n, p)]),
                lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
            )  # fmt: skip
        elif optim.name == "adamw":
            opt = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        elif optim.name == "adam":
            opt = torch.optim.Adam(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        elif optim.name == "sgd":
            opt = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
        else:
            opt = import_optimizer(optim.name)(groups, lr=optim.lr, **optim.args)
        total = self.trainer.max_steps
        lr_lambda = build_lr_lambda(sched.name, sched.warmup_steps, total, sched.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def import_optimizer(path: str) -> type:
    """``"torch.optim.RAdam"`` (any importable ``module.Class``) -> the optimizer class, checked to be one."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"optim.name {path!r}: cannot import it ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optim.name {path!r} is not a torch.optim.Optimizer subclass")
    return cls


def param_groups(
    named: list[tuple[str, Any]], lr: float, weight_decay: float, lr_scale: dict[str, float]
) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on tensors with ndim >= 2 only; ``lr_scale`` globs multiply the lr.

    The unscaled groups come first, so ``param_groups[0]`` (what the logs report as ``lr``) is the base rate.
    """
    import fnmatch

    for glob, scale in lr_scale.items():
        if scale < 0:
            raise ValueError(f"optim.lr_scale[{glob!r}] = {scale} must be >= 0")
        if not any(fnmatch.fnmatchcase(n, glob) for n, _ in named):
            raise ValueError(f"optim.lr_scale glob {glob!r} matches no trainable parameter")
    buckets: dict[tuple[float, bool], list[Any]] = {}
    for name, p in named:
        scale = next((s for g, s in lr_scale.items() if fnmatch.fnmatchcase(name, g)), 1.0)
        buckets.setdefault((scale, p.ndim >= 2), []).append(p)
    order = sorted(buckets, key=lambda k: (k[0] != 1.0, not k[1]))
    return [
        {"params": buckets[k], "lr": lr * k[0], "weight_decay": weight_decay if k[1] else 0.0} for k in order
    ]
