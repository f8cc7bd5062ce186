"""``clip_contrastive``: train a CLIP on synthetic-world captions; evaluate zero-shot colour x shape accuracy.

Training pairs are ``(scene.image, text)`` from :class:`data.shapes.ShapesWorld`: the text is the scene caption ("a
large red circle.") or, with probability ``data.prompt_prob`` (default 0), a class-name prompt; images transformed with the model's own preprocessing config, captions tokenized by the model's
open_clip tokenizer, and the loss is open_clip's ``ClipLoss`` (gathering features across ranks under DDP).

``data.patch_loss`` adds a dense auxiliary objective for towers that feed a LLaVA-style model: a linear head (not
exported) reads the penultimate block's patch tokens, the features LLaVA takes, and classifies each patch covered by
an object as that object's (shape, size) (from the world's masks; background patches do not count). Without it the tiny
tower composes shapes only in its last block, so its penultimate patch tokens say an object's colour and position
but not its shape (linear probe: 37%), which is what a web-scale CLIP-L would provide and the tiny world cannot.

``data.hard_negatives`` (NegCLIP-style, Yuksekgonul et al., 2023) adds, per image, captions in which one object's
shape is swapped for another ("a large red circle" -> "a large red star"). They join the image-to-text softmax only,
so the image embedding must say which shape each object has: in multi-object scenes, captions that already differ in
colour, size or count let plain CLIP ignore shape (measured: zero-shot shape accuracy 39% after training on 1-3
object scenes without them).

Evaluation is open_clip-style zero-shot classification on a held-out split: text classifiers per class ("red
circle", ...) from prompt templates (``build_zero_shot_classifier``), either one averaged embedding per class
(``mean_embedding``, open_clip's ensemble) or one per template with the best score kept (``max_score``); top-1 over
all colour x shape classes, plus colour and shape accuracy read off the predicted class.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from data.seeding import mix_seed
from data.shapes_clip import WorldCaptions
from zoo.stages import register_stage
from zoo.stages.base import StageModule
from zoo.stages.configs.clip import ClipDataConfig, ClipEvalConfig, ClipModelConfig

__all__ = ["ClipModelConfig", "ClipDataConfig", "ClipEvalConfig", "ClipContrastiveStage", "make_world", "zero_shot_report"]

def make_world(cfg: ClipDataConfig) -> Any:
    from data.shapes import ShapesWorld, WorldConfig

    return ShapesWorld(
        WorldConfig(
            image_size=cfg.image_size,
            seed=cfg.world_seed,
            min_objects=cfg.min_objects,
            max_objects=cfg.max_objects,
            background=cfg.background,
            clutter=cfg.clutter,
            skew=cfg.skew,
        )
    )


@register_stage("clip_contrastive")
class ClipContrastiveStage(StageModule):
    ModelConfig = ClipModelConfig
    DataConfig = ClipDataConfig
    EvalConfig = ClipEvalConfig

    def __init__(self, model_cfg: ClipModelConfig, data_cfg: ClipDataConfig, eval_cfg: ClipEvalConfig, stage: Any):
        super().__init__(model_cfg, data_cfg, eval_cfg, stage)
        from zoo.models.clip import get_tokenizer, image_transform
        from zoo.registry import create_model

        self.architecture = model_cfg.architecture
        self.model_args = {"context_length": model_cfg.context_length} if model_cfg.context_length else {}
        self.model = create_model(self.architecture, **self.model_args)
        self.tokenizer = get_tokenizer(self.architecture, model_cfg.context_length)
        self.transform = image_transform(self.model, is_train=False)
        self.world = make_world(data_cfg)
        self.loss_fn: Any = None
        self._penultimate: Tensor | None = None
        if data_cfg.patch_loss:
            visual = self.model.visual
            n_classes = 1 + len(self.world.config.shapes) * len(self.world.config.sizes)
            self.patch_head = torch.nn.Linear(visual.transformer.width, n_classes)
            # The penultimate block's output is what LLaVA-style towers hand on (select_layer=-2).
            visual.transformer.resblocks[-2].register_forward_hook(self._keep_penultimate)

    def _keep_penultimate(self, module: Any, args: Any, output: Tensor) -> None:
        self._penultimate = output

    def train_dataset(self) -> Dataset:
        grid = self.model.visual.grid_size[0] if self.data_cfg.patch_loss else None
        return WorldCaptions(self.world, "train", self.data_cfg.num_train, self.transform,
                             hard_negatives=self.data_cfg.hard_negatives, seed=self.stage.seed, patch_grid=grid)

    def collate_fn(self, samples: list[tuple[Any, ...]]) -> dict[str, Tensor]:
        images, captions, labels, indices, negatives, patches = zip(*samples)
        cfg, names = self.data_cfg, self.world.class_names
        texts = []
        for caption, label, index in zip(captions, labels, indices):
            # Seeded by the sample index, not by global RNG: Lightning collates batches ahead of the step hooks,
            # so only per-sample seeding keeps a resumed run's batches identical to an uninterrupted run's.
            rng = random.Random(mix_seed(self.stage.seed, index))
            if rng.random() < cfg.prompt_prob:
                caption = rng.choice(cfg.prompt_templates).format(names[label])
            texts.append(caption)
        batch = {"images": torch.stack(images), "texts": self.tokenizer(texts), "labels": torch.tensor(labels)}
        if cfg.patch_loss:
            batch["patch_labels"] = torch.stack(patches)
        if cfg.hard_negatives:
            batch["negative_texts"] = self.tokenizer([t for negs in negatives for t in negs])
        return batch

    def setup(self, stage: str) -> None:
        import open_clip

        # Under DDP every rank's features join one contrastive matrix (gathered with gradients), so N ranks with
        # batch B/N optimise the same loss as one rank with batch B.
        world = self.trainer.world_size
        if self.data_cfg.hard_negatives and world > 1:
            raise ValueError(
                "data.hard_negatives is implemented for one process (the negatives are not gathered across ranks); "
                "set data.hard_negatives=0 or trainer.devices=1"
            )
        self.loss_fn = open_clip.ClipLoss(
            local_loss=False, gather_with_grad=world > 1, cache_labels=True, rank=self.trainer.global_rank,
            world_size=world,
        )

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.model(image=batch["images"], text=batch["texts"])
        img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        logs: dict[str, Tensor] = {"logit_scale": scale.detach()}
        if "negative_texts" not in batch:
            loss = self.loss_fn(img, txt, scale)
        else:
            neg = self.model.encode_text(batch["negative_texts"], normalize=True)
            target = torch.arange(img.shape[0], device=img.device)
            # Image -> text over the batch's captions plus every hard negative; text -> image as in CLIP.
            per_image = scale * img @ torch.cat([txt, neg]).T
            loss = (F.cross_entropy(per_image, target) + F.cross_entropy(scale * txt @ img.T, target)) / 2
        if "patch_labels" in batch:
            tokens = self._penultimate[:, -batch["patch_labels"].shape[1]:]  # drop the class token
            # Object patches only: four in five patches are background, which is easy and would drown the shapes.
            dense = F.cross_entropy(
                self.patch_head(tokens).flatten(0, 1), batch["patch_labels"].flatten(), ignore_index=0
            )
            logs["contrastive_loss"], logs["patch_loss"] = loss.detach(), dense.detach()
            loss = loss + self.data_cfg.patch_loss * dense
        return loss, logs

    @torch.no_grad()
    def evaluate(self, out_dir: Path) -> dict[str, float]:
        world = self.world
        if self.eval_cfg.max_objects is not None:
            # The label is the main object's class; in a multi-object training world a single-object test world
            # keeps zero-shot classification unambiguous.
            world = make_world(dataclasses.replace(self.data_cfg, min_objects=1, max_objects=self.eval_cfg.max_objects))
        report = zero_shot_report(self.model.eval(), self.tokenizer, self.transform, world, self.eval_cfg)
        (Path(out_dir) / "zeroshot.json").write_text(json.dumps(report, indent=1))
        return report["metrics"]


@torch.no_grad()
def zero_shot_report(model: Any, tokenizer: Any, transform: Any, world: Any, eval_cfg: ClipEvalConfig) -> dict[str, Any]:
    """open_clip zero-shot classification of ``eval_cfg.num_samples`` scenes of ``world``'s ``eval_cfg.split``:
    ``metrics`` (top-1 over colour x shape classes, colour and shape read off the predicted class, in percent) and
    the confusion matrix. Shared by the stage's evaluation and the shipped tower's re-check."""
    import open_clip

    device = next(model.parameters()).device
    names = world.class_names
    templates = eval_cfg.templates
    groups = [templates] if eval_cfg.aggregate == "mean_embedding" else [[t] for t in templates]
    classifiers = [
        open_clip.build_zero_shot_classifier(model, tokenizer, names, g, num_classes_per_batch=None, device=device)
        for g in groups
    ]
    data = WorldCaptions(world, eval_cfg.split, eval_cfg.num_samples, transform)
    preds, labels = [], []
    for start in range(0, len(data), eval_cfg.batch_size):
        items = [data[i] for i in range(start, min(len(data), start + eval_cfg.batch_size))]
        images = torch.stack([item[0] for item in items]).to(device=device, dtype=next(model.parameters()).dtype)
        feats = model.encode_image(images, normalize=True)
        scores = torch.stack([feats @ c.to(feats.dtype) for c in classifiers]).amax(dim=0)
        preds.append(scores.argmax(dim=-1).cpu())
        labels.append(torch.tensor([item[2] for item in items]))
    pred, label = torch.cat(preds), torch.cat(labels)
    pairs = world.pairs
    color_ok = [pairs[p][0] == pairs[t][0] for p, t in zip(pred.tolist(), label.tolist())]
    shape_ok = [pairs[p][1] == pairs[t][1] for p, t in zip(pred.tolist(), label.tolist())]
    # Percent, as every accuracy a user reads in mmzoo (eval reports, recipe summaries, README tables).
    metrics = {
        "zeroshot_acc": 100 * float((pred == label).float().mean()),
        "color_acc": 100 * sum(color_ok) / len(color_ok),
        "shape_acc": 100 * sum(shape_ok) / len(shape_ok),
    }
    confusion = torch.zeros(len(names), len(names), dtype=torch.long)
    confusion.index_put_((label, pred), torch.ones_like(label), accumulate=True)
    return {"split": eval_cfg.split, "num_samples": len(data), "class_names": names, "templates": templates,
            "aggregate": eval_cfg.aggregate, "metrics": metrics, "confusion": confusion.tolist()}
