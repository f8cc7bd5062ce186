"""``zoo eval``: evaluate a model on benchmark tasks and print the results table.

zoo eval --model moe_llava_tiny.shapes --tasks shapes_vqa,shapes_pope --limit 8
zoo eval --model moe_llava_tiny.shapes --method none --limit 8     # any zoo.methods method, NAME[:k=v,...]
zoo eval --model moe_llava_tiny.shapes --method var --log-attention 4 --limit 8   # + attention pictures
zoo eval --list

lmms-eval's flag names are accepted as aliases (``--model_args``, ``--batch_size``, ``--output_path``,
``--log_samples``, ``--gen_kwargs``, ``--seed``, ``--include_path``), so a command line from its docs needs no edits
beyond the model name. Listing tasks and rejecting a misspelt ``--model`` or ``--tasks`` read the fast name indexes
(``zoo.model_index``, ``eval.task_index``, the weights table) and answer before torch is imported.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "parse_kv"]

EPILOG = """\
examples:
  zoo eval --model moe_llava_tiny.shapes --tasks shapes_vqa,shapes_pope --limit 8
  zoo eval --model moe_llava_tiny.shapes --method none --limit 8     # any zoo.methods method, NAME[:k=v,...]
  zoo eval --model moe_llava_phi2_4e.official --tasks pope --device cuda --dtype bf16
  zoo eval --model_args pretrained=moe_llava_tiny.shapes --tasks shapes_pope --batch_size 16 \\
           --output_path out/ --gen_kwargs max_new_tokens=4                  # lmms-eval's spelling
  zoo eval --list
"""


def parse_kv(text: str | None, flag: str) -> dict[str, object]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}`` (values parsed as YAML scalars), as lmms-eval's key=value flags."""
    import yaml

    out: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {text!r}: {part!r} is not key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo eval", description="Evaluate a model on benchmark tasks (see eval/tasks/ and `zoo eval --list`).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--model", help="weights name (zoo list --pretrained), architecture, or a checkpoint directory"
    )
    p.add_argument("--model_args", "--model-args", dest="model_args", metavar="K=V,...",
                   help="lmms-eval style: pretrained=NAME (same as --model) and zoo.load options, e.g. "
                        "pretrained=moe_llava_tiny.shapes,dtype=bf16")  # fmt: skip
    p.add_argument("--tasks", default="shapes_vqa,shapes_pope", help="comma-separated task or group names")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents of each task")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8,
                   help="prompts per generate() call")  # fmt: skip
    p.add_argument("--output-dir", "--output_path", dest="output_dir", type=Path, default=None,
                   help="where results.json / results.md / samples_<task>.jsonl go "
                        "(default: runs/eval/<model>/<date>)")  # fmt: skip
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding one sub-folder per benchmark (default: $MMZOO_DATA)")  # fmt: skip
    p.add_argument("--no-samples", action="store_true", help="do not write per-sample predictions")
    p.add_argument("--log_samples", "--log-samples", action="store_true",
                   help="write per-sample predictions (the default here; accepted for lmms-eval command lines)")  # fmt: skip
    p.add_argument("--gen_kwargs", "--gen-kwargs", dest="gen_kwargs", metavar="K=V,...",
                   help="generation settings for every task, e.g. max_new_tokens=16,do_sample=false")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed for python, numpy and torch (default 0)")
    p.add_argument("--include_path", "--include-path", dest="include_path", type=Path, action="append", default=[],
                   help="a folder of extra task YAML files to register (repeatable)")  # fmt: skip
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, mps... (default auto: cuda when there is one, else cpu)")  # fmt: skip
    p.add_argument("--dtype", default=None, help="float32, bfloat16 / bf16, float16 / fp16 (default: the weights')")
    p.add_argument("--method", default=None, metavar="NAME[:k=v,...]",
                   help="run every generate call with this zoo.methods method, e.g. none or var:p=0.6 "
                        "(see --list-methods)")  # fmt: skip
    p.add_argument("--log-attention", type=int, default=0, metavar="N",
                   help="also draw attention pictures (as `zoo attend`: per layer, before and after VAR) for the "
                        "first N documents of each task, into OUTPUT_DIR/attention/")  # fmt: skip
    p.add_argument("--routing", action="store_true",
                   help="MoE models: also write routing.png, a heatmap of which experts image and text tokens use "
                        "per layer, and routing.json")  # fmt: skip
    p.add_argument("--list-methods", action="store_true", help="list the registered methods and exit")
    p.add_argument("--list", action="store_true", help="list the registered tasks and exit")
    return p


def _error(msg: object, code: int = 2) -> int:
    """One clear line on stderr; 2 for a bad command line, 1 for bad input found while running."""
    print(f"zoo eval: error: {msg}", file=sys.stderr)
    return code


def _unknown(kind: str, name: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} See `{where}`."


def check_names(model: str, tasks: str) -> str | None:
    """The first misspelt model or task name, as an error message; None when every name is known. Reads only the
    fast indexes, so it answers before anything heavy is imported."""
    from eval.task_index import GROUPS, TASKS
    from zoo.model_index import MODEL_FAMILIES
    from zoo.registry import list_pretrained

    if not os.path.exists(model):
        weights = list_pretrained()
        if model not in weights and model not in MODEL_FAMILIES:
            if os.sep in model:
                return f"--model {model}: no such checkpoint directory"
            return _unknown("model", model, [*weights, *MODEL_FAMILIES], "zoo list --pretrained")
    for name in filter(None, (t.strip() for t in tasks.split(","))):
        if name not in TASKS and name not in GROUPS:
            return _unknown("task", name, [*TASKS, *GROUPS], "zoo eval --list")
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("MMZOO_LOGLEVEL", "WARNING"))
    if args.list:
        from eval.task_index import TASKS

        for name, (group, description) in TASKS.items():
            print(f"{name:28s} {group or '-':12s} {description}")
        return 0
    if args.list_methods:
        from zoo.methods import list_methods

        print("\n".join(list_methods()))
        return 0
    try:
        model_args = parse_kv(args.model_args, "--model_args")
        gen_kwargs = parse_kv(args.gen_kwargs, "--gen_kwargs")
    except ValueError as e:
        return _error(e)
    model = args.model or model_args.pop("pretrained", None)
    model_args.pop("pretrained", None)
    if args.method is not None:
        from zoo.methods import build_method

        try:  # before the model loads: a misspelt method or option costs nothing
            args.method = build_method(args.method).spec()
        except (ValueError, TypeError) as e:
            return _error(f"--method {args.method}: {e}")
    if not model:
        return _error("--model is required (a weights name from `zoo list --pretrained` or a checkpoint directory)")
    model = str(model)
    if not args.include_path:  # extra task files: only the full registry knows their names
        problem = check_names(model, args.tasks)
        if problem:
            return _error(problem)
    from datetime import datetime, timezone

    from eval.models import NotGenerativeError
    from eval.runner import _sanitize, run

    load_kwargs = dict(model_args)
    try:
        _seed(args.seed)
        device = _device(args.device)
        if device is not None:
            load_kwargs["device"] = device
        if args.dtype is not None:
            load_kwargs["dtype"] = args.dtype
        tasks = _task_specs(args.tasks, args.include_path, gen_kwargs)
    except (FileNotFoundError, KeyError, ValueError) as e:
        return _error(e.args[0] if isinstance(e, KeyError) and e.args else e)
    out = args.output_dir
    if out is None:
        out = Path("runs") / "eval" / _sanitize(model) / datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
    target: object = model
    display_name: str | None = None  # None: run() names it (e.g. 'NAME (random init)' for a bare architecture)
    if args.routing:  # the model is loaded once, here, and serves both the benchmarks and the routing report
        from eval.models import resolve_model

        try:
            target, display_name = resolve_model(model, **load_kwargs)
        except (FileNotFoundError, KeyError, ValueError) as e:
            return _error(e.args[0] if isinstance(e, KeyError) and e.args else e)
    try:
        results = run(target, tasks, model_name=display_name, limit=args.limit, batch_size=args.batch_size, output_dir=out,
                      data_root=args.data_root, log_samples=not args.no_samples, print_table=False,
                      method=args.method, count_original=True, load_kwargs=load_kwargs,
                      model_args=model_args or None, log_attention=args.log_attention)  # fmt: skip
    except (FileNotFoundError, KeyError, ValueError, NotGenerativeError) as e:
        # Bad input (unknown task or model, missing data, malformed record): one clear line, not a traceback.
        return _error(e.args[0] if isinstance(e, KeyError) and e.args else e, code=1)
    from eval.runner import format_table

    sys.stderr.flush()  # the progress bars are done: the table never shares a line with them
    print(format_table(results), flush=True)
    if args.routing:
        from eval.routing_report import write_routing_report

        try:
            written = write_routing_report(target, tasks, out, limit=args.limit, batch_size=args.batch_size,
                                           model_name=model)
        except (TypeError, ValueError) as e:
            return _error(f"--routing: {e}")
        print(f"wrote {written}")
    print(f"\nwrote {out}/results.json, results.md and samples_<task>.jsonl")
    return 0


def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(spec: str) -> str | None:
    """``auto`` -> ``cuda`` when a GPU is there, else None (the model stays where zoo.load puts it: the CPU)."""
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _task_specs(tasks: str, include_paths: list[Path], gen_kwargs: dict) -> str | list:
    """The task names, or (with --include_path / --gen_kwargs) the TaskSpecs with those applied."""
    if not include_paths and not gen_kwargs:
        return tasks
    import dataclasses

    from eval.registry import _load_builtin, expand_tasks, load_task_yaml, register_task

    _load_builtin()
    for folder in include_paths:
        if not folder.is_dir():
            raise FileNotFoundError(f"--include_path {folder}: not a folder")
        for path in sorted(folder.rglob("*.yaml")):
            if not path.name.startswith("_"):  # _template files are included by others, not tasks themselves
                register_task(load_task_yaml(path))
    specs = expand_tasks(tasks)
    return [dataclasses.replace(s, generation={**s.generation, **gen_kwargs}) for s in specs] if gen_kwargs else specs


if __name__ == "__main__":
    raise SystemExit(main())
