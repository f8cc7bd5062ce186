"""Recipe schema and validation: a YAML file of named stages -> typed, checked :class:`Recipe`.

A recipe is validated as a whole before any training starts. Every problem (unknown key, wrong type, missing file,
unknown stage type, ``init_from`` naming a later or unknown stage) is reported together, each with the file, the key path
(``stages[1].trainer.max_stepz``) and what was expected (the allowed keys with the closest one suggested, or the
expected type). Validation runs in two phases so that the common mistakes fail fast:

1. ``load_recipe(path, overrides, check_stage_types=False)``: the runner's own keys (top level, stage keys, ``optim``,
   ``schedule``, ``trainer``), stage types and ``init_from`` stage references. Needs only PyYAML: well under a second.
2. ``check_stage_configs(recipe)`` (done by ``load_recipe`` unless ``check_stage_types=False``): validates ``model`` /
   ``data`` / ``eval`` against the ``ModelConfig`` / ``DataConfig`` / ``EvalConfig`` dataclasses of the stage types the
   recipe names, plus ``init_from`` weights names against ``zoo.registry``. It imports only the modules that define
   those dataclasses (``zoo.stages.stage_configs``), never the stage modules: no torch, transformers or Lightning.

Nested blocks are typed by the dataclasses their code uses (``model.vision`` by ``VisionTowerConfig``, ``model.moe``
by ``MoESettings``, ``data.world`` by the shapes ``WorldConfig``, ...), so a misspelt key deep inside the last stage
fails here, before the first stage runs, with the same file / key path / did-you-mean report; the dataclass's own
``__post_init__`` checks become problems too.

Task config dataclasses may annotate input files as :data:`InputPath` (``Annotated[Path, MustExist()]``): such paths
must exist at validation time (relative paths are taken from the working directory). Field metadata
``{"min": x}`` / ``{"max": x}`` bound numbers, ``{"help": "..."}`` documents a key.

``--set`` overrides (``apply_overrides``) edit the raw YAML before validation: ``stages.clip.trainer.max_steps=50``
(stage by name, or by index ``stages.0`` / ``stages[0]``), values parsed with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

__all__ = [
    "MustExist",
    "InputPath",
    "RecipeError",
    "OptimConfig",
    "ScheduleConfig",
    "TrainerConfig",
    "StageSpec",
    "Recipe",
    "load_recipe",
    "check_stage_configs",
    "apply_overrides",
    "parse_config",
    "describe_type",
    "to_plain",
]


class MustExist:
    """Marker for ``Annotated[Path, MustExist()]``: the path must exist when the recipe is validated."""

    def __repr__(self) -> str:
        return "MustExist()"


InputPath = Annotated[Path, MustExist()]


# Keys that recipes written for an earlier mmzoo used: (config class, old key) -> new key, named in the error.
# A stage's kind was `task:` until "task" came to mean only a benchmark (eval/tasks); it is now `type:`.
RENAMED_KEYS = {("StageSpec", "task"): "type"}


# Recipe and stage names become folders under the runs folder: no '.', '..', slashes or hidden names, which would
# put outputs (and --force's deletions) outside it.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
SAFE_NAME_RULE = "use letters, digits, '_', '-', '.', starting with a letter, digit or '_'"


class RecipeError(ValueError):
    """A recipe failed validation; ``problems`` holds one line per problem (file: key path: what is wrong)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = "invalid recipe" if n == 1 else f"invalid recipe ({n} problems)"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


# ---- the runner's own schema ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer over the trainable parameters (weight decay applies to tensors with ndim >= 2 only)."""

    # a short name, or the import path of any torch.optim.Optimizer subclass (e.g. torch.optim.RAdam), which is
    # built as cls(param_groups, lr=lr, **args). "muon": Muon on the 2-D hidden weights, AdamW (betas, eps) on
    # embeddings, heads and vectors, one lr and weight decay for both (zoo/stages/optimizers.py)
    name: str = "adamw"
    args: dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword arguments of an optimizer "
                                                                          "given by import path"})
    lr: float = field(default=1.0e-3, metadata={"min": 0.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    momentum: float = 0.9  # sgd only
    # Learning-rate multipliers by parameter-name glob (names as in ``trainable``), e.g. {"vision_tower.*": 0.1}
    # to tune a pretrained tower gently as LLaVA-NeXT does; the first matching glob wins, unmatched names get 1.
    lr_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SHORT_OPTIMIZERS and "." not in self.name:
            raise ValueError(f"optim.name {self.name!r}: use {', '.join(SHORT_OPTIMIZERS)} or an import path such "
                             "as torch.optim.RAdam")  # fmt: skip
        if self.args and self.name in SHORT_OPTIMIZERS:
            raise ValueError(f"optim.args applies to an optimizer given by import path, not {self.name!r} (set its "
                             "lr / betas / eps / momentum keys)")  # fmt: skip


SHORT_OPTIMIZERS = ("adamw", "adam", "sgd", "muon")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate multiplier per optimizer step: linear warmup, then cosine / linear decay to min_lr_ratio."""

    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = field(default=0, metadata={"min": 0})
    min_lr_ratio: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})


@dataclass(kw_only=True)
class TrainerConfig:
    """Lightning ``Trainer`` settings (strategy is any Lightning strategy name: ddp, fsdp, deepspeed_stage_2, ...)."""

    max_steps: int | None = field(default=None, metadata={"min": 1, "help": "optimizer steps (or give max_epochs)"})
    max_epochs: float | None = field(default=None, metadata={"min": 0.0, "help": "converted to steps"})
    accelerator: str = "cpu"
    devices: int | str | list[int] = 1
    num_nodes: int = field(default=1, metadata={"min": 1})
    strategy: str = "auto"
    precision: str | int = "32-true"
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = field(default=1, metadata={"min": 1})
    log_every_n_steps: int = field(default=10, metadata={"min": 1})
    ckpt_every_n_steps: int = field(default=50, metadata={"min": 1})
    deterministic: bool = False
    enable_progress_bar: bool = True
    nonfinite_patience: int = field(
        default=3,
        metadata={"min": 1, "help": "stop the stage after this many consecutive micro-batches with a nan/inf loss"},
    )
    # Lightning loggers besides metrics.csv (always written): tensorboard and/or wandb, when installed.
    loggers: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    # Any other lightning.Trainer argument written in the block (checked against its signature); runner-owned ones
    # (callbacks, logger, checkpointing...) are refused.
    extra: dict[str, Any] = field(default_factory=dict, metadata={"yaml": False})

    @staticmethod
    def extra_key_problem(key: str) -> str | None:
        """None when ``key`` is a lightning.Trainer argument a recipe may set; why not when the runner owns it;
        "" when it is no Trainer argument at all (reported as an unknown key)."""
        if key in TRAINER_OWNED:
            return f"set by the runner ({TRAINER_OWNED[key]}), not by a recipe"
        return None if key in trainer_arguments() else ""


@functools.cache
def trainer_arguments() -> frozenset[str]:
    """The keyword arguments of ``lightning.Trainer.__init__``, read from its source with ``ast`` so that checking a
    recipe never imports Lightning (seconds); if the source is not where Lightning keeps it, from the signature."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("lightning")  # a top-level spec: nothing is imported
    if spec is not None and spec.origin:
        source = Path(spec.origin).parent / "pytorch" / "trainer" / "trainer.py"
        if source.is_file():
            for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and node.name == "Trainer":
                    for item in node.body:
                        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                            args = item.args
                            return frozenset(a.arg for a in [*args.args, *args.kwonlyargs] if a.arg != "self")
    import inspect

    import lightning

    return frozenset(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}


# lightning.Trainer arguments zoo.train sets itself, and why.
TRAINER_OWNED = {
    "callbacks": "checkpoints, metrics.csv and the progress bar", "logger": "use trainer.loggers",
    "plugins": "atomic checkpoint writes", "enable_checkpointing": "checkpoints/last.ckpt",
    "max_epochs": "max_epochs is converted to max_steps", "default_root_dir": "the stage folder",
    "use_distributed_sampler": "the step sampler shards by rank", "enable_model_summary": "the stage summary",
    "num_sanity_val_steps": "no validation loop", "limit_val_batches": "no validation loop",
}  # fmt: skip


@dataclass(kw_only=True)
class StageSpec:
    """One validated stage. ``model``/``data``/``eval`` hold its stage type's config dataclass instances after phase 2."""

    name: str
    # What the stage trains: a registered StageModule (`zoo list --stage-types`), e.g. moe_llava.
    type: str
    init_from: str | dict[str, str] | None = field(
        default=None, metadata={"help": "null | earlier stage name | weights name 'arch.tag' | a directory"}
    )
    model: Any = field(default_factory=dict)
    data: Any = field(default_factory=dict)
    eval: Any = field(default_factory=dict)
    trainable: list[str] = field(default_factory=lambda: ["*"])
    frozen: list[str] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch_size: int = field(metadata={"min": 1, "help": "per-device micro-batch size"})
    seed: int = 0
    num_workers: int = field(default=0, metadata={"min": 0})
    group_by_length: int = field(default=0, metadata={
        "min": 0, "help": "0: random batches; N: sort every N random batches by sample length, so batches pad less"})
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    description: str = ""
    # Filled in by the runner, not accepted from YAML. No default folder: a stage built outside the runner must not
    # write its exported data into whatever the current directory is.
    out_dir: Path | None = field(default=None, metadata={"yaml": False})
    init_source: tuple[str, str] | None = field(default=None, metadata={"yaml": False})  # (kind, value) resolved

    def run_dir(self) -> Path:
        """The stage's run folder (``runs/<recipe>/<stage>``), the only place a stage writes to; set by the runner."""
        if self.out_dir is None:
            raise ValueError(
                f"stage {self.name!r}: out_dir is not set. zoo.train.run_stage sets it to runs/<recipe>/<stage>; "
                "when building a stage yourself, set stage.out_dir to a folder it may write in"
            )
        return Path(self.out_dir)


@dataclass(kw_only=True)
class Recipe:
    recipe: str = field(metadata={"help": "name; outputs go to runs/<recipe>/<stage>/"})
    description: str = ""
    stages: list[StageSpec]
    path: Path = field(default=Path("<memory>"), metadata={"yaml": False})


# ---- generic dataclass / type checking ----------------------------------------------------------------------------


def _yaml_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]


def describe_type(tp: Any) -> str:
    """Human-readable name of a type annotation (``int | None``, ``one of 'a', 'b'``, ``list of str``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Annotated:
        return describe_type(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe_type(args[0])}"
        if origin is tuple:
            return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
        if origin is dict:
            return f"a mapping of {describe_type(args[0])} to {describe_type(args[1])}"
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in _yaml_fields(tp))}"
    if tp is Path:
        return "a path"
    return getattr(tp, "__name__", str(tp))


class _Checker:
    def __init__(self, file: str, check_values: bool = True):
        self.file = file
        self.check_values = check_values  # False: only the shape of the value (used to pick a Union arm)
        self.problems: list[str] = []

    def fail(self, path: str, msg: str) -> None:
        self.problems.append(f"{self.file}: {path or '<top level>'}: {msg}")

    def convert(self, value: Any, tp: Any, path: str) -> Any:
        """Check ``value`` against ``tp``; return the converted value (problems are recorded, not raised)."""
        before = len(self.problems)
        out = self._convert(value, tp, path)
        return out if len(self.problems) == before else None

    def _convert(self, value: Any, tp: Any, path: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return value
        if origin is Annotated:
            out = self._convert(value, args[0], path)
            must_exist = any(isinstance(m, MustExist) for m in args[1:])
            if self.check_values and out is not None and must_exist and not Path(out).exists():
                self.fail(path, f"file not found: {str(out)!r} (relative paths start at the working directory "
                                f"{Path.cwd()})")
            return out
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            same_kind = [a for a in args if _same_kind(value, a)]
            if len(same_kind) == 1:
                # One arm can hold a mapping / list / name like this one: report its problems key by key
                # (``model.moe.num_expertz: unknown key``, did-you-mean for names) instead of "expected X or null".
                return self._convert(value, same_kind[0], path)
            for arm in args:
                if arm is type(None):
                    continue
                trial = _Checker(self.file, check_values=False)
                trial._convert(value, arm, path)
                if not trial.problems:
                    return self._convert(value, arm, path)  # rerun for side checks with the real checker
            self.fail(path, f"expected {describe_type(tp)}, got {_show(value)}")
            return None
        if origin is Literal:
            if value not in args:
                close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.fail(path, f"expected {describe_type(tp)}, got {_show(value)}{hint}")
            return value
        if tp is type(None):
            if value is not None:
                self.fail(path, f"expected null, got {_show(value)}")
            return None
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(path, f"expected a bool (true/false), got {_show(value)}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"expected an integer, got {_show(value)}")
            return value
        if tp is float:
            # PyYAML reads `1e-3` (no dot) as a string; accept numeric strings rather than surprise people.
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"expected a number, got {_show(value)}")
                return None
            if not math.isfinite(float(value)):
                # A nan / inf learning rate (or any other float) trains to NaN weights that later stages inherit.
                self.fail(path, f"expected a finite number, got {value!r}")
                return None
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                self.fail(path, f"expected a string, got {_show(value)}")
            return value
        if tp is Path:
            if not isinstance(value, str):
                self.fail(path, f"expected a path (string), got {_show(value)}")
                return None
            return Path(value)
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                self.fail(path, f"expected {describe_type(tp)}, got {_show(value)}")
                return None
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if args and len(value) != len(args):
                    self.fail(path, f"expected {describe_type(tp)}, got {len(value)} values")
                    return None
                return tuple(self._convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            item = args[0] if args else Any
            out = [self._convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
            return tuple(out) if origin is tuple else out
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                self.fail(path, f"expected {describe_type(tp)}, got {_show(value)}")
                return None
            kt, vt = args if args else (Any, Any)
            return {self._convert(k, kt, path): self._convert(v, vt, f"{path}.{k}") for k, v in value.items()}
        if dataclasses.is_dataclass(tp):
            return self.dataclass(value, tp, path)
        if isinstance(tp, type):
            if not isinstance(value, tp):
                self.fail(path, f"expected {describe_type(tp)}, got {_show(value)}")
            return value
        raise TypeError(f"{path}: unsupported annotation {tp!r} in a config dataclass")

    def dataclass(self, value: Any, cls: type, path: str, skip: tuple[str, ...] = ()) -> Any:
        """Build ``cls`` from a mapping; unknown keys, missing required keys and bad values are problems."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping with keys {', '.join(f.name for f in _yaml_fields(cls))}, "
                            f"got {_show(value)}")
            return None
        fields = {f.name: f for f in _yaml_fields(cls)}
        hints = typing.get_type_hints(cls, include_extras=True)
        kwargs: dict[str, Any] = {}
        before = len(self.problems)
        for key, item in value.items():
            key_path = f"{path}.{key}" if path else str(key)
            if key not in fields and hasattr(cls, "extra_key_problem"):
                # Blocks that mirror a library's own arguments (TrainerConfig) accept those too, into `extra`.
                problem = cls.extra_key_problem(str(key))
                if problem is None:
                    kwargs.setdefault("extra", {})[key] = item
                    continue
                if problem:
                    self.fail(key_path, f"{problem}. Keys of this block: {', '.join(fields)}")
                    continue
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                renamed = RENAMED_KEYS.get((cls.__name__, str(key)))
                if renamed is not None and renamed in fields:
                    hint = f" It was renamed {renamed!r}."
                also = " and the arguments of lightning.Trainer" if hasattr(cls, "extra_key_problem") else ""
                self.fail(key_path, f"unknown key.{hint} Allowed keys: {', '.join(fields)}{also}")
                continue
            if key in skip:
                kwargs[key] = item
                continue
            out = self._convert(item, hints[key], key_path)
            f = fields[key]
            if self.check_values and isinstance(out, (int, float)) and not isinstance(out, bool):
                lo, hi = f.metadata.get("min"), f.metadata.get("max")
                if lo is not None and out < lo:
                    self.fail(key_path, f"must be >= {lo}, got {out}")
                if hi is not None and out > hi:
                    self.fail(key_path, f"must be <= {hi}, got {out}")
            kwargs[key] = out
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in value:
                key_path = f"{path}.{name}" if path else name
                self.fail(key_path, f"missing required key (expected {describe_type(hints[name])})")
        if len(self.problems) != before:
            return None
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            # The dataclass's own checks (__post_init__): combinations of values, names from a fixed set.
            self.fail(path, str(e))
            return None


def _same_kind(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the kind ``tp`` takes (a mapping for dataclasses and dicts, a list for lists and
    tuples, a string for strings and string Literals); used to pick the one Union arm whose detailed problems are
    worth reporting."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or tp is dict or origin is dict
    if isinstance(value, list):
        return tp in (list, tuple) or origin in (list, tuple)
    if isinstance(value, str):
        return tp in (str, Path) or (origin is Literal and all(isinstance(a, str) for a in typing.get_args(tp)))
    return False


def _unshared(value: Any) -> Any:
    """A copy of parsed YAML in which no two places share a mapping or list: YAML anchors (``model: *model``) alias
    one object, and a ``--set`` on one stage must not edit the others."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"


def parse_config(cls: type, value: Any, file: str = "<config>", path: str = "") -> Any:
    """Build the dataclass ``cls`` from a mapping with the recipe checks; raise :class:`RecipeError` on problems."""
    checker = _Checker(file)
    out = checker.dataclass(value, cls, path)
    if checker.problems:
        raise RecipeError(checker.problems)
    return out


def to_plain(value: Any) -> Any:
    """Dataclasses / paths / tuples -> YAML/JSON-friendly builtins (for the resolved config)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---- overrides ------------------------------------------------------------------------------------------------------

_INDEX = re.compile(r"^(?P<key>[^\[\]]*)\[(?P<idx>-?\d+)\]$")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to the raw recipe mapping (in place; also returned).

    ``stages.<name>`` or ``stages.<index>`` / ``stages[<index>]`` select a stage; values go through
    ``yaml.safe_load`` (``50`` -> int, ``1e-3`` -> str that float fields accept, ``[a, b]`` -> list, ``null``).
    """
    for item in overrides:
        if "=" not in item:
            raise RecipeError([f"--set {item!r}: expected key.path=value"])
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text.strip() else ""
        parts: list[str] = []
        for part in key.strip().split("."):
            m = _INDEX.match(part)
            parts.extend([m["key"], m["idx"]] if m and m["key"] else [m["idx"]] if m else [part])
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                idx = _find_stage(node, part)
                if idx is None:
                    names = [s.get("name") for s in node if isinstance(s, dict)]
                    raise RecipeError([f"--set {key}: no stage {part!r} (stages: {names})"])
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError([f"--set {key}: {where} is a {type(node).__name__}, not a mapping"])
    return raw


def _find_stage(stages: list[Any], part: str) -> int | None:
    for i, s in enumerate(stages):
        if isinstance(s, dict) and s.get("name") == part:
            return i
    if re.fullmatch(r"-?\d+", part) and -len(stages) <= int(part) < len(stages):
        return int(part) % len(stages)
    return None


# ---- loading ----------------------------------------------------------------------------------------------------


def _init_kind(spec: Any) -> tuple[str, str] | None:
    """``init_from`` as (kind, value); kind 'auto' for a bare string resolved by lookup."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return ("auto", spec)
    (kind, value), = spec.items()
    return (kind, value)


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, *, check_stage_types: bool = True
) -> Recipe:
    """Read, override and validate a recipe file; raise :class:`RecipeError` listing every problem."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise RecipeError([f"{file}: recipe file not found"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError([f"{file}: not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise RecipeError([f"{file}: expected a mapping with keys recipe, description, stages"])
    raw = apply_overrides(_unshared(raw), list(overrides or []))
    checker = _Checker(file)
    top = checker.dataclass(raw, Recipe, "", skip=("stages",))
    stages_raw = raw.get("stages")
    stages: list[StageSpec] = []
    if not isinstance(stages_raw, list) or not stages_raw:
        if "stages" in raw:
            checker.fail("stages", f"expected a non-empty list of stages, got {_show(stages_raw)}")
    else:
        seen: dict[str, int] = {}
        all_names = [s.get("name") for s in stages_raw if isinstance(s, dict)]
        from zoo.stages import list_stage_types, stage_type_module

        for i, s in enumerate(stages_raw):
            sp = f"stages[{i}]"
            stage = checker.dataclass(s, StageSpec, sp, skip=("model", "data", "eval", "init_from"))
            if not isinstance(s, dict):
                continue
            for section in ("model", "data", "eval"):
                if s.get(section) is not None and not isinstance(s.get(section), dict):
                    checker.fail(f"{sp}.{section}", f"expected a mapping, got {_show(s.get(section))}")
            name = s.get("name")
            if isinstance(name, str):
                if not SAFE_NAME.fullmatch(name):
                    checker.fail(f"{sp}.name", f"{name!r}: {SAFE_NAME_RULE} (it names a folder)")
                if name in seen:
                    checker.fail(f"{sp}.name", f"duplicate stage name {name!r} (also stages[{seen[name]}])")
                seen.setdefault(name, i)
            kind = s.get("type")
            if isinstance(kind, str) and stage_type_module(kind) is None:
                close = difflib.get_close_matches(kind, list_stage_types(), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                known = ", ".join(list_stage_types())
                checker.fail(f"{sp}.type", f"unknown stage type {kind!r}.{hint} Known stage types: {known}")
            init = _check_init_from(checker, s.get("init_from"), f"{sp}.init_from", i, all_names)
            trainer = s.get("trainer")
            trainer_fields = {f.name for f in _yaml_fields(TrainerConfig)}
            misspelt = isinstance(trainer, dict) and any(k not in trainer_fields for k in trainer)
            if (trainer is None or isinstance(trainer, dict)) and not misspelt:
                given = [k for k in ("max_steps", "max_epochs") if (trainer or {}).get(k) is not None]
                if not given:
                    checker.fail(f"{sp}.trainer.max_steps", "give max_steps or max_epochs")
                elif len(given) == 2:
                    checker.fail(f"{sp}.trainer.max_epochs", "give max_steps or max_epochs, not both")
            if stage is not None:
                stage.init_source = init
                stages.append(stage)
    if checker.problems:
        raise RecipeError(checker.problems)
    recipe = Recipe(recipe=top.recipe, description=top.description, stages=stages, path=path)
    if not SAFE_NAME.fullmatch(recipe.recipe):
        raise RecipeError([f"{file}: recipe: {recipe.recipe!r}: {SAFE_NAME_RULE} (it names a folder)"])
    if check_stage_types:
        check_stage_configs(recipe)
    return recipe


def _check_init_from(checker: _Checker, spec: Any, path: str, index: int, names: list[Any]) -> tuple[str, str] | None:
    """Resolve what can be resolved without heavy imports; weights names are checked in phase 2."""
    if spec is None:
        return None
    kinds = ("stage", "weights", "dir")
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in kinds or not isinstance(next(iter(spec.values())), str):
            checker.fail(path, f"expected a string or a one-key mapping {{stage|weights|dir: value}}, got {_show(spec)}")
            return None
        kind, value = next(iter(spec.items()))
    elif isinstance(spec, str):
        kind, value = "auto", spec
    else:
        checker.fail(path, f"expected null, a string or {{stage|weights|dir: value}}, got {_show(spec)}")
        return None
    earlier = [n for n in names[:index] if isinstance(n, str)]
    if kind in ("auto", "stage"):
        if value in earlier:
            return ("stage", value)
        if value in names:
            where = "this stage" if names[index] == value else "a later stage"
            checker.fail(path, f"{value!r} is {where}; init_from may name only an earlier stage ({earlier or 'none'})")
            return None
        if kind == "stage":
            close = difflib.get_close_matches(value, earlier, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            checker.fail(path, f"no earlier stage named {value!r}.{hint} Earlier stages: {earlier or 'none'}")
            return None
    if kind in ("auto", "dir"):
        if Path(value).is_dir():
            return ("dir", str(Path(value)))
        if kind == "dir":
            checker.fail(path, f"directory not found: {value!r} (relative to {Path.cwd()})")
            return None
    # A weights name (or a typo for any of the three): checked against zoo.registry in phase 2.
    return ("weights", value)


def check_stage_configs(recipe: Recipe) -> None:
    """Phase 2: validate each stage's model/data/eval against its stage type's dataclasses (torch-free)."""
    from zoo.stages import stage_configs

    checker = _Checker(str(recipe.path))
    weights_needed = [(i, s) for i, s in enumerate(recipe.stages) if s.init_source and s.init_source[0] == "weights"]
    if weights_needed:
        from zoo.registry import list_pretrained

        known = list_pretrained()
        for i, s in weights_needed:
            value = s.init_source[1]
            if value not in known:
                earlier = [t.name for t in recipe.stages[:i]]
                close = difflib.get_close_matches(value, earlier + known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                checker.fail(
                    f"stages[{i}].init_from",
                    f"{value!r} is not an earlier stage ({earlier or 'none'}), an existing directory, or a registered "
                    f"weights name (see `zoo list`).{hint}",
                )
    for i, stage in enumerate(recipe.stages):
        # The config dataclasses only: importing the stage module itself would load Lightning and torch (seconds).
        for section, cls in zip(("model", "data", "eval"), stage_configs(stage.type), strict=True):
            value = getattr(stage, section)
            if dataclasses.is_dataclass(value):
                continue  # already validated
            setattr(stage, section, checker.dataclass(value or {}, cls, f"stages[{i}].{section}"))
        # Length grouping needs each sample's length, which only some stage types' data report (their DataConfig
        # says so), and this is the place to say so: before any stage has run.
        if stage.group_by_length and not getattr(type(stage.data), "reports_sample_lengths", False):
            checker.fail(f"stages[{i}].group_by_length",
                         f"stage type {stage.type!r} does not report sample lengths, so it cannot group batches by "
                         "length; remove group_by_length (or set it to 0)")
        # Stages a stage reads besides init_from (Uni-MoE's expert_sources) must be earlier ones, like init_from.
        refs = getattr(stage.model, "earlier_stage_refs", None)
        if refs is not None:
            earlier = [t.name for t in recipe.stages[:i]]
            for key, name in refs():
                if name not in earlier:
                    checker.fail(f"stages[{i}].{key}", f"{name!r} is not an earlier stage ({earlier or 'none'})")
    if checker.problems:
        raise RecipeError(checker.problems)
