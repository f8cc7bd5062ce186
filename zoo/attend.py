"""``zoo attend``: see where a model looks: the answer token's attention over the image, per layer, before and after VAR.

    zoo attend --scene test:2 "What color is the circle?"                 # the shipped demo weights
    zoo attend --image photo.png --out looks.png "Is there a dog?"
    zoo attend --scene test:2 --var var:tau=2,rho=0.9 "What shape is red?" # VAR with other settings

The picture (a PNG grid) has one row per decoder layer and four panels per row: the attention of the position that
predicts the first answer token over the image tokens, averaged over all heads, before and after VAR's edit, then the
same over the image-centric heads alone (VAR's selection rule for that query; "none" when no head qualifies). Each
panel is scaled to its own maximum; the share of this query's attention that lands on the image is in its title.
Visual sinks (VAR's sink score above tau at that layer) are outlined in red. "Before" is what the layer computed
before its edit, so a layer after an edited one already sees VAR's effect. The command also prints the answer with
and without VAR, the sink dimensions used and how strongly they stand out (``zoo.methods.sinks``).
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "attention_figure", "save_attention_figure"]

DEFAULT_MODEL = "moe_llava_tiny.shapes"
SHORT_ANSWER = "Answer the question using a single word or phrase."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo attend",
        description="Draw a multimodal model's attention over the image per layer, before and after VAR.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("question", nargs="+", help="the question about the image")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"weights name or checkpoint dir (default {DEFAULT_MODEL})")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="image file (PNG, JPEG, ...)")
    src.add_argument("--scene", metavar="SPLIT:INDEX", help="a synthetic shapes-world scene, e.g. test:2")
    p.add_argument("--image-size", type=int, default=64, help="synthetic scene size in px (with --scene)")
    p.add_argument("--var", default="var", metavar="SPEC",
                   help="the VAR settings, a zoo.methods spec (default: var, the official p=0.6, rho=0.5, tau=20)")
    p.add_argument("--out", type=Path, default=Path("attention.png"), help="the PNG to write (default attention.png)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--no-short-answer", action="store_true",
                   help=f"do not append the short-answer instruction ({SHORT_ANSWER!r}) the demo model was trained on")
    return p  # fmt: skip


def _load_image(args: argparse.Namespace) -> tuple[Any, str]:
    from PIL import Image, UnidentifiedImageError

    if args.image is not None:
        try:
            with Image.open(args.image) as img:
                return img.convert("RGB"), str(args.image)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise SystemExit(f"zoo attend: --image {args.image}: not a readable image ({e})") from None
    from data.shapes import SPLITS, ShapesWorld, WorldConfig  # the application layer may use data

    split, _, index = args.scene.partition(":")
    if split not in SPLITS or not index.isdigit():
        raise SystemExit(f"zoo attend: --scene {args.scene!r}: expected SPLIT:INDEX with SPLIT in {SPLITS}")
    scene = ShapesWorld(WorldConfig(image_size=args.image_size)).scene(int(index), split=split)
    return scene.image, f"scene {scene.id}: {scene.caption}"


def _square(image: Any, pad: bool) -> Any:
    """The image as the model sees it: padded to a square (LLaVA's ``pad``) or stretched."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    if not pad:
        return image.resize((max(w, h),) * 2)
    canvas = Image.new("RGB", (max(w, h),) * 2, (124, 116, 104))
    canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def attention_figure(image: Any, record: dict[int, dict[str, Any]], row: int, title: str, pad: bool = True) -> Any:
    """A matplotlib figure: per layer, the last query's attention over the image tokens (see the module docstring).

    ``record`` is ``VARState.maps`` plus per layer ``"visual"`` (``[T]`` bool image positions of ``row``) and
    ``"sinks"`` (``[T]`` bool, or None where sinks are not detected); ``row`` picks the batch row.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    shown = np.asarray(_square(image, pad).convert("RGB"), dtype=np.float32) / 255.0
    layers = sorted(record)
    fig, axes = plt.subplots(len(layers), 4, figsize=(10, 2.6 * len(layers) + 0.6), squeeze=False)
    columns = ("all heads, before", "all heads, after VAR", "image-centric heads, before", "image-centric, after")
    for r, layer in enumerate(layers):
        rec = record[layer]
        visual = rec["visual"]
        n = int(visual.sum())
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} image tokens do not form a square grid; cannot draw them over the image")
        before, after = rec["before"][row, :, -1], rec["after"][row]
        centric = rec["centric"][row, :, -1]
        sinks = rec["sinks"]
        panels = [before.mean(0), after.mean(0)]
        panels += [before[centric].mean(0), after[centric].mean(0)] if bool(centric.any()) else [None, None]
        for c, attn in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(shown, extent=(0, side, side, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            if attn is None:
                ax.set_title(f"L{layer} {columns[c]}: none", fontsize=7)
                continue
            grid = attn[visual].float().numpy().reshape(side, side)
            ax.imshow(grid / max(float(grid.max()), 1e-12), cmap="inferno", alpha=0.6, extent=(0, side, side, 0),
                      vmin=0, vmax=1, interpolation="nearest")  # fmt: skip
            if sinks is not None:
                for k in np.flatnonzero(sinks[visual].numpy()):
                    ax.add_patch(Rectangle((k % side, k // side), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
            heads = f" ({int(centric.sum())} heads)" if c >= 2 else ""
            ax.set_title(f"L{layer} {columns[c]}{heads}\nimage share {float(attn[visual].sum()):.2f}", fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, 140)), fontsize=8)
    fig.tight_layout()
    return fig


def save_attention_figure(path: Path, image: Any, state: Any, row: int, title: str, pad: bool = True) -> Path:
    """Write ``attention_figure`` for batch row ``row`` of a recorded ``VARState`` to ``path`` (atomically)."""
    import os

    import matplotlib.pyplot as plt

    record = {
        layer: {**maps, "visual": state.visual[row].cpu(),
                "sinks": state.sinks[layer][row].cpu() if layer in state.sinks else None}
        for layer, maps in state.maps.items()
    }  # fmt: skip
    fig = attention_figure(image, record, row, title, pad)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import zoo
    import zoo.weights_table  # noqa: F401  (the demo weights' name)
    from zoo.methods import build_method
    from zoo.methods.sinks import find_sink_dims
    from zoo.methods.var import VAR, probe_prompts

    try:  # before the model loads: a misspelt option costs nothing
        method = build_method(args.var + (":" if ":" not in args.var else ",") + "record=true")
    except (ValueError, TypeError) as e:
        print(f"zoo attend: --var {args.var}: {e}", file=sys.stderr)
        return 2
    if not isinstance(method, VAR):
        print(f"zoo attend: --var must be a var spec, got {args.var!r}", file=sys.stderr)
        return 2
    image, what = _load_image(args)
    try:
        model = zoo.load(args.model).float()
    except (KeyError, FileNotFoundError) as e:
        print(f"zoo attend: cannot load --model {args.model!r}: {e}", file=sys.stderr)
        return 2
    if not hasattr(model, "llm") or not hasattr(model, "generate"):
        print(f"zoo attend: {args.model!r} ({type(model).__name__}) is not a LLaVA-like model", file=sys.stderr)
        return 2
    question = " ".join(args.question)
    prompt = question if args.no_short_answer else f"{question}\n{SHORT_ANSWER}"
    report = find_sink_dims(model.llm, *probe_prompts(model))
    with torch.no_grad():
        plain = model.generate([image], [prompt], max_new_tokens=args.max_new_tokens)[0]
        edited = model.generate([image], [prompt], max_new_tokens=args.max_new_tokens, method=method)[0]
    stats = model.last_generation_stats.extra
    print(what)
    print(f"sink dims used: {list(method.last_state.dims)}; found on this model: {report.describe(method.tau)}")
    print(f"answer: {plain!r}; with {args.var}: {edited!r}")
    print("  " + ", ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in stats.items()))
    state = method.last_state
    real = state.padding[0].cpu()
    visual, first = state.visual[0].cpu(), int(real.long().argmax())
    for layer, phi in sorted(state.phi.items()):
        row = phi[0]
        print(f"  layer {layer} input: sink score phi over image tokens median {float(row[visual].median()):.2f}, "
              f"max {float(row[visual].max()):.2f}; text max {float(row[real & ~visual].max()):.2f}; first token "
              f"{float(row[first]):.2f}; visual sinks (phi > {method.tau:g}): {int(state.sinks[layer][0].cpu()[visual].sum())}"
              f"; phi <= sqrt(hidden size) = {model.llm.hidden_size ** 0.5:.1f} always")
    title = (f"{args.model} | {what} | Q: {question} | A: {plain!r} -> VAR: {edited!r} | "
             f"{method.spec().replace(',record=True', '')}")  # fmt: skip
    pad = bool(getattr(getattr(model, "cfg", None), "pad_to_square", True))
    out = args.out if args.out.suffix else args.out.with_suffix(".png")  # a bare name still gets a viewable file
    path = save_attention_figure(out, image, method.last_state, 0, title, pad)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
