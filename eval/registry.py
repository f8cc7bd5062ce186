"""The task registry: declarative task entries plus named readers, prompt builders and scorers.

A task (:class:`TaskSpec`) says where its data is (reader + files relative to a data root), which split, how a
document becomes a prompt, how to generate, and which scorer turns predictions into metrics. It names its code
pieces by registry keys instead of ``!function`` tags (lmms-eval's), so a YAML entry round-trips.

How to add a benchmark
----------------------
1. If the data format is new, write a reader ``@register_reader("fmt")`` ``fn(spec, files) -> list[Doc]``, where
   ``files`` maps each key of ``spec.files`` to a resolved ``Path`` (missing ones were already reported by name).
   Synthetic tasks declare no files and get ``{}``; a reader that can stop early (generated data) may take a
   ``limit=`` keyword, which the runner then passes.
2. If the prompt layout is new, a builder ``@register_prompt("name")`` ``fn(doc, spec) -> str``; the default
   ``question`` builder is ``pre_prompt + doc.question + post_prompt``.
3. If the scoring is new, a :class:`eval.scorers.Scorer` subclass ``@register_scorer("name")``: a torchmetrics
   ``Metric`` plus a per-sample record for the predictions file.
4. Write ``eval/tasks/<bench>/<task>.yaml`` (keys = the fields of :class:`TaskSpec`; ``include: _template.yaml``
   merges a shared template from the same folder; files starting with ``_`` are templates, not tasks), or call
   ``register_task(TaskSpec(...))`` from Python (what another family does from its own module, e.g. image-generation
   tasks with their own ``output_type`` registered by ``@register_output_type``); list that module in
   ``PLUGIN_MODULES`` so that ``zoo eval --tasks`` finds its tasks.
5. Freeze its prompt in ``tests/eval/test_prompts.py``.

A family whose model does not answer text (e.g. class-conditional image generation) registers the call too::

    @register_output_type("sample_images")
    def sample_images(model, docs, prompts, spec):      # -> one output per doc, handed to the scorer
        return model.sample([d.target for d in docs], **spec.generation)

    register_task(TaskSpec(name="imagenet_fid_tiny", reader="class_labels", output_type="sample_images",
                           scorer="fid", generation={"num_steps": 50}))

Models are only required to have ``generate`` when a ``generate_until`` task is requested; outputs that are not
text are summarised (type and shape) in the predictions file. A scorer with a ``write_artifacts(out_dir) -> dict``
method (sample grids, plots) is called when the run has an output directory; what it returns is recorded under
``artifacts`` in results.json.

Data roots never live in code: a task with files is looked up, in order, in the ``data_roots`` mapping passed to
``eval.run`` (keyed by task name or by ``data_subdir``), the task's own environment variable (``data_env``), and
``<data_root or $MMZOO_DATA>/<data_subdir>``.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import importlib.util
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

__all__ = [
    "Doc",
    "TaskSpec",
    "register_task",
    "register_reader",
    "register_prompt",
    "register_scorer",
    "register_output_type",
    "get_task",
    "list_tasks",
    "load_task_yaml",
    "resolve_files",
    "READERS",
    "PROMPTS",
    "SCORERS",
    "OUTPUT_TYPES",
    "TASKS_DIR",
]

TASKS_DIR = Path(__file__).parent / "tasks"
# Modules imported with the built-in tasks because they call register_task themselves (see "How to add").
PLUGIN_MODULES: tuple[str, ...] = ("eval.generation.tasks", "eval.av", "eval.refseg")


@dataclass(frozen=True, kw_only=True)
class Doc:
    """One evaluation sample.

    Attributes:
        doc_id: unique within its task (the official question id where there is one).
        question: the question text as the dataset gives it (prompt builders add the rest).
        target: the gold answer in the form the task's scorer expects (JSON-serialisable).
        image: the common case of one image: a path, a PIL image, encoded image bytes, a zero-argument callable
            returning a PIL image, or None.
        media: items of any modality by name (``{"audio": [clip], "video": [frames]}``; ``"image"`` for several
            images), one list per modality, in the order their placeholders appear. An item is the value the model's
            modality prepares (a waveform, a frame stack...) or a zero-argument callable returning it, so that
            readers stay lazy; ``"image"`` items take every form ``image`` takes. ``image`` and ``media["image"]``
            are exclusive.
        fields: anything else the prompt or scorer needs (answer types, options, categories, group ids...).
        source: ``file:record`` for error messages.
    """

    doc_id: str
    question: str
    target: Any
    image: Any = None
    media: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    fields: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        for kind, items in self.media.items():
            if not isinstance(items, list | tuple):
                raise ValueError(
                    f"{self.source}: field 'media[{kind!r}]' must be a list of items, got {type(items).__name__}"
                )
        if self.image is not None and self.media.get("image"):
            raise ValueError(f"{self.source}: both 'image' and 'media[\'image\']' are set; use one")

    def load_image(self) -> Image.Image | None:
        """The ``image`` field, decoded (None when the document has no single image)."""
        return None if self.image is None else _open_image(self.image, self.source, "image")

    def load_media(self) -> dict[str, list[Any]]:
        """Every media item of the document, loaded, by modality (``image`` included); no entry for absent kinds."""
        out: dict[str, list[Any]] = {"image": [self.load_image()]} if self.image is not None else {}
        for kind, items in self.media.items():
            if kind == "image":
                out[kind] = [_open_image(x, self.source, f"media['image'][{k}]") for k, x in enumerate(items)]
            elif items:
                out[kind] = [x() if callable(x) else x for x in items]
        return {k: v for k, v in out.items() if v}

    def image_ref(self) -> str | None:
        """What the predictions file records for the image."""
        return None if self.image is None else _media_ref(self.image)

    def media_refs(self) -> dict[str, list[str]]:
        """What the predictions file records for ``media``: paths as given, in-memory items by type."""
        return {kind: [_media_ref(x) for x in items] for kind, items in self.media.items() if items}


def _media_ref(item: Any) -> str:
    if isinstance(item, str | os.PathLike):
        return str(item)
    return f"<in-memory {type(item).__name__}>"


def _open_image(img: Any, source: str, where: str) -> Image.Image:
    if callable(img):
        img = img()
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, bytes | bytearray):
        try:
            return Image.open(io.BytesIO(img)).convert("RGB")
        except Exception as e:
            raise ValueError(f"{source}: field {where!r} is not a decodable image ({e})") from e
    path = Path(img)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: image file {path} does not exist (check the data root)")
    with Image.open(path) as im:
        return im.convert("RGB")


def decode_base64_image(data: str) -> bytes:
    return base64.b64decode(data, validate=True)


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A declarative benchmark entry (the fields a task YAML may set)."""

    name: str
    reader: str
    scorer: str
    files: Mapping[str, str] = field(default_factory=dict)
    data_env: str | None = None
    data_subdir: str = ""
    split: str = "test"
    reader_args: Mapping[str, Any] = field(default_factory=dict)
    prompt: str = "question"
    pre_prompt: str = ""
    post_prompt: str = ""
    prompt_args: Mapping[str, Any] = field(default_factory=dict)
    output_type: str = "generate_until"
    generation: Mapping[str, Any] = field(default_factory=lambda: {"max_new_tokens": 16, "do_sample": False})
    scorer_args: Mapping[str, Any] = field(default_factory=dict)
    group: str | None = None
    # How many of the first documents the run report shows with their media (eval/examples.py); 0 = none.
    examples: int = 0
    version: int | str = 1
    description: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


READERS: dict[str, Callable[..., list[Doc]]] = {}
PROMPTS: dict[str, Callable[[Doc, TaskSpec], str]] = {}
SCORERS: dict[str, type] = {}
OUTPUT_TYPES: dict[str, Callable[..., Any]] = {}
_TASKS: dict[str, TaskSpec] = {}
_yaml_loaded = False


def _registrar(table: dict[str, Any], kind: str):
    def register(name: str):
        def wrap(obj):
            if name in table and table[name] is not obj:
                raise ValueError(f"{kind} {name!r} is registered twice")
            table[name] = obj
            return obj

        return wrap

    return register


register_reader = _registrar(READERS, "reader")
register_prompt = _registrar(PROMPTS, "prompt builder")
register_scorer = _registrar(SCORERS, "scorer")
register_output_type = _registrar(OUTPUT_TYPES, "output type")


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in _TASKS and _TASKS[spec.name] != spec:
        raise ValueError(
            f"task {spec.name!r} is registered twice ({_TASKS[spec.name].source} and {spec.source})"
        )
    _TASKS[spec.name] = spec
    return spec


_FIELDS = {f.name for f in dataclasses.fields(TaskSpec)}
_ALIASES = {"task": "name"}  # lmms-eval spells the name "task"


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ValueError(f"{path}: include cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise FileNotFoundError(f"{seen[-1] if seen else path}: included file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a task file must be a mapping, got {type(raw).__name__}")
    include = raw.pop("include", None)
    if include is not None:
        raw = _deep_merge(_read_yaml(path.parent / include, (*seen, path)), raw)
    return raw


def load_task_yaml(path: str | os.PathLike) -> TaskSpec:
    """Read one task YAML (with its ``include`` chain) into a :class:`TaskSpec`; errors name file and key."""
    path = Path(path)
    raw = {_ALIASES.get(k, k): v for k, v in _read_yaml(path).items()}
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_FIELDS - {'source'})}")
    for key in ("name", "reader", "scorer"):
        if key not in raw:
            raise ValueError(f"{path}: missing required key {key!r}")
    for key in ("files", "reader_args", "prompt_args", "generation", "scorer_args"):
        if key in raw and not isinstance(raw[key], dict):
            raise ValueError(f"{path}: key {key!r} must be a mapping, got {type(raw[key]).__name__}")
    return TaskSpec(**raw, source=str(path))


def _load_builtin() -> None:
    global _yaml_loaded
    if _yaml_loaded:
        return
    _yaml_loaded = True
    # Importing these registers the built-in readers, prompt builders, scorers and output types.
    import eval.prompts  # noqa: F401
    import eval.readers  # noqa: F401
    import eval.runner  # noqa: F401
    import eval.scorers  # noqa: F401
    import eval.shapes  # noqa: F401

    for path in sorted(TASKS_DIR.rglob("*.yaml")):
        if not path.name.startswith("_"):
            register_task(load_task_yaml(path))
    # Families that register their tasks from Python; a module that is not there is skipped, one that fails to
    # import raises (never hidden).
    for module in PLUGIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def get_task(name: str) -> TaskSpec:
    _load_builtin()
    if name not in _TASKS:
        raise KeyError(f"unknown eval task {name!r}; known: {', '.join(list_tasks())}")
    return _TASKS[name]


def list_tasks(group: str | None = None) -> list[str]:
    _load_builtin()
    return sorted(n for n, s in _TASKS.items() if group is None or s.group == group)


def expand_tasks(names: str | list[str]) -> list[TaskSpec]:
    """Task names or group names (comma-separated string or list) -> specs, in order, without duplicates."""
    _load_builtin()
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    out: list[TaskSpec] = []
    for item in items:
        members = [get_task(item)] if item in _TASKS else [_TASKS[n] for n in list_tasks(group=item)]
        if not members:
            raise KeyError(f"unknown eval task or group {item!r}; tasks: {', '.join(list_tasks())}")
        out += [m for m in members if m not in out]
    return out


def resolve_files(
    spec: TaskSpec,
    data_root: str | os.PathLike | None = None,
    data_roots: Mapping[str, str | os.PathLike] | None = None,
) -> dict[str, Path]:
    """Resolve ``spec.files`` against the task's data root; a missing root or file raises with how to fix it."""
    if not spec.files:
        return {}
    data_roots = data_roots or {}
    root: Path | None = None
    how = ""
    for key in (spec.name, spec.data_subdir):
        if key and key in data_roots:
            root, how = Path(data_roots[key]), f"data_roots[{key!r}]"
            break
    if root is None and spec.data_env and os.environ.get(spec.data_env):
        root, how = Path(os.environ[spec.data_env]), f"${spec.data_env}"
    if root is None:
        base = data_root if data_root is not None else os.environ.get("MMZOO_DATA")
        if base:
            root, how = Path(base) / spec.data_subdir, "data root" if data_root is not None else "$MMZOO_DATA"
    if root is None:
        env = f"set {spec.data_env}=/path/to/{spec.data_subdir or spec.name} or " if spec.data_env else ""
        raise FileNotFoundError(
            f"task {spec.name!r} needs its data files: {env}set MMZOO_DATA=/path/holding/{spec.data_subdir}/ "
            "or pass --data-root"
        )
    out: dict[str, Path] = {}
    for key, rel in spec.files.items():
        path = root / rel
        if not path.exists():
            raise FileNotFoundError(f"task {spec.name!r}: {key} file {path} does not exist (root from {how})")
        out[key] = path
    return out
