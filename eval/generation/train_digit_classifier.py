"""Train the digit classifier behind FID-digits and write it to ``zoo/weights/digit_cnn.digits/``.

    .venv/bin/python -m eval.generation.train_digit_classifier [--out DIR] [--epochs N] [--seed S]

Data: scikit-learn's bundled digits (1797 real 8x8 scans, UCI optdigits), through the same loader and
normalisation as the DiT digits recipes (:func:`eval.generation.digits_data.load_real_digits`). A stratified 20%
held-out split (fixed seed) is never trained on; its accuracy is written into ``config.json`` and re-checked by
``tests/generation/test_digit_classifier.py``. Deterministic on CPU (seeded, single thread); well under a minute.
Re-shipping the weights means recording the new file's sha256 in ``zoo/weights_table.py`` (``zoo.load`` checks it).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.generation.digit_classifier import SHIPPED_DIR
from eval.generation.digits_data import HELDOUT_FRACTION, SPLIT_SEED, heldout_split, load_real_digits
from zoo.models.digit_cnn import DigitCNN, DigitCNNConfig
from zoo.registry import save_pretrained


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine jitter (rotation +-10 deg, scale 0.9-1.1, shift +-1/8 of the side).

    Generated digits are never pixel-aligned copies of the scans, so the judge must not depend on exact placement.
    """
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.25  # affine_grid coordinates span 2 per side
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # background is -1 (white paper = 0 ink); pad with it rather than zeros (which would be mid-grey)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


@torch.no_grad()
def accuracy(model: DigitCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` classified as ``y``, in percent (the unit of every accuracy mmzoo reports)."""
    model.eval()
    return 100 * int((model(x).argmax(1) == y).sum()) / len(y)


def train(
    image_size: int, epochs: int = 60, batch_size: int = 64, lr: float = 3e-3, seed: int = 0
) -> tuple[DigitCNN, dict[str, float]]:
    torch.manual_seed(seed)
    images, labels = load_real_digits(image_size)
    train_idx, test_idx = heldout_split(labels)
    x_tr, y_tr, x_te, y_te = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
    model = DigitCNN(DigitCNNConfig(image_size=image_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_tr) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            xb = augment(x_tr[idx], gen)
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(
                f"epoch {epoch + 1:3d}  loss {total / len(x_tr):.4f}  held-out acc {accuracy(model, x_te, y_te):.2f}%"
            )
    metrics = {
        "heldout_acc": accuracy(model, x_te, y_te),
        "train_acc": accuracy(model, x_tr, y_tr),
        "n_train": float(len(x_tr)),
        "n_heldout": float(len(x_te)),
    }
    return model, metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=SHIPPED_DIR)
    ap.add_argument("--image-size", type=int, default=None, help="default: the DiT digits resolution")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # bit-reproducible and polite on a shared CPU
    from eval.generation.digits_data import DEFAULT_IMAGE_SIZE

    image_size = args.image_size or DEFAULT_IMAGE_SIZE
    t0 = time.perf_counter()
    model, metrics = train(image_size, epochs=args.epochs, seed=args.seed)
    model.eval()
    save_pretrained(
        model,
        args.out,
        "digit_cnn",
        asdict(model.cfg),
        metrics=metrics,
        data={
            "source": "sklearn.datasets.load_digits",
            "loader": "eval.generation.digits_data.load_real_digits",
            "image_size": image_size,
            "heldout_fraction": HELDOUT_FRACTION,
            "split_seed": SPLIT_SEED,
        },
        train={
            "epochs": args.epochs,
            "seed": args.seed,
            "script": "eval/generation/train_digit_classifier.py",
        },
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out}  params {n_params}  held-out acc {metrics['heldout_acc']:.2f}% "
        f"({int(metrics['n_heldout'])} images)  {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
