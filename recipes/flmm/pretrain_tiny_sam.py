"""Pretrain the tiny SAM (``zoo.models.flmm.TINY_SAM``) on the synthetic world's objects: promptable segmentation,
no language, no LMM. F-LMM assumes a pretrained SAM (the paper freezes SAM ViT-L's image encoder); none exists for
the synthetic world, so this script makes one, the way SAM itself is made: an object's box (jittered by a few
pixels) and, most of the time, a blurry mask prompt (the object's mask pooled to the 8 x 8 token grid, shifted a few
pixels: what F-LMM's coarse head hands SAM) -> that object's mask, BCE + Dice.

It writes a transformers ``SamModel`` directory (``save_pretrained``), the layout ``FLMM.load_sam_weights`` and the
stage's ``model.sam_weights`` read. The tiny recipe's ``recipes/flmm/tiny_sam_shapes`` was made with::

    python recipes/flmm/pretrain_tiny_sam.py --out recipes/flmm/tiny_sam_shapes --steps 400

Scenes come from the world's ``train`` split only (the ShapesRefSeg test scenes are never seen).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.shapes import ShapesWorld, WorldConfig
from zoo.models.flmm import TINY_SAM, _sam_pixels, build_sam, grounding_loss


def _prompts(masks: Sequence[np.ndarray], rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, 1, 4]`` jittered xyxy boxes, ``[B, 1, size, size]`` mask-prompt logits) for the target masks."""
    boxes, dense = [], []
    for m in masks:
        ys, xs = np.nonzero(m)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) + rng.integers(-3, 4, size=4)
        boxes.append(np.clip(box, 0, m.shape[1]))
        t = torch.from_numpy(m.astype(np.float32))[None, None]
        pooled = F.interpolate(F.adaptive_avg_pool2d(t, 8), size=(size, size), mode="bilinear", align_corners=False)
        shift = (int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
        # 30 % of the time an uninformative prompt (all-zero logits), so SAM also works from the box alone
        dense.append(torch.roll(pooled * 8 - 4, shifts=shift, dims=(2, 3)) * float(rng.random() < 0.7))
    return torch.tensor(np.stack(boxes), dtype=torch.float32)[:, None], torch.cat(dense)


def pretrain(out: str | Path, steps: int = 1000, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
             world: WorldConfig | None = None, log_every: int = 100) -> dict[str, float]:  # fmt: skip
    """Train ``TINY_SAM`` from scratch and save it to ``out``; returns the last logged means and the CPU seconds."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    shapes = ShapesWorld(world or WorldConfig(image_size=64, seed=0))
    sam = build_sam(TINY_SAM)
    sam.train()
    size = sam.config.vision_config.image_size
    low = sam.config.prompt_encoder_config.image_size // sam.config.prompt_encoder_config.patch_size * 4
    opt = torch.optim.AdamW(sam.parameters(), lr=lr, weight_decay=0.01)
    warmup = min(30, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    )
    cpu0 = time.process_time()
    scene, logged, window = 0, {}, []
    for step in range(steps):
        images, masks = [], []
        for _ in range(batch_size):
            s = shapes.scene(scene, "train")
            scene += 1
            obj = s.objects[int(rng.integers(len(s.objects)))]
            images.append(s.image)
            masks.append(obj.mask)
        pixels = torch.stack([_sam_pixels(im, size) for im in images])
        target = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
        boxes, dense_in = _prompts(masks, rng, low)
        sparse, dense = sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=boxes, input_masks=dense_in)
        logits = sam.mask_decoder(
            image_embeddings=sam.vision_encoder(pixels)[0],
            image_positional_embeddings=sam.get_image_wide_positional_embeddings().repeat(batch_size, 1, 1, 1),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )[0][:, 0, :1]
        bce, dice = grounding_loss(logits, target)
        opt.zero_grad()
        (bce + dice).backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        sched.step()
        pred, gt = logits.detach() > 0, target > 0.5
        iou = ((pred & gt).sum((1, 2, 3)) / (pred | gt).sum((1, 2, 3)).clamp_min(1)).mean()
        window.append((float(bce), float(dice), float(iou)))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            b, d, i = np.mean(window, 0)
            logged = {"bce": float(b), "dice": float(d), "iou": float(i)}
            print(f"step {step + 1}: bce {b:.3f} dice {d:.3f} IoU {100 * i:.1f} cpu {time.process_time() - cpu0:.0f} s",
                  flush=True)  # fmt: skip
            window = []
    sam.save_pretrained(str(out))
    return {**logged, "cpu_s": time.process_time() - cpu0, "scenes": float(scene)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the SamModel (config.json + model.safetensors)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = pretrain(a.out, a.steps, a.batch_size, a.lr, a.seed)
    print(f"saved {a.out}: {res}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
