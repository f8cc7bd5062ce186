"""``zoo ground``: segment what a referring expression names, with an F-LMM grounding model.

    zoo ground --model runs/flmm_moe_llava_tiny_shapes/flmm/final --scene test:22 "the blue square"
    zoo ground --model DIR --image photo.jpg --out mask.png "the dog on the left"
    zoo ground --model DIR --scene test:3 --mask-out mask.png "the circle to the left of the red star"

The model is an F-LMM checkpoint directory (``zoo train recipes/flmm/moe_llava_tiny_shapes.yaml`` writes one to
``runs/<recipe>/flmm/final``). The overlay PNG shows the image with the predicted mask in translucent red (and, for a
synthetic scene whose expression names one object, the true mask's outline in green); ``--mask-out`` also writes the
binary mask (white = object). The mask is the refined one (sigmoid > 0.5) unless ``--coarse``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo ground",
        description="Segment the object a referring expression names (F-LMM on a frozen multimodal model) and "
        "write the mask overlay as a PNG.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("expression", nargs="+", help="the referring expression, e.g. the blue square")
    p.add_argument("--model", required=True, help="an F-LMM checkpoint directory (or a registered weights name)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="image file (PNG, JPEG, ...)")
    src.add_argument("--scene", metavar="SPLIT:INDEX", help="a synthetic shapes-world scene, e.g. test:3")
    p.add_argument("--image-size", type=int, default=64, help="synthetic scene size in px (with --scene)")
    p.add_argument("--out", type=Path, default=Path("ground.png"), help="overlay PNG to write (default ground.png)")
    p.add_argument("--mask-out", type=Path, help="also write the binary mask as a PNG")
    p.add_argument("--scale", type=int, default=0, help="enlarge the overlay (default: 4 for images under 256 px)")
    p.add_argument("--coarse", action="store_true", help="the mask head's coarse mask instead of the refined one")
    return p


def _image_and_truth(args: argparse.Namespace, text: str) -> tuple[Any, Any]:
    from PIL import Image, UnidentifiedImageError

    if args.image is not None:
        if not args.image.is_file():
            raise SystemExit(f"zoo ground: --image {args.image}: no such file")
        try:
            with Image.open(args.image) as img:
                return img.convert("RGB"), None
        except (UnidentifiedImageError, OSError) as e:
            raise SystemExit(f"zoo ground: --image {args.image}: not a readable image ({e})") from None
    from data.refseg import shapes_refseg_samples
    from data.shapes import SPLITS, ShapesWorld, WorldConfig

    split, _, index = args.scene.partition(":")
    if split not in SPLITS or not index.isdigit():
        raise SystemExit(f"zoo ground: --scene {args.scene!r}: expected SPLIT:INDEX with SPLIT in {SPLITS}, e.g. test:3")
    scene = ShapesWorld(WorldConfig(image_size=args.image_size)).scene(int(index), split=split)
    print(f"scene {scene.id}: {scene.caption}", file=sys.stderr)
    truth = {t.lower(): scene.objects[i].mask for t, i, _ in shapes_refseg_samples(scene)}
    return scene.image, truth.get(text.lower())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np
    from PIL import Image

    import zoo
    from eval.refseg import mask_iou, overlay

    text = " ".join(args.expression)
    image, truth = _image_and_truth(args, text)
    try:
        model = zoo.load(args.model)
    except (KeyError, FileNotFoundError) as e:
        print(f"zoo ground: cannot load --model {args.model!r}: {e}", file=sys.stderr)
        return 2
    if not hasattr(model, "ground"):
        print(f"zoo ground: {args.model!r} ({type(model).__name__}) is not a grounding model (no ground())",
              file=sys.stderr)  # fmt: skip
        return 2
    prob = model.ground([image], [text], stage="coarse" if args.coarse else "refined")[0]
    mask = prob > 0.5
    scale = args.scale or (4 if max(image.size) < 256 else 1)
    label = text
    if truth is not None:
        i, u = mask_iou(mask, truth)
        label += f" (IoU {100 * i / u if u else 0.0:.1f}%)"  # percent, as the refseg reports
    args.out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, mask, truth, label, scale=scale).save(args.out)
    print(f"{args.out}: {int(mask.sum())} of {mask.size} pixels selected" + (f"; {label}" if truth is not None else ""))
    if args.mask_out is not None:
        args.mask_out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((mask * 255).astype(np.uint8)).save(args.mask_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
