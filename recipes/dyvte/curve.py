"""DyVTE's accuracy / prefill-compute curve: a threshold sweep against FastV-style pruning, as a PNG and a table.

    python recipes/dyvte/curve.py --out runs/dyvte_curve                      # shipped model + shipped routers
    python recipes/dyvte/curve.py --model runs/dyvte_moe_llava_tiny_shapes/routers/final \\
        --routers runs/dyvte_moe_llava_tiny_shapes/routers/final --out runs/dyvte_curve --limit 500

Each point is one ``eval.run`` over ShapesVQA and ShapesPOPE (the same first ``--limit`` documents): the plain model
(``dyvte:threshold=1.01``, which never exits and scores exactly as the plain model; it also reports the plain model's
prefill cost), DyVTE at each ``--thresholds`` value and FastV (``fastv:layer=L,keep=r``) at each ``--fastv-keep``
ratio. Prefill FLOPs and KV-cache bytes per row are counted from the tokens each layer actually held. The prefill
wall time is measured at batch 1 and batch 64 on ShapesVQA prompts, in ``--repeats`` quadruples plain, DyVTE, DyVTE,
plain (the speed-up is the median of the quadruples' ratios); only the ratio is meaningful on a shared machine. Everything is written under ``--out``: ``curve.json``,
``curve.md`` and ``curve.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def _point(model: Any, spec: str, args: argparse.Namespace, out: Path, name: str) -> dict[str, Any]:
    import eval as zoo_eval
    from zoo.stages.moe_llava import summarise_eval

    t0 = time.perf_counter()
    res = zoo_eval.run(
        model, tasks=args.tasks.split(","), limit=args.limit, batch_size=args.batch_size, output_dir=out / name,
        model_name=name, method=spec, progress=False,
    )  # fmt: skip
    scores = summarise_eval(res)
    metrics: dict[str, list[float]] = {}
    for eff in res.get("efficiency", {}).values():
        for key, value in (eff.get("method_metrics") or {}).items():
            metrics.setdefault(key.split("/", 1)[1], []).append(value)
    point = {"name": name, "method": spec, "eval_s": round(time.perf_counter() - t0, 1)}
    point |= {k: round(v, 3) for k, v in scores.items() if k in ("shapes_vqa/accuracy", "shapes_pope/f1")}
    point |= {k: round(sum(v) / len(v), 6) for k, v in metrics.items()}  # mean over the tasks
    print(json.dumps(point), flush=True)
    return point


def _prefill_seconds(model: Any, images: list[Any], prompts: list[str], spec: str) -> float:
    model.generate(images, prompts, max_new_tokens=1, method=spec)
    return model.last_generation_stats.prefill_seconds


def _timing(model: Any, spec: str, plain: str, batch: int, repeats: int) -> dict[str, float]:
    """Prefill seconds of ``plain`` and ``spec`` at ``batch``, in ``repeats`` quadruples plain, spec, spec, plain.

    The machine's speed drifts by 10-15% over seconds (shared hosts), so each quadruple gives one ratio in which a
    linear drift cancels; ``speedup`` is the median of those, ``plain_ms`` / ``method_ms`` the medians of all runs.
    """
    from data.shapes import ShapesWorld, WorldConfig

    world = ShapesWorld(WorldConfig(image_size=64, seed=0))
    scenes = list(world.iter_scenes("test", batch))
    images = [s.image for s in scenes]
    prompts = [s.vqa[0].question + "\nAnswer the question using a single word or phrase." for s in scenes]
    for s in (plain, spec):
        _prefill_seconds(model, images, prompts, s)  # warm-up
    times: dict[str, list[float]] = {plain: [], spec: []}
    ratios = []
    for _ in range(repeats):
        p1, m1, m2, p2 = (_prefill_seconds(model, images, prompts, s) for s in (plain, spec, spec, plain))
        times[plain] += [p1, p2]
        times[spec] += [m1, m2]
        ratios.append((p1 + p2) / (m1 + m2))
    base, fast = statistics.median(times[plain]), statistics.median(times[spec])
    return {"plain_ms": round(1000 * base, 2), "method_ms": round(1000 * fast, 2),
            "speedup": round(statistics.median(ratios), 3), "ratio_of_medians": round(base / fast, 3)}


def _plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (metric, label) in zip(axes, (("shapes_vqa/accuracy", "ShapesVQA accuracy"), ("shapes_pope/f1", "ShapesPOPE F1"))):
        for kind, style in (("dyvte", "o-"), ("fastv", "s--")):
            pts = sorted((p for p in points if p["name"].startswith(kind)), key=lambda p: p["prefill_gflops_per_row"])
            ax.plot([p["prefill_gflops_per_row"] * 1000 for p in pts], [p[metric] for p in pts], style,
                    label="DyVTE (threshold sweep)" if kind == "dyvte" else "FastV (keep-ratio sweep)")
        plain = next(p for p in points if p["name"] == "plain")
        ax.plot([plain["prefill_gflops_per_row"] * 1000], [plain[metric]], "k*", markersize=12, label="plain model")
        ax.set_xlabel("prefill MFLOPs per prompt (decoder layers)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _table(points: list[dict[str, Any]], timing: dict[str, Any]) -> str:
    plain = next(p for p in points if p["name"] == "plain")
    lines = [
        "| method | ShapesVQA acc | ShapesPOPE F1 | prefill MFLOPs / row | saved | KV cache KB / row | layers with image |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        saved = 1 - p["prefill_gflops_per_row"] / plain["prefill_gflops_per_row"]
        layers = p.get("mean_layers_with_visual")
        lines.append(
            f"| `{p['method']}` | {p['shapes_vqa/accuracy']:.1f} | {p['shapes_pope/f1']:.1f} "
            f"| {1000 * p['prefill_gflops_per_row']:.2f} | {100 * saved:.1f}% | {p['kv_cache_kb_per_row']:.1f} "
            f"| {'-' if layers is None else f'{layers:.2f}'} |"
        )
    for batch, t in timing.items():
        lines.append(f"\nPrefill at batch {batch}, `{t['method']}` vs plain: {t['plain_ms']:.1f} ms -> "
                     f"{t['method_ms']:.1f} ms, **{t['speedup']:.2f}x** (median ratio of {t['repeats']} quadruples "
                     f"plain-method-method-plain)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="moe_llava_tiny.shapes", help="weights name or directory of the base model")
    p.add_argument("--routers", default="moe_llava_tiny.shapes", help="registered router name or directory")
    p.add_argument("--out", required=True, help="output folder (curve.json, curve.md, curve.png, eval results)")
    p.add_argument("--tasks", default="shapes_vqa,shapes_pope")
    p.add_argument("--limit", type=int, default=1000, help="documents per task")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--thresholds", default="0.5,0.4,0.3,0.2,0.1", help="DyVTE p(exit) thresholds")
    p.add_argument("--fastv-layer", type=int, default=1, help="FastV pruning layer (the tiny LM has 4)")
    p.add_argument("--fastv-keep", default="0.5,0.25,0.1", help="FastV kept fractions of the visual tokens (empty: no FastV points)")
    p.add_argument("--timing-threshold", type=float, default=0.5, help="DyVTE threshold whose prefill is timed")
    p.add_argument("--repeats", type=int, default=7, help="timed quadruples (plain, method, method, plain) per batch size")
    args = p.parse_args(argv)

    import torch

    import zoo

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = zoo.load(args.model).eval()
    plain = f"dyvte:routers={args.routers},threshold=1.01"
    points = [_point(model, plain, args, out, "plain")]
    for t in (float(x) for x in args.thresholds.split(",") if x.strip()):
        points.append(_point(model, f"dyvte:routers={args.routers},threshold={t}", args, out, f"dyvte_t{t}"))
    for r in (float(x) for x in args.fastv_keep.split(",") if x.strip()):
        points.append(_point(model, f"fastv:layer={args.fastv_layer},keep={r}", args, out, f"fastv_k{r}"))
    spec = f"dyvte:routers={args.routers},threshold={args.timing_threshold}"
    timing = {}
    for batch in (1, 64):
        timing[batch] = _timing(model, spec, "none", batch, args.repeats) | {"method": spec, "repeats": args.repeats}
        print(f"batch {batch}: {timing[batch]}", flush=True)
    (out / "curve.json").write_text(json.dumps({"points": points, "prefill_timing": timing}, indent=2))
    (out / "curve.md").write_text(_table(points, timing) + "\n")
    _plot(points, out / "curve.png")
    print(_table(points, timing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
