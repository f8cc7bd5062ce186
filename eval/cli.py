"""``zoo eval``: evaluate a model on benchmark tasks and print the results table.

zoo eval --model moe_llava_tiny.shapes --tasks shapes_vqa,shapes_pope --limit 8
zoo eval --model moe_llava_tiny.shapes --method none --limit 8     # any zoo.methods method, NAME[:k=v,...]
zoo eval --model moe_llava_tiny.shapes --method var --log-attention 4 --limit 8   # + attention pictures
zoo eval --list
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo eval", description="Evaluate a model on benchmark tasks (see eval/tasks/)."
    )
    p.add_argument(
        "--model", help="weights name (zoo list) or a checkpoint directory written by save_pretrained"
    )
    p.add_argument("--tasks", default="shapes_vqa,shapes_pope", help="comma-separated task or group names")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where results.json / results.md / samples_<task>.jsonl go "
                        "(default: runs/eval/<model>/<date>)")  # fmt: skip
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding one sub-folder per benchmark (default: $MMZOO_DATA)")  # fmt: skip
    p.add_argument("--no-samples", action="store_true", help="do not write per-sample predictions")
    p.add_argument("--method", default=None, metavar="NAME[:k=v,...]",
                   help="run every generate call with this zoo.methods method, e.g. none or var:p=0.6 "
                        "(see --list-methods)")  # fmt: skip
    p.add_argument("--log-attention", type=int, default=0, metavar="N",
                   help="also draw attention pictures (as `zoo attend`: per layer, before and after VAR) for the "
                        "first N documents of each task, into OUTPUT_DIR/attention/")  # fmt: skip
    p.add_argument("--list-methods", action="store_true", help="list the registered methods and exit")
    p.add_argument("--list", action="store_true", help="list the registered tasks and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("MMZOO_LOGLEVEL", "WARNING"))
    if args.list:
        from eval.registry import get_task, list_tasks

        for name in list_tasks():
            spec = get_task(name)
            print(f"{name:28s} {spec.group or '-':12s} {spec.description}")
        return 0
    if args.list_methods:
        from zoo.methods import list_methods

        print("\n".join(list_methods()))
        return 0
    from eval.registry import declared_task_names

    known = declared_task_names()  # read from the task files: a misspelt name fails before torch is imported
    unknown = [n.strip() for n in args.tasks.split(",") if n.strip() and n.strip() not in known]
    if unknown:
        print(f"zoo eval: error: unknown eval task or group {', '.join(map(repr, unknown))}; "
              f"known: {', '.join(sorted(known))} (details: zoo eval --list)")  # fmt: skip
        return 1
    if args.method is not None:
        from zoo.methods import build_method

        try:  # before the model loads: a misspelt method or option costs nothing
            args.method = build_method(args.method).spec()
        except (ValueError, TypeError) as e:
            print(f"zoo eval: error: --method {args.method}: {e}")
            return 2
    if not args.model:
        print("zoo eval: --model is required (a weights name from `zoo list` or a checkpoint directory)")
        return 2
    from datetime import datetime, timezone

    from eval.models import NotGenerativeError
    from eval.runner import _sanitize, run

    out = args.output_dir
    if out is None:
        out = (
            Path("runs")
            / "eval"
            / _sanitize(args.model)
            / datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
        )
    try:
        run(args.model, args.tasks, limit=args.limit, batch_size=args.batch_size, output_dir=out,
            data_root=args.data_root, log_samples=not args.no_samples, print_table=True,
            method=args.method, log_attention=args.log_attention)  # fmt: skip
    except (FileNotFoundError, KeyError, ValueError, NotGenerativeError) as e:
        # Bad input (unknown task or model, missing data, malformed record): one clear line, not a traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"zoo eval: error: {msg}")
        return 1
    print(f"\nwrote {out}/results.json, results.md and samples_<task>.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
