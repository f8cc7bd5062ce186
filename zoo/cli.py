"""``zoo``: the one command-line entry point.

    zoo train RECIPE.yaml [--stage NAME] [--resume] [--force] [--set key.path=value ...] [--runs-dir DIR]
    zoo list [GLOB] [--pretrained | --tasks | --stage-types]
    zoo eval | chat | sample | convert ...     (handed to eval.cli / zoo.chat / zoo.sample / zoo.convert)

Heavy modules (torch, lightning, model families) are imported only by the subcommand that needs them, so a recipe
with a misspelt key fails in about a second.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import sys

__all__ = ["main", "build_parser"]

# subcommand -> (module, help); each module exposes ``main(argv: list[str]) -> int``.
DISPATCH = {
    "eval": ("eval.cli", "evaluate a model on benchmarks (see `zoo eval --help`)"),
    "chat": ("zoo.chat", "chat with a multimodal model (see `zoo chat --help`)"),
    "attend": ("zoo.attend", "draw where a model looks, per layer, before and after VAR (see `zoo attend --help`)"),
    "ground": ("zoo.ground", "segment what a referring expression names, F-LMM (see `zoo ground --help`)"),
    "sample": ("zoo.sample", "sample images from a diffusion model (see `zoo sample --help`)"),
    "convert": ("zoo.convert", "convert official checkpoints to zoo layout (see `zoo convert --help`)"),
    "show": ("zoo.show", "write a video as GIF / strip PNG, audio as a spectrogram PNG (see `zoo show --help`)"),
}

TRAIN_EPILOG = """\
outputs (per stage, under RUNS/<recipe>/<stage>/):
  config.yaml             the resolved stage config (all defaults, init_from resolved, git commit)
  checkpoints/last.ckpt   Lightning checkpoint, written atomically; an interrupted stage resumes from it
  metrics.csv             training loss, lr and the stage's own logs every trainer.log_every_n_steps steps
  final/                  model.safetensors + config.json, loadable with zoo.load(DIR)
  summary.json            evaluation metrics, steps, wall time, samples/s (its presence = stage finished)

behaviour:
  The whole recipe is validated before anything trains (unknown keys, types, files, stage types, init_from).
  Finished stages are skipped; an interrupted stage resumes from its last checkpoint and ends with the same
  metrics as an uninterrupted run (data order and RNG are functions of seed and step). Distributed training
  comes from Lightning: set e.g. stages.NAME.trainer.strategy=ddp and trainer.devices=2.
  Safety: one `zoo train` per run folder (RUNS/<recipe>/.lock holds its pid; a dead owner's lock is taken over);
  nothing is written or deleted outside RUNS; resuming with changed training settings is refused (use --force
  to start the stage over); a loss that stays nan/inf for trainer.nonfinite_patience micro-batches stops the
  stage, and weights holding nan/inf are never exported.

examples:
  zoo train recipes/clip/shapes_tiny.yaml
  zoo train recipes/clip/shapes_tiny.yaml --set stages.clip.trainer.max_steps=50 --runs-dir /tmp/runs
  zoo train recipes/clip/shapes_tiny.yaml --stage clip --force
  make train RECIPE=recipes/clip/shapes_tiny.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoo",
        description="mmzoo: a multimodal mixture-of-experts model zoo (models, staged recipes, evaluation, weights).",
    )
    from zoo import __version__

    parser.add_argument("--version", action="version", version=f"mmzoo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "train",
        help="run a staged training recipe",
        description="Validate a recipe, then train its stages in order with Lightning.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "recipe",
        help="recipe YAML file, or a shipped recipe's name (e.g. recipes/clip/shapes_tiny.yaml or clip/shapes_tiny; "
        "`zoo list --recipes`)",
    )
    p.add_argument("--stage", metavar="NAME", help="run only this stage (the stages it starts from must be finished)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="insist on resuming: fail if RUNS/<recipe>/ does not exist (interrupted stages resume anyway)",
    )
    p.add_argument("--force", action="store_true", help="delete the selected stages' outputs and retrain them")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value before validation, e.g. stages.clip.trainer.max_steps=50 (stage by name "
        "or index; VALUE is parsed as YAML). Repeatable.",
    )
    p.add_argument("--runs-dir", metavar="DIR", help="output root (default: $MMZOO_RUNS, else ./runs)")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (registers stage types defined outside zoo/stages). Repeatable.",
    )
    p.add_argument("--check", action="store_true", help="only validate the recipe and print the stage plan")
    p.add_argument("--print-config", action="store_true",
                   help="validate, then print the resolved recipe (every default filled in, --set applied) as YAML "
                        "and exit, as LightningCLI's --print_config does")  # fmt: skip

    p = sub.add_parser("list", help="list registered models, pretrained weights, benchmark tasks or training stage types")
    p.add_argument("pattern", nargs="?", default="*", help="glob on names (default: *)")
    p.add_argument("--pretrained", action="store_true",
                   help="list weights names (arch.tag) and whether each is available offline")  # fmt: skip
    p.add_argument("--tasks", action="store_true", help="list benchmark (evaluation) task names instead of models")
    p.add_argument(
        "--stage-types", action="store_true", help="list training stage types (a recipe stage's `type:`)"
    )
    p.add_argument("--recipes", action="store_true", help="list the shipped recipes (names `zoo train` accepts)")

    for name, (_module, text) in DISPATCH.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _check_stage_name(recipe, stage: str | None) -> None:
    """An unknown ``--stage`` fails here, before the stage types (and torch, Lightning) are imported."""
    from zoo.recipe import RecipeError

    names = [s.name for s in recipe.stages]
    if stage is not None and stage not in names:
        raise RecipeError([f"{recipe.path}: --stage {stage!r}: no such stage (stages: {', '.join(names)})"])


def _train(args: argparse.Namespace) -> int:
    from zoo.recipe import RecipeError, check_stage_configs, load_recipe
    from zoo.resources import find_recipe, list_recipes

    args.recipe = find_recipe(args.recipe)
    if not args.recipe.is_file():
        known = ", ".join(list_recipes()) or "none installed"
        print(f"zoo train: {args.recipe}: no such recipe file or shipped recipe name (shipped: {known})",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        for module in args.imports:
            importlib.import_module(module)
        if args.print_config:
            import yaml

            from zoo.recipe import to_plain

            recipe = load_recipe(args.recipe, args.overrides, check_stage_types=False)
            check_stage_configs(recipe)
            plain = to_plain(recipe)
            plain.pop("path", None)
            for stage in plain.get("stages", []):
                for runner_only in ("out_dir", "init_source"):  # filled in by the runner, not recipe keys
                    stage.pop(runner_only, None)
                stage["trainer"].update(stage["trainer"].pop("extra", {}))  # written as the recipe writes them
            print(f"# {args.recipe}, resolved\n" + yaml.safe_dump(plain, sort_keys=False, width=110), end="")
            return 0
        if args.check:
            recipe = load_recipe(args.recipe, args.overrides, check_stage_types=False)
            _check_stage_name(recipe, args.stage)
            check_stage_configs(recipe)
            print(f"{args.recipe}: valid; recipe {recipe.recipe!r}")
            for s in recipe.stages:
                src = f" <- {s.init_source[0]} {s.init_source[1]}" if s.init_source else ""
                steps = s.trainer.max_steps or f"{s.trainer.max_epochs} epochs"
                print(f"  {s.name}: {s.type}, {steps} steps, batch {s.batch_size}{src}")
            return 0
        # Fail fast on the runner's own keys before the heavy imports in zoo.train.
        _check_stage_name(load_recipe(args.recipe, args.overrides, check_stage_types=False), args.stage)
        from zoo.train import train

        train(
            args.recipe,
            stage=args.stage,
            resume=args.resume,
            force=args.force,
            overrides=args.overrides,
            runs_dir=args.runs_dir,
            imports=args.imports,
        )
    except RecipeError as e:
        print(f"zoo train: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, ValueError) as e:
        # RunError (lock held, changed config on resume, diverged loss, path outside or unwritable runs folder), an
        # earlier stage not run, unreadable weights: each message names the file and what to do; no traceback.
        from zoo.train import RunError

        if isinstance(e, RuntimeError) and not isinstance(e, RunError):
            raise
        print(f"zoo train: {e}", file=sys.stderr)
        return 1
    return 0


def _list(args: argparse.Namespace) -> int:
    # Names come from the fast indexes (zoo.model_index, eval.task_index, the weights table), never from importing
    # the families: `zoo list` answers without importing torch.
    rows: list[str]
    if args.stage_types:
        from zoo.stages import list_stage_types

        rows = [n for n in list_stage_types() if fnmatch.fnmatch(n, args.pattern)]
    elif args.tasks:
        from eval.task_index import TASKS  # the application layer may import eval (lazily, as every command)

        rows = [n for n in sorted(TASKS) if fnmatch.fnmatch(n, args.pattern)]
    elif args.recipes:
        from zoo.resources import list_recipes

        rows = [n for n in list_recipes() if fnmatch.fnmatch(n, args.pattern)]
    elif args.pretrained:
        from zoo.registry import list_pretrained, weights_availability

        names = list_pretrained(args.pattern)
        width = max((len(n) for n in names), default=0)
        rows = [f"{n:{width}s}  {weights_availability(n)}" for n in names]
    else:
        from zoo.model_index import MODEL_FAMILIES

        rows = [n for n in sorted(MODEL_FAMILIES) if fnmatch.fnmatch(n, args.pattern)]
    for row in rows:
        print(row)
    if not rows:
        print(f"(nothing matches {args.pattern!r})", file=sys.stderr)
    return 0


def _dispatch(command: str, argv: list[str]) -> int:
    module_name, _ = DISPATCH[command]
    return int(importlib.import_module(module_name).main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # The dispatched commands own their flags (including --help), so hand them everything after the name.
    if argv and argv[0] in DISPATCH:
        return _dispatch(argv[0], argv[1:])
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "list":
        return _list(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
