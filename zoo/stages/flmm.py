"""F-LMM grounding on a frozen LLaVA-like model (``type: flmm``): only the mask head and the refiner train.

The stage builds ``zoo.models.flmm.FLMM`` around ``model.base`` (a weights name or a zoo directory, loaded with its
weights; ``init_from`` stays null), trains with F-LMM's loss (BCE + Dice on the coarse and the refined mask) on
referring expressions, and checks that the LMM came out of training bit-for-bit unchanged: every LMM tensor is
compared with the base checkpoint in ``evaluate`` (a difference is an error), and a recipe whose ``trainable`` globs
reach the LMM is refused when training starts. ``evaluate`` then runs the configured benchmarks (``shapes_refseg``,
``shapes_vqa``...) on the grounded model and, with ``eval.baseline``, the expression-blind union-of-objects baseline.

Data: the synthetic ShapesRefSeg split (``source: shapes``), RefCOCO / RefCOCO+ / RefCOCOg in the ``refer`` layout
(``source: refcoco``) or PNG (``source: png``), through ``data.refseg``; several sources concatenate, as F-LMM trains
on their union.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoo.stages import register_stage
from zoo.stages.base import StageModule
from zoo.stages.configs.flmm import FLMMDataConfig, FLMMEvalConfig, FLMMModelConfig

__all__ = ["FLMMModelConfig", "FLMMDataConfig", "FLMMEvalConfig", "FLMMStage", "RefSegTrainSet"]


class RefSegTrainSet(Dataset):
    """``data.refseg`` samples as ``(image, expression, mask)`` triples; ``repeat`` lists every sample of a kind
    that many times (rare kinds, e.g. ShapesRefSeg's relation expressions, seen more often)."""

    def __init__(self, samples: Any, repeat: dict[str, int] | None = None, kinds: Sequence[str] | None = None) -> None:
        self.samples = samples
        repeat = repeat or {}
        if repeat and kinds is None:
            raise ValueError("repeat needs the samples' kinds")
        unknown = sorted(set(repeat) - set(kinds or ()))
        if unknown or any(n < 1 for n in repeat.values()):
            raise ValueError(f"repeat_kinds {repeat}: kinds must be among {sorted(set(kinds or ()))}, counts >= 1")
        self.order = [i for i in range(len(samples)) for _ in range(repeat.get(kinds[i], 1) if repeat else 1)]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[Any, str, Any]:
        s = self.samples[self.order[i]]
        return s.load_image(), s.text, s.mask()


def _path(value: str | None, what: str) -> Path:
    if value is None:
        raise ValueError(f"data.{what} is not set")
    p = Path(os.path.expandvars(value))
    if not p.exists():
        raise FileNotFoundError(f"data.{what}: {p} does not exist (mmzoo never downloads; put the files there first)")
    return p


def _sam_weights_dir(value: str) -> Path:
    """A transformers ``SamModel`` directory: a path (a relative one also tried from the repository root, where the
    tiny recipe's ``recipes/flmm/tiny_sam_shapes`` lives), or the name of one under ``zoo/weights/``."""
    from zoo.registry import SHIPPED_WEIGHTS_DIR

    given = Path(os.path.expandvars(value))
    if not given.exists():
        for candidate in (Path(__file__).resolve().parents[2] / given, SHIPPED_WEIGHTS_DIR / value):
            if not given.is_absolute() and candidate.is_dir():
                return candidate
    return _path(value, "model.sam_weights")


@register_stage("flmm")
class FLMMStage(StageModule):
    ModelConfig = FLMMModelConfig
    DataConfig = FLMMDataConfig
    EvalConfig = FLMMEvalConfig

    def __init__(self, model_cfg: FLMMModelConfig, data_cfg: FLMMDataConfig, eval_cfg: FLMMEvalConfig,
                 stage: Any) -> None:  # fmt: skip
        super().__init__(model_cfg, data_cfg, eval_cfg, stage)
        import json

        from zoo.registry import CONFIG_NAME, create_model, load, resolve_weights

        base_dir = Path(model_cfg.base) if Path(model_cfg.base).is_dir() else resolve_weights(model_cfg.base)
        base_config = json.loads((base_dir / CONFIG_NAME).read_text())
        self.architecture = "flmm"
        args: dict[str, Any] = {
            "base_architecture": base_config["architecture"],
            "base_args": base_config["model_args"],
            "instruction": model_cfg.instruction,
            "merge": model_cfg.merge,
            "map_size": model_cfg.map_size,
            "unet_channels": model_cfg.unet_channels,
            "unet_depth": model_cfg.unet_depth,
            "use_mask_prompt": model_cfg.use_mask_prompt,
            "use_box_prompt": model_cfg.use_box_prompt,
            "use_text_prompt": model_cfg.use_text_prompt,
            "coord_channels": model_cfg.coord_channels,
            "word_slots": model_cfg.word_slots,
            "word_slot_channels": model_cfg.word_slot_channels,
            "text_film": model_cfg.text_film,
            "image_channels": model_cfg.image_channels,
            "pixel_refine": model_cfg.pixel_refine,
            "sim_maps": model_cfg.sim_maps,
            "sim_dim": model_cfg.sim_dim,
        }
        if model_cfg.sam is not None:
            args["sam"] = model_cfg.sam
        self.model = create_model(self.architecture, **args)
        self.model_args = self.model.model_args
        base = load(base_dir)
        self.model.lmm.load_state_dict(base.state_dict())
        # The reference every LMM tensor is compared with after training (the "frozen" check).
        self._base_state = {k: v.clone() for k, v in base.state_dict().items()}
        if model_cfg.sam_weights is not None:
            self.model.load_sam_weights(str(_sam_weights_dir(model_cfg.sam_weights)))
        self._t_start: float | None = None
        self._t_train = 0.0

    # ---- data ------------------------------------------------------------------------------------------------------

    def train_dataset(self) -> Dataset:
        from torch.utils.data import ConcatDataset

        from data import refseg

        d = self.data_cfg
        parts: list[Dataset] = []
        for source in d.sources:
            if source == "shapes":
                ds = refseg.ShapesRefSeg(d.world, "train", d.num_scenes)
                train = RefSegTrainSet(ds, d.repeat_kinds, [kind for *_, kind in ds.index])
                print(f"stage {self.stage.name}: ShapesRefSeg train, {d.num_scenes} scenes, {len(ds)} expressions "
                      f"{ds.kinds()}, {len(train)} after repeat_kinds {d.repeat_kinds}", flush=True)  # fmt: skip
                parts.append(train)
            elif source == "refcoco":
                root, images = _path(d.refcoco_root, "refcoco_root"), _path(d.refcoco_images, "refcoco_images")
                for name in d.refcoco_datasets:
                    samples = refseg.read_refcoco(root, name, "train", images)
                    print(f"stage {self.stage.name}: {name} train, {len(samples)} refs", flush=True)
                    parts.append(RefSegTrainSet(samples))
            else:
                samples = refseg.read_png(_path(d.png_narratives, "png_narratives"),
                                          _path(d.png_panoptic_json, "png_panoptic_json"),
                                          _path(d.png_panoptic_dir, "png_panoptic_dir"),
                                          _path(d.png_images, "png_images"))  # fmt: skip
                print(f"stage {self.stage.name}: PNG train, {len(samples)} grounded segments", flush=True)
                parts.append(RefSegTrainSet(samples))
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def collate_fn(self, samples: list[tuple[Any, str, Any]]) -> dict[str, Any]:
        images, texts, masks = zip(*samples)
        return self.model.prepare(list(images), list(texts), list(masks))

    # ---- training --------------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.model_cfg.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(self.model_cfg.cpu_threads)

    def on_train_start(self) -> None:
        reached = [n for n, p in self.model.lmm.named_parameters() if p.requires_grad]
        if reached:
            raise ValueError(
                f"stage {self.stage.name}: F-LMM keeps the LMM frozen, but the trainable globs reach {len(reached)} "
                f"of its tensors (e.g. lmm.{reached[0]}); train the heads (mask_head.*, refiner.*, layer_weights, "
                f"text_proj.* and the optional word_reduce.*, text_cond.*, sim_text.*, sim_image.*, pixel_head.*)"
            )
        self._t_start = time.perf_counter()

    def on_train_end(self) -> None:
        if self._t_start is not None:
            self._t_train += time.perf_counter() - self._t_start
            self._t_start = None

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        return self.model.loss(batch)

    # ---- evaluation ------------------------------------------------------------------------------------------------

    def lmm_unchanged(self) -> bool:
        """Whether every LMM tensor equals the base checkpoint's (raises naming the first that differs)."""
        now = self.model.lmm.state_dict()
        changed = [k for k, v in self._base_state.items() if not torch.equal(now[k].cpu(), v)]
        if changed or set(now) != set(self._base_state):
            raise RuntimeError(f"stage {self.stage.name}: the frozen LMM changed during training: {changed[:5]}")
        return True

    def evaluate(self, out_dir: Path) -> dict[str, float]:
        counts = self.model.num_parameters()
        metrics: dict[str, float] = {
            "lmm_unchanged": float(self.lmm_unchanged()),
            "params_grounding_M": counts["grounding"] / 1e6,
            "params_lmm_M": counts["lmm"] / 1e6,
        }
        if self._t_train > 0:
            metrics["train_s"] = self._t_train
        if not self.eval_cfg.tasks:
            return metrics
        import eval as zoo_eval
        from zoo.stages.moe_llava import summarise_eval

        runs = [("", self.model, f"flmm ({self.stage.name})")]
        if self.eval_cfg.baseline:
            from eval.refseg import ObjectUnionBaseline

            runs.append(("baseline_union/", ObjectUnionBaseline(), "union-of-objects baseline"))
        for prefix, model, name in runs:
            tasks = [t for t in self.eval_cfg.tasks if not prefix or "refseg" in t]
            if not tasks:
                continue
            t0 = time.perf_counter()
            res = zoo_eval.run(model, tasks=tasks, limit=self.eval_cfg.limit, batch_size=self.eval_cfg.batch_size,
                               output_dir=Path(out_dir) / "eval" / (prefix.rstrip("/") or "flmm"), model_name=name,
                               model_args={"stage": self.stage.name}, progress=False)  # fmt: skip
            metrics[f"{prefix}eval_s"] = time.perf_counter() - t0
            metrics.update({f"{prefix}{k}": v for k, v in summarise_eval(res).items()})
            for task, entry in res.get("results", {}).items():
                for key, value in entry.items():
                    if "/" in key and isinstance(value, int | float):  # per-kind numbers (relation, ...)
                        metrics[f"{prefix}{task}/{key.split(',')[0]}"] = float(value)
        return metrics
