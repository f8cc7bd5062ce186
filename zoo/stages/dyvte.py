"""DyVTE's router training as a stage type (``type: dyvte_routers``), after any LLaVA-like zoo model.

The base model (``model.base``: a weights name or directory; default: the stage's ``init_from``) is loaded whole and
frozen; ``self.model`` is the ``ExitRouters`` (one per decoder layer), the only thing that trains. Each step follows
the official label rule (``zoo/methods/dyvte.py``; facts in the project's DyVTE notes):

1. draw one layer ``k`` for the batch, uniformly over ``0 .. L-2`` (an exit after the last layer removes nothing,
   so its router is never consulted at inference and is not trained);
2. run the frozen LM on the batch stacked twice; after layer ``k`` read the router input of the first copy (mean of
   the text between the image and the last prompt token, and the last prompt token) and drop the media tokens of the
   second copy (``drop_tokens``: exactly what inference does; the official code masks them as keys instead, which is
   the same for every text token);
3. per sample, label 1 ("exit is safe") iff the dropped copy's argmax predictions over the answer tokens agree with
   the full copy's on more than ``agree_above`` of them AND its answer loss stays below ``loss_ratio_below`` x the
   full copy's (strict, as the official code);
4. 2-class cross-entropy of router ``k`` on those labels.

The prompt is everything before the first supervised token; use single-turn conversations
(``data.turns_per_conversation: 1``), as the official data does. Samples without answer tokens or without text
between the image and the last prompt token are skipped and counted. ``evaluate`` reports the per-layer share of
"exit" labels seen in training (the evidence of how much room a model leaves) and evaluates ``--method
dyvte`` at each ``eval.thresholds``. ``export`` writes the base model and the routers beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.stages import register_stage
from zoo.stages.base import StageModule
from zoo.stages.configs.dyvte import DyVTEEvalConfig, DyVTEModelConfig
from zoo.stages.configs.moe_llava import MoELLaVADataConfig
from zoo.stages.moe_llava import MoELLaVAStage, summarise_eval

__all__ = ["DyVTEModelConfig", "DyVTEEvalConfig", "DyVTERouterStage", "exit_labels"]

IGNORE_INDEX = -100


def exit_labels(
    logits: Tensor, labels: Tensor, batch: int, agree_above: float, loss_ratio_below: float
) -> tuple[Tensor, Tensor, Tensor]:
    """DyVTE labels from the logits of ``[full copy ; exit copy]`` (``[2B, T, V]``) and their aligned ``labels``.

    Returns ``(label [B] long, agreement [B], loss ratio [B])``. Each copy holds the same answer tokens in the same
    order (at different columns once tokens were dropped), so they are compared answer token by answer token.
    """
    targets = labels[:, 1:]
    answer = targets != IGNORE_INDEX
    token_loss = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none"
    ).masked_fill(~answer, 0.0)
    preds = logits[:, :-1].argmax(-1)
    agree, ratio = torch.zeros(batch), torch.zeros(batch)
    for b in range(batch):
        full, cut = answer[b], answer[batch + b]
        agree[b] = (preds[b][full] == preds[batch + b][cut]).float().mean()
        loss_full = token_loss[b].sum() / full.sum()
        loss_cut = token_loss[batch + b].sum() / cut.sum()
        ratio[b] = loss_cut / loss_full.clamp(min=1e-12)
    label = (agree > agree_above) & (ratio < loss_ratio_below)
    return label.long(), agree, ratio


@register_stage("dyvte_routers")
class DyVTERouterStage(StageModule):
    ModelConfig = DyVTEModelConfig
    DataConfig = MoELLaVADataConfig
    EvalConfig = DyVTEEvalConfig

    def __init__(self, model_cfg: DyVTEModelConfig, data_cfg: MoELLaVADataConfig, eval_cfg: DyVTEEvalConfig,
                 stage: Any) -> None:
        super().__init__(model_cfg, data_cfg, eval_cfg, stage)
        import json

        from zoo.methods.dyvte import ExitRouterConfig, ExitRouters
        from zoo.registry import load

        # The base is loaded here, not in init_from: its LM's depth and width size the routers, which must exist
        # before a resumed run's checkpoint is restored (init_from is not called then).
        self.base_source = self._base_source()
        self.base = load(self.base_source).eval()
        self.base.requires_grad_(False)
        config = json.loads((self.base_source / "config.json").read_text())
        self.architecture, self.model_args = config["architecture"], config["model_args"]
        llm = self.base.llm
        self.model = ExitRouters(
            ExitRouterConfig(hidden_size=llm.hidden_size, num_layers=len(llm.layers),
                             router_hidden=model_cfg.router_hidden)
        )  # fmt: skip
        layers = len(llm.layers)
        # per drawn layer: samples labelled, of them "exit"; skipped samples (no answer / no text after the image)
        self.register_buffer("label_total", torch.zeros(layers, dtype=torch.long))
        self.register_buffer("label_exit", torch.zeros(layers, dtype=torch.long))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))
        self._t_train = 0.0
        self._t_start: float | None = None

    def _base_source(self) -> Path:
        from zoo.registry import resolve_weights

        name = self.model_cfg.base
        if name is None:
            source = getattr(self.stage, "init_source", None)
            if source is None:
                raise ValueError(f"stage {self.stage.name}: set model.base or init_from (the LLaVA-like base model)")
            kind, value = source
            if kind == "stage":  # an earlier stage of the same recipe: its export sits beside this stage's folder
                return self.stage.run_dir().parent / value / "final"
            name = value
        path = Path(name)
        return path if path.is_dir() else resolve_weights(name)

    def init_from(self, source: Path) -> None:
        """Nothing to load: the base came in ``__init__`` (the same source unless ``model.base`` names another)."""

    # ---- data: the MoE-LLaVA readers (shapes world, LLaVA JSON, webdataset) with the base's tokenizer ---------------

    def train_dataset(self):
        from data.llava import LlavaDataset, build_image_transform

        records, folder = MoELLaVAStage._records(self)  # reads only data_cfg and stage
        dc = self.base.data_cfg
        ds = LlavaDataset(
            records,
            tokenizer=self.base.tokenizer,
            template=self.base.template,
            num_image_tokens=self.base.num_image_tokens,
            image_transform=build_image_transform(dc["image_size"], dc["mean"], dc["std"], dc["pad_to_square"]),
            image_folder=folder,
            max_length=self.data_cfg.max_length,
            truncate=self.data_cfg.truncate,
            on_error=self.data_cfg.on_error,
            image_token_id=self.base.image_token_id,
        )
        print(f"stage {self.stage.name}: data {ds.summary()}", flush=True)
        return ds

    def collate_fn(self, samples: list[Any]) -> dict[str, Any]:
        from data.llava import LlavaCollator

        return LlavaCollator(self.base.tokenizer.pad_token_id)(samples)

    # ---- training ----------------------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._t_start = time.perf_counter()

    def on_train_end(self) -> None:
        if self._t_start is not None:
            self._t_train += time.perf_counter() - self._t_start
            self._t_start = None

    def exit_targets(self, batch: dict[str, Any], k: int) -> dict[str, Tensor]:
        """For exit after layer ``k``: router inputs, labels, answer agreement and loss ratio, and which rows count."""
        from zoo.methods.dyvte import compact_like_drop, router_features

        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        bsz, seq = ids.shape
        llm = self.base.llm
        supervised = labels != IGNORE_INDEX
        cols = torch.arange(seq, device=ids.device).expand(bsz, -1)
        first_answer = torch.where(supervised, cols, torch.full_like(cols, seq)).amin(1)
        last_prompt = (first_answer - 1).clamp(min=0)
        media = self.base.media_mask(ids) & mask.bool()
        seen: dict[str, Tensor] = {}

        def hook(i: int, state: Any) -> Any:
            if i != k:
                return None
            seen["features"], seen["valid"] = router_features(
                state.hidden[:bsz], media, state.padding_mask[:bsz], last_prompt
            )
            keep = torch.cat([state.padding_mask[:bsz].bool(), state.padding_mask[bsz:].bool() & ~media])
            return llm.drop_tokens(state, keep)

        with torch.no_grad():
            embeds = self.base.embed_multimodal(ids, batch["pixel_values"])
            twice = torch.cat([mask, mask])
            out = llm(inputs_embeds=torch.cat([embeds, embeds]), attention_mask=twice, hooks=[hook])
            keep = torch.cat([mask.bool(), mask.bool() & ~media])
            aligned = compact_like_drop(torch.cat([labels, labels]), keep, twice, IGNORE_INDEX)
            target, agree, ratio = exit_labels(
                out.logits, aligned, bsz, self.model_cfg.agree_above, self.model_cfg.loss_ratio_below
            )
        usable = (seen["valid"] & (first_answer < seq)).cpu()
        return {"features": seen["features"], "target": target, "agree": agree, "ratio": ratio, "usable": usable}

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        self.base.eval()  # Lightning's train() reaches the frozen base too; it must run as at inference
        k = int(torch.randint(0, len(self.base.llm.layers) - 1, ()))
        got = self.exit_targets(batch, k)
        usable = got["usable"]
        self.skipped += int((~usable).sum())
        if not bool(usable.any()):
            # nothing to learn from in this batch; a zero loss that still reaches the routers' graph
            return sum(p.sum() for p in self.model.parameters()) * 0.0, {"exit_layer_drawn": float(k)}
        target = got["target"][usable].to(got["features"].device)
        self.label_total[k] += int(target.numel())
        self.label_exit[k] += int(target.sum())
        logits = self.model(k, got["features"][usable.to(got["features"].device)])
        loss = F.cross_entropy(logits.float(), target)
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, {
            "exit_layer_drawn": float(k),
            "exit_label_share": float(target.float().mean()),
            "router_acc": 100 * acc.detach(),  # percent, as every accuracy mmzoo reports
            "answer_agreement": float(got["agree"][usable].mean()),
            "answer_loss_ratio": float(got["ratio"][usable].mean()),
        }

    # ---- evaluation and export ------------------------------------------------------------------------------------

    def label_statistics(self) -> dict[str, float]:
        """Per layer: share of training samples labelled "exit" and how many were drawn (``labels/...``)."""
        out: dict[str, float] = {"labels/skipped": float(self.skipped)}
        for layer, (total, exits) in enumerate(zip(self.label_total.tolist(), self.label_exit.tolist())):
            if total:
                out[f"labels/layer{layer}_exit_share"] = exits / total
                out[f"labels/layer{layer}_samples"] = float(total)
        return out

    def evaluate(self, out_dir: Path) -> dict[str, float]:
        from zoo.methods.dyvte import save_routers

        metrics = self.label_statistics()
        if self._t_train > 0:
            metrics["train_s"] = self._t_train
        if not self.eval_cfg.tasks:
            return metrics
        import eval as zoo_eval

        routers_dir = save_routers(self.model, Path(out_dir) / "routers", base=str(self.base_source))
        for threshold in self.eval_cfg.thresholds:
            res = zoo_eval.run(
                self.base,
                tasks=list(self.eval_cfg.tasks),
                limit=self.eval_cfg.limit,
                batch_size=self.eval_cfg.batch_size,
                output_dir=Path(out_dir) / f"eval_t{threshold}",
                model_name=f"{self.architecture} ({self.stage.name})",
                model_args={"stage": self.stage.name},
                method=f"dyvte:routers={routers_dir},threshold={threshold}",
                progress=False,
            )
            for key, value in summarise_eval(res).items():
                metrics[f"t{threshold}/{key}"] = value
            for task, eff in res.get("efficiency", {}).items():
                for key, value in (eff.get("method_metrics") or {}).items():
                    metrics[f"t{threshold}/{task}/{key.removeprefix('dyvte/')}"] = value
        return metrics

    def export(self, out_dir: Path) -> Path:
        """The base model (``zoo.load``-able) with the routers beside it (``--method dyvte:routers=<out_dir>``)."""
        from zoo.methods.dyvte import save_routers
        from zoo.registry import save_pretrained

        extra = {"stage_type": self.stage_type, "stage": self.stage.name}
        out = save_pretrained(self.base, out_dir, self.architecture, self.model_args, **extra)
        save_routers(self.model, out, base=str(self.base_source), **self.label_statistics())
        return out
