"""MoE-LLaVA's three training stages as one stage type (``type: moe_llava``).

The stage a recipe entry is follows from its settings, as in MoE-LLaVA's scripts (paper section 3.2):

* **I, alignment** (``pretrain.sh``): the ``plain`` template on image captions; the recipe's ``trainable`` globs
  keep only the projector (``mm_projector.*``) trainable. ``init_from`` may name a CLIP checkpoint (a zoo CLIP
  architecture with an open_clip ``.visual``, e.g. the tiny CLIP recipe's stage): its image tower becomes the frozen
  vision encoder.
* **II, instruction tuning** (``finetune.sh``): a chat template (``phi``) on VQA conversations; projector + LLM train.
* **III, MoE-tuning** (``finetune_moe.sh``): ``model.moe`` is set, so the model is built with MoE layers; ``init_from``
  a dense stage-II checkpoint upcycles it (every expert starts as a copy of its layer's FFN, routers fresh) and the
  recipe trains the FFNs and routers (MoE-LLaVA's ``--train_modules fc1 fc2 wg``: ``llm.lm.model.layers.*.mlp.*``).
  The loss adds the balance loss summed over MoE layers x 0.01 (the model computes it).

Data is LLaVA conversation JSON + an image folder, webdataset shards, or the synthetic world (exported to LLaVA JSON
under the stage's output folder first, so the same reader serves real and synthetic data). ``evaluate`` runs
``eval.run`` on the configured benchmarks and reports accuracy / F1 next to parameter counts and throughput.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from zoo.checkpoint import load_state_dict_strict
from zoo.stages import register_stage
from zoo.stages.base import StageModule
from zoo.stages.configs.moe_llava import MoELLaVADataConfig, MoELLaVAEvalConfig, MoELLaVAModelConfig

__all__ = ["MoELLaVAModelConfig", "MoELLaVADataConfig", "MoELLaVAEvalConfig", "MoELLaVAStage"]


@register_stage("moe_llava")
class MoELLaVAStage(StageModule):
    ModelConfig = MoELLaVAModelConfig
    DataConfig = MoELLaVADataConfig
    EvalConfig = MoELLaVAEvalConfig

    def __init__(self, model_cfg: MoELLaVAModelConfig, data_cfg: MoELLaVADataConfig, eval_cfg: MoELLaVAEvalConfig,
                 stage: Any) -> None:
        super().__init__(model_cfg, data_cfg, eval_cfg, stage)
        from zoo.registry import create_model

        self.architecture = model_cfg.architecture
        args: dict[str, Any] = {"projector": model_cfg.projector, "template": model_cfg.template}
        if model_cfg.vision is not None:
            args["vision"] = model_cfg.vision.to_dict()
        if model_cfg.lm is not None:
            args["lm"] = model_cfg.lm
        if model_cfg.tokenizer == "shapes_words":
            from data.shapes_llava import shapes_tokenizer
            from zoo.tokenizers import tokenizer_to_json

            tok = shapes_tokenizer(model_cfg.vocab_world, model_cfg.vocab_scenes)
            args["tokenizer"] = {"kind": "word_level", "json": tokenizer_to_json(tok)}
        elif model_cfg.tokenizer == "pretrained":
            from transformers import AutoTokenizer

            from zoo.models.moe_llava import tokenizer_spec

            path = _local_dir(model_cfg.pretrained_lm, "model.pretrained_lm (needed by tokenizer: pretrained)")
            args["tokenizer"] = tokenizer_spec(AutoTokenizer.from_pretrained(path, local_files_only=True))
        if model_cfg.image_token_id is not None:
            args["image_token_id"] = model_cfg.image_token_id
        if model_cfg.image_pos_embed:
            args["image_pos_embed"] = True
        if model_cfg.image_newline:
            args["image_newline"] = True
        if model_cfg.image_pos_code:
            args["image_pos_code"] = model_cfg.image_pos_code
        if model_cfg.image_pos_code_dims:
            args["image_pos_code_dims"] = model_cfg.image_pos_code_dims
        # Stage III builds the MoE model directly, so a resumed run's checkpoint matches the module tree;
        # a fresh run fills it from the dense stage-II checkpoint in init_from.
        args["moe"] = model_cfg.moe.to_dict() if model_cfg.moe is not None else None
        self.model = create_model(self.architecture, **args)
        self.model_args = self.model.model_args
        # Pretrained components start the first stage; later stages get every weight from their init_from.
        first_stage = getattr(stage, "init_source", None) is None
        if first_stage and model_cfg.pretrained_lm is not None:
            self._load_pretrained_lm(_local_dir(model_cfg.pretrained_lm, "model.pretrained_lm"))
        if first_stage and model_cfg.pretrained_vision is not None:
            self._load_pretrained_vision(_local_dir(model_cfg.pretrained_vision, "model.pretrained_vision"))
        self._tokens = 0
        self._restored_drops: list[Any] = []  # SkippedSample items a resumed run's checkpoint carried
        self._t_start: float | None = None
        self._t_train = 0.0

    # ---- init ------------------------------------------------------------------------------------------------------

    def init_from(self, source: Path) -> None:
        """Load an exported stage: same architecture (strict), dense -> MoE (upcycle), or a CLIP (vision tower)."""
        import json

        from zoo.registry import load

        source = Path(source)
        config = json.loads((source / "config.json").read_text())
        arch, args = config.get("architecture"), config.get("model_args", {})
        is_llava = isinstance(args, dict) and "vision" in args and "lm" in args
        if not is_llava:
            self._load_vision_from_clip(source, arch)
            return
        src_moe, own_moe = args.get("moe"), self.model_args.get("moe")
        if src_moe is None and own_moe is not None:
            dense = load(source)
            dense.enable_moe(own_moe)  # experts = copies of the dense FFN, routers freshly initialised
            where = f"{source} (upcycled to {len(dense.moe_layers)} MoE layers)"
            load_state_dict_strict(self.model, dense.state_dict(), where, self.architecture)
            return
        if src_moe is not None and own_moe is None:
            raise ValueError(f"{source}: holds an MoE model but this stage builds a dense one (set model.moe)")
        super().init_from(source)

    def _load_vision_from_clip(self, source: Path, arch: str | None) -> None:
        from zoo.registry import load

        clip = load(source)
        visual = getattr(clip, "visual", None)
        tower = getattr(self.model.vision_tower, "visual", None)
        if visual is None or tower is None:
            raise ValueError(
                f"{source}: a {arch!r} checkpoint can initialise only the vision tower of an open_clip-style tower "
                "(kind 'zoo' or 'open_clip'); this model's tower has no `.visual`"
            )
        expected = f"model.vision of this stage (it must describe the same CLIP as the {arch!r} checkpoint)"
        load_state_dict_strict(tower, visual.state_dict(), source, expected)

    def _load_pretrained_lm(self, path: Path) -> None:
        """Weights of a local transformers checkpoint of the same LM architecture (e.g. microsoft/phi-2)."""
        from transformers import AutoModelForCausalLM

        lm = self.model.llm.lm
        hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=lm.dtype)
        load_state_dict_strict(lm, hf.state_dict(), path, "model.lm of this stage")

    def _load_pretrained_vision(self, path: Path) -> None:
        """Weights of a local transformers CLIP / SigLIP checkpoint into an ``hf`` vision tower."""
        inner = getattr(self.model.vision_tower, "model", None)
        if inner is None or not hasattr(type(inner), "from_pretrained"):
            raise ValueError("model.pretrained_vision needs an hf vision tower (model.vision.kind: hf)")
        # The tower's own class (e.g. CLIPVisionModel) reads the vision half of a full CLIP checkpoint too.
        hf = type(inner).from_pretrained(path, local_files_only=True)
        load_state_dict_strict(inner, hf.state_dict(), path, "model.vision of this stage")

    # ---- data ------------------------------------------------------------------------------------------------------

    def _records(self):
        from data.llava import read_llava_json, read_llava_webdataset

        d = self.data_cfg
        where = f"stage {self.stage.name}"
        if d.source == "llava_json":
            if not d.json_paths:
                raise ValueError(f"{where}: data.source=llava_json needs data.json_paths")
            paths = [Path(os.path.expandvars(p)) for p in d.json_paths]
            folders = {str(p.parent) for p in paths}
            if d.image_folder is None and len(folders) > 1:
                raise ValueError(f"{where}: data.json_paths live in several folders; set data.image_folder")
            folder = os.path.expandvars(d.image_folder) if d.image_folder is not None else folders.pop()
            return [r for p in paths for r in read_llava_json(p, d.on_error)], folder
        if d.source == "webdataset":
            if not d.shards:
                raise ValueError(f"{where}: data.source=webdataset needs data.shards")
            return read_llava_webdataset([os.path.expandvars(s) for s in d.shards], d.on_error), None
        from data.formats import export_llava
        from data.shapes import ShapesWorld
        from data.shapes_llava import write_shapes_vqa

        out = self.stage.run_dir() / "data"
        world = ShapesWorld(d.world)
        # The caption export also writes every scene's image (images/<id>.png), which the VQA records reuse.
        json_path = export_llava(world, "train", d.num_scenes, out, "caption")
        if d.kind == "vqa":
            json_path = write_shapes_vqa(world, d.num_scenes, out, d.turns_per_conversation, d.pope_probes,
                                         d.answer_prompt, seed=self.stage.seed,
                                         questions_per_kind=d.questions_per_kind,
                                         extra_spatial=d.extra_spatial,
                                         answer_prompt_turns=d.answer_prompt_turns)
        return read_llava_json(json_path, d.on_error), str(out)

    def train_dataset(self):
        from data.llava import LlavaDataset, build_image_transform
        from zoo.conversation import get_template

        records, folder = self._records()
        dc = self.model.data_cfg
        template = get_template(self.data_cfg.template or self.model_cfg.template)
        ds = LlavaDataset(
            records,
            tokenizer=self.model.tokenizer,
            template=template,
            num_image_tokens=self.model.num_image_tokens,
            image_transform=build_image_transform(dc["image_size"], dc["mean"], dc["std"], dc["pad_to_square"]),
            image_folder=folder,
            max_length=self.data_cfg.max_length,
            truncate=self.data_cfg.truncate,
            on_error=self.data_cfg.on_error,
            verify_images=self.data_cfg.check_images,
            image_token_id=self.model.image_token_id,
            progress=self.stage.trainer.enable_progress_bar,
        )
        unk = self.model.tokenizer.unk_token_id
        n_unk = sum(e.input_ids.count(unk) for e in ds.encoded)
        print(f"stage {self.stage.name}: data {ds.summary()}; template {template.name}; "
              f"{ds.num_supervised_tokens()} supervised tokens; {n_unk} unknown-word tokens", flush=True)
        self.data_summary = ds.summary()
        return ds

    def sample_lengths(self) -> list[int]:
        """Tokens per record (image tokens included), what a padded batch's length follows."""
        return [len(e.input_ids) for e in self.get_train_dataset().encoded]

    def collate_fn(self, samples: list[Any]) -> dict[str, Any]:
        from data.llava import LlavaCollator

        return LlavaCollator(self.model.tokenizer.pad_token_id)(samples)

    def skipped_samples(self) -> int:
        """Records skipped before step 1 plus distinct records the collator dropped during training (all ranks, and
        the runs before a resume)."""
        return self._train_data().skipped_total()

    def _train_data(self) -> Any:
        """The training dataset, with the drops a resumed run's checkpoint carried merged into its counts."""
        ds = self.get_train_dataset()
        if self._restored_drops:
            ds.note_dropped(self._restored_drops)
            self._restored_drops = []
        return ds

    # ---- training --------------------------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        # Batches are built in DataLoader workers, whose copies of the dataset are thrown away; the drops they
        # report in the batch are counted here, in the main process.
        self._train_data().note_dropped(batch.get("skipped", ()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_DROPS_KEY] = [tuple(d) for d in _drops(self._train_data())]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from data.llava import SkippedSample

        self._restored_drops = [SkippedSample(*d) for d in checkpoint.get(_DROPS_KEY, [])]

    def on_train_start(self) -> None:
        self._t_start = time.perf_counter()
        # The trainable globs are applied by now: a frozen tower's features are computed once per image.
        frozen_tower = not any(p.requires_grad for p in self.model.vision_tower.parameters())
        if self.model_cfg.cache_tower_features and frozen_tower and self.model.tower_cache is None:
            self.model.cache_tower_features()

    def on_train_end(self) -> None:
        import torch.distributed as dist

        if self._t_start is not None:
            self._t_train += time.perf_counter() - self._t_start
            self._t_start = None
        cache = self.model.tower_cache
        if cache is not None:
            print(f"stage {self.stage.name}: tower features of {len(cache)} images computed once, reused "
                  f"{cache.hits} times", flush=True)
            self.model.cache_tower_features(False)  # evaluation and export see the plain model
        ds = self._train_data()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and dist.is_available() and dist.is_initialized():
            # Each rank saw its own micro-batches; gather every rank's drops so each reports the same total.
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, _drops(ds))
            for drops in gathered:
                ds.note_dropped(drops)
        self.data_summary = ds.summary()
        if ds.stats.dropped:
            print(f"stage {self.stage.name}: data {self.data_summary}", flush=True)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        loss, _, aux = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
        )
        self._tokens += int(batch["attention_mask"].sum())
        return loss, dict(aux)

    # ---- evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self, out_dir: Path) -> dict[str, float]:
        counts = self.model.num_parameters()
        metrics: dict[str, float] = {
            "params_total_M": counts["total"] / 1e6,
            "params_active_M": counts["active"] / 1e6,
        }
        if self._t_train > 0:
            metrics["train_tokens_per_s"] = self._tokens / self._t_train
        if not self.eval_cfg.tasks:
            return metrics
        import eval as zoo_eval

        t0 = time.perf_counter()
        res = zoo_eval.run(
            self.model,
            tasks=list(self.eval_cfg.tasks),
            limit=self.eval_cfg.limit,
            batch_size=self.eval_cfg.batch_size,
            output_dir=Path(out_dir) / "eval",
            model_name=f"{self.architecture} ({self.stage.name})",
            model_args={"stage": self.stage.name},
            progress=False,
        )
        metrics["eval_s"] = time.perf_counter() - t0
        metrics.update(summarise_eval(res))
        return metrics


_DROPS_KEY = "moe_llava_dropped_samples"


def _drops(ds: Any) -> list[Any]:
    """The dataset's drops during training as ``SkippedSample`` items (picklable, for checkpoints and gathering)."""
    from data.llava import SkippedSample

    return [SkippedSample(record, reason, "") for record, reason in ds.stats.dropped.items()]


def _local_dir(path: str | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what} is not set")
    p = Path(os.path.expandvars(path))
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: {p} is not a directory (mmzoo never downloads; put the files there first)")
    return p


def summarise_eval(results: dict[str, Any]) -> dict[str, float]:
    """Flatten ``eval.run`` results to ``<task>/<primary metric>`` plus group means (e.g. ``shapes_pope/f1``)."""
    out: dict[str, float] = {}
    groups: dict[str, list[float]] = {}
    for task, entry in results.get("results", {}).items():
        primary = results.get("primary_metric", {}).get(task)
        value = entry.get(f"{primary},none") if primary else None
        if isinstance(value, (int, float)):
            out[f"{task}/{primary}"] = float(value)
            group = results.get("configs", {}).get(task, {}).get("group")
            if group and group != task:
                groups.setdefault(f"{group}/{primary}", []).append(float(value))
    for key, values in groups.items():
        if len(values) > 1:  # a group of one task repeats that task's number
            out[key] = sum(values) / len(values)
    eff = [e for e in results.get("efficiency", {}).values() if isinstance(e, dict)]
    tokens = sum(e.get("generated_tokens", 0) for e in eff)
    wall = sum(e.get("wall_seconds", 0.0) for e in eff)
    if tokens and wall:
        out["gen_tokens_per_s"] = tokens / wall
    return out
