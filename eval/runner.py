"""The evaluation runner: tasks x model -> metrics, per-sample predictions, results.json and a Markdown table.

``run(model, tasks, ...)`` works with an in-memory model (what training recipes call after a stage) or a name or
directory resolved through ``zoo.load``. Per task: resolve data files, read documents, take the first ``limit``,
build prompts, generate in batches (tqdm progress bar), score with the task's scorer (a torchmetrics ``Metric``),
and record efficiency. Under ``torch.distributed`` every rank takes a strided shard of the documents, metrics are
reduced by torchmetrics and the per-sample records are gathered to rank 0, which writes the files.

Outputs in ``output_dir`` (lmms-eval's layout, so tools that read one read the other):
  results.json             ``results`` ({task: {"alias", "<metric>,none": value, "<metric>_stderr,none": "N/A"}}),
                           ``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``config``,
                           ``git_hash``, ``date``, timing fields, plus ``efficiency`` and ``environment``
  samples_<task>.jsonl     doc_id, doc (question, target, fields), arguments (prompt, generation settings),
                           resps, filtered_resps (parsed), per-sample score, unparsed flag
  results.md               the table printed at the end
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from eval.models import (
    GenerationStats,
    accepts_keyword,
    check_generative,
    count_parameters,
    read_generation_stats,
    resolve_model,
)
from eval.registry import (
    OUTPUT_TYPES,
    PROMPTS,
    READERS,
    SCORERS,
    Doc,
    TaskSpec,
    _load_builtin,
    expand_tasks,
    register_output_type,
    resolve_files,
)

__all__ = ["run", "format_table", "generate_until"]

log = logging.getLogger(__name__)


@register_output_type("generate_until")
def generate_until(
    model: Any, docs: Sequence[Doc], prompts: list[str], spec: TaskSpec, *, method: str | None = None
) -> list[str]:
    """Free-form generation: one answer string per prompt.

    Images go in the ``images`` argument as always; media of other kinds go in ``media=`` (only for batches that
    have some, see ``eval.models``), and ``method=`` only when a method was asked for.
    """
    loaded = [d.load_media() for d in docs]
    images = [_one_or_list(m.get("image", [])) for m in loaded]
    gen = dict(spec.generation)
    max_new_tokens = int(gen.pop("max_new_tokens", 16))
    other_kinds = sorted({kind for m in loaded for kind in m} - {"image"})
    if other_kinds:
        gen["media"] = {kind: [_one_or_list(m.get(kind, [])) for m in loaded] for kind in other_kinds}
    if method is not None:
        gen["method"] = method
    out = model.generate(images, prompts, max_new_tokens=max_new_tokens, **gen)
    if not isinstance(out, list | tuple) or len(out) != len(prompts):
        raise ValueError(f"{type(model).__name__}.generate returned {type(out).__name__} of length "
                         f"{len(out) if hasattr(out, '__len__') else '?'} for {len(prompts)} prompts")  # fmt: skip
    # LLaVA strips every decoded answer (``outputs.strip()``) before any scorer sees it.
    return [(o if isinstance(o, str) else str(o)).strip() for o in out]


def _one_or_list(items: list[Any]) -> Any:
    # The per-prompt entry of generate's image / media lists: None, one item, or a list of several.
    return None if not items else items[0] if len(items) == 1 else items


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(records: list[dict], world: int) -> list[dict]:
    if world == 1:
        return records
    parts: list[list[dict]] = [[] for _ in range(world)]
    torch.distributed.all_gather_object(parts, records)
    # Strided shards: interleave back into document order.
    out = []
    for i in range(max(len(p) for p in parts)):
        out += [p[i] for p in parts if i < len(p)]
    return out


class _Efficiency:
    """Accumulates wall-clock and (if the model reports them) prefill/decode timings over a task."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.samples = 0
        self.batches = 0
        self.stats: list[GenerationStats] = []

    def add(self, seconds: float, n: int, stats: GenerationStats | None) -> None:
        self.wall += seconds
        self.samples += n
        self.batches += 1
        if stats is not None:
            self.stats.append(stats)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "wall_seconds": round(self.wall, 4),
            "samples_per_second": round(self.samples / self.wall, 3) if self.wall > 0 else None,
            "ms_per_sample": round(1000 * self.wall / self.samples, 3) if self.samples else None,
        }
        if self.stats:
            prefill = sum(s.prefill_seconds for s in self.stats)
            decode = sum(s.decode_seconds for s in self.stats)
            gen_tokens = sum(s.generated_tokens for s in self.stats)
            # Decode steps: as reported, else estimated from tokens per sequence (see GenerationStats).
            steps = sum(
                s.decode_steps
                if s.decode_steps is not None
                else s.generated_tokens / max(s.batch_size or 1, 1)
                for s in self.stats
            )
            total = prefill + decode
            out |= {
                "prefill_latency_ms": round(1000 * prefill / len(self.stats), 3),  # per batch
                "decode_latency_ms": round(1000 * decode / steps, 3) if steps else None,  # per decode step
                "tokens_per_second": round(gen_tokens / total, 3) if total > 0 else None,
                "generated_tokens": gen_tokens,
                "decode_steps_estimated": any(s.decode_steps is None for s in self.stats),
            }
            # What a method measured (GenerationStats.extra, "<method>/<name>"): the mean over the batches.
            keys = sorted({k for s in self.stats for k in s.extra})
            if keys:
                out["method_metrics"] = {
                    k: round(sum(vals) / len(vals), 6)
                    for k in keys
                    for vals in [[s.extra[k] for s in self.stats if k in s.extra]]
                }
        return out


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", name).strip("_") or "model"


@lru_cache(maxsize=1)  # asked once per finished task (partial results)
def _git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("mmzoo", "torch", "torchmetrics", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return repr(o)


def _device(model: Any) -> str:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return str(p.device)
    return "cpu"


def _describe(obj: Any) -> Any:
    # Non-text outputs (images, tensors, dicts of them) are summarised in the predictions file, not dumped.
    if isinstance(obj, Mapping):
        return {str(k): _describe(v) for k, v in obj.items()}
    if isinstance(obj, str | int | float | bool | None):
        return obj
    shape = getattr(obj, "shape", None)
    if shape is None and not callable(getattr(obj, "size", None)):
        shape = getattr(obj, "size", None)  # PIL images: size is a tuple
    return f"<{type(obj).__name__} {tuple(shape)}>" if shape is not None else f"<{type(obj).__name__}>"


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _evaluate_task(
    model: Any,
    spec: TaskSpec,
    *,
    limit: int | None,
    batch_size: int,
    data_root: str | os.PathLike | None,
    data_roots: Mapping[str, str | os.PathLike] | None,
    progress: bool,
    method: str | None,
    on_batch: Callable[[TaskSpec, list[Doc], list[str]], None] | None = None,
    count_original: bool = False,
) -> tuple[dict[str, float], list[dict], dict[str, Any], int | None, int, Any]:
    for table, key, kind in ((READERS, spec.reader, "reader"), (PROMPTS, spec.prompt, "prompt builder"),
                             (SCORERS, spec.scorer, "scorer"), (OUTPUT_TYPES, spec.output_type, "output type")):  # fmt: skip
        if key not in table:
            raise KeyError(
                f"task {spec.name!r} ({spec.source}): unknown {kind} {key!r}; known: {sorted(table)}"
            )
    files = resolve_files(spec, data_root, data_roots)
    reader = READERS[spec.reader]
    # Readers that can stop early (generated data) take the limit.
    takes_limit = "limit" in inspect.signature(reader).parameters
    docs = reader(spec, files, limit=limit) if takes_limit else reader(spec, files)
    # A reader that stopped early does not know the full size: counted by a full read when asked (zoo eval does;
    # it costs about a second for a generated task), else recorded as unknown rather than guessed.
    n_original = len(docs)
    if takes_limit and limit is not None:
        n_original = len(reader(spec, files)) if count_original else None
    if limit is not None:
        docs = docs[:limit]
    rank, world = _dist()
    scorer = SCORERS[spec.scorer](spec, docs, **dict(spec.scorer_args))
    mine = docs[rank::world]
    build_prompt = PROMPTS[spec.prompt]
    call = OUTPUT_TYPES[spec.output_type]
    call_kwargs = {} if method is None else {"method": method}
    eff = _Efficiency()
    records: list[dict] = []
    batches = range(0, len(mine), batch_size)
    bar = tqdm(batches, desc=spec.name, unit="batch", disable=not progress or rank != 0, leave=False)
    for start in bar:
        batch = mine[start : start + batch_size]
        prompts = [build_prompt(d, spec) for d in batch]
        before = getattr(model, "last_generation_stats", None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            outputs = call(model, batch, prompts, spec, **call_kwargs)
        seconds = time.perf_counter() - t0
        after = getattr(model, "last_generation_stats", None)
        # Stats left over from an earlier call (the model did not report this one) are not counted again.
        eff.add(
            seconds, len(batch), None if after is None or after is before else read_generation_stats(model)
        )
        if on_batch is not None:  # e.g. attention pictures (eval.attention_log), after the scored call
            on_batch(spec, batch, prompts)
        for doc, prompt, out, rec in zip(batch, prompts, outputs, scorer.score(outputs, batch), strict=True):
            records.append({
                "doc_id": doc.doc_id,
                "doc": {"question": doc.question, "image": doc.image_ref(), "fields": dict(doc.fields),
                        **({"media": doc.media_refs()} if doc.media else {})},
                "target": doc.target,
                "arguments": {"prompt": prompt, "gen_kwargs": dict(spec.generation)},
                "resps": [_describe(out)],
                "filtered_resps": [rec.get("parsed")],
                "score": rec.get("score"),
                "unparsed": bool(rec.get("unparsed", False)),
            })  # fmt: skip
    bar.close()
    metrics = scorer.compute()
    return metrics, _gather(records, world), eff.summary(), n_original, len(docs), scorer


def run(
    model: Any,
    tasks: str | Sequence[str | TaskSpec],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    data_roots: Mapping[str, str | os.PathLike] | None = None,
    model_name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    log_samples: bool = True,
    progress: bool = True,
    print_table: bool = False,
    method: str | None = None,
    log_attention: int = 0,
    count_original: bool = False,
    load_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``tasks`` and return the results dict (also written to ``output_dir`` if given).

    Args:
        model: an object implementing :class:`eval.models.GenerativeModel`, or a weights name / checkpoint dir
            for ``zoo.load``.
        tasks: task or group names (``"shapes_vqa,shapes_pope"`` or a list), or :class:`TaskSpec` objects.
        limit: evaluate only the first ``limit`` documents of each task.
        batch_size: prompts per ``generate`` call.
        output_dir: where results.json, results.md and samples_<task>.jsonl go (nothing is written if None).
        data_root: replaces ``$MMZOO_DATA`` (the folder holding one sub-folder per benchmark).
        data_roots: per task or per benchmark folder name, the folder holding that task's files.
        model_name: the name recorded in the results (default: the given name or the model's class name).
        model_args: recorded in ``config.model_args``.
        log_samples: write the per-sample predictions JSONL.
        progress: show a tqdm bar per task.
        print_table: print the Markdown table at the end (the CLI does).
        method: a ``zoo.methods`` spec (``"none"``, ``"var:p=0.6"``) the model runs every ``generate`` call with;
            checked before the model loads, recorded as ``config.method`` and named in the table. None: the model's
            own behaviour, and ``generate`` gets no ``method`` argument.
        log_attention: write attention pictures for the first N documents of each task to
            ``output_dir/attention/`` (``eval.attention_log``; needs ``output_dir`` and a LLaVA-like model).
        count_original: with a ``limit``, also count the documents a generated task would have without it, for
            ``n-samples.original`` (a full read of the task; otherwise that count is None for generated tasks).
        load_kwargs: passed to ``zoo.load`` when ``model`` is a name or directory (``device=``, ``dtype=``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    start_time = time.time()
    _load_builtin()
    specs: list[TaskSpec] = []  # validated before the (possibly slow) model load
    for item in [tasks] if isinstance(tasks, str) else tasks:
        for spec in [item] if isinstance(item, TaskSpec) else expand_tasks(item):
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise ValueError("no eval tasks given")
    for spec in specs:
        resolve_files(
            spec, data_root, data_roots
        )  # a missing data file fails now, not after the model loaded
    if method is not None:
        method = _check_method(method, specs)
    rank, _ = _dist()
    if output_dir is not None and rank == 0:
        _check_writable(Path(output_dir))  # before the model loads and the tasks run, not after
    obj, resolved_name = resolve_model(model, **dict(load_kwargs or {}))
    name = model_name or resolved_name
    if any(s.output_type == "generate_until" for s in specs):
        check_generative(obj, name)
    if method is not None and not accepts_keyword(getattr(obj, "generate", None), "method"):
        raise ValueError(f"model {name!r} ({type(obj).__name__}): its generate takes no method=, so --method "
                         f"{method} cannot run on it")  # fmt: skip
    attention_log = None
    if log_attention > 0:
        if output_dir is None:
            raise ValueError("log_attention needs an output_dir to write the pictures to")
        from eval.attention_log import AttentionLogger

        attention_log = AttentionLogger(obj, Path(output_dir) / "attention", log_attention, method)
    was_training = getattr(obj, "training", None)
    if was_training:
        obj.eval()  # generation must not see dropout; restored below for recipes that keep training
    params = count_parameters(obj)
    results: dict[str, Any] = {
        "results": {}, "configs": {}, "versions": {}, "n-shot": {}, "higher_is_better": {}, "n-samples": {},
        "efficiency": {}, "primary_metric": {},
    }  # fmt: skip
    samples: dict[str, list[dict]] = {}
    try:
        for spec in specs:
            metrics, records, eff, n_orig, n_eff, scorer = _evaluate_task(
                obj, spec, limit=limit, batch_size=batch_size, data_root=data_root, data_roots=data_roots,
                progress=progress, method=method, on_batch=attention_log, count_original=count_original,
            )  # fmt: skip
            entry: dict[str, Any] = {"alias": spec.name}
            for key, value in metrics.items():
                entry[f"{key},none"] = _finite(value)
                if not key.startswith("n_"):
                    entry[f"{key}_stderr,none"] = "N/A"
            results["results"][spec.name] = entry
            results["configs"][spec.name] = spec.to_dict()
            if scorer.summed_groups:  # recorded beside the task's config, as lmms-eval records its aggregations
                results["configs"][spec.name]["summed_groups"] = {g: list(s) for g, s in scorer.summed_groups.items()}
            results["versions"][spec.name] = spec.version
            results["n-shot"][spec.name] = 0
            results["higher_is_better"][spec.name] = {
                k: scorer.higher_is_better
                for k in metrics
                if not k.startswith("n_") and k not in scorer.neutral
            }
            results["n-samples"][spec.name] = {"original": n_orig, "effective": n_eff}
            results["efficiency"][spec.name] = eff
            results["primary_metric"][spec.name] = scorer.primary
            write_artifacts = getattr(scorer, "write_artifacts", None)
            if output_dir is not None and rank == 0 and callable(write_artifacts):
                results.setdefault("artifacts", {})[spec.name] = write_artifacts(Path(output_dir))
            samples[spec.name] = records
            if output_dir is not None and rank == 0 and scorer.example_docs:
                from eval.examples import write_examples

                results.setdefault("examples", {})[spec.name] = write_examples(
                    Path(output_dir), spec.name, scorer.example_docs, records
                )
            log.info("%s: %s = %.2f", spec.name, scorer.primary, metrics.get(scorer.primary, float("nan")))
            if output_dir is not None and rank == 0:
                # Each finished task is on disk at once: a crash or kill in a later task loses only that task.
                pending = [s.name for s in specs if s.name not in results["results"]]
                _add_metadata(results, name, model_args, batch_size, limit, params, obj, method, start_time, pending)
                new = {spec.name: records} if log_samples else {}
                _write(Path(output_dir), results, new, format_table(results))
    finally:
        if was_training:
            obj.train()
    groups = group_scores(results)
    if groups:
        results["groups"] = groups
    _add_metadata(results, name, model_args, batch_size, limit, params, obj, method, start_time, [])
    if attention_log is not None:
        results["attention_log"] = attention_log.summary()
    from eval.examples import examples_markdown

    table = format_table(results) + examples_markdown(results.get("examples"))
    if output_dir is not None and rank == 0:
        _write(Path(output_dir), results, {}, table)  # every task's samples file was written as it finished
    if print_table and rank == 0:
        print(table, flush=True)
    return results


def group_scores(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """lmms-eval's ``groups``: per group evaluated with two or more member tasks, the mean over its members of each
    metric they all report (ShapesPOPE's and POPE's F1 over their three splits). Members weigh equally, as the
    papers average POPE's splits; ``members`` and the summed ``n_samples`` are recorded beside the means.

    Then the summed groups a task's scorer declares (``configs.<task>.summed_groups``): MME's ``mme_perception`` and
    ``mme_cognition``, whose ``score`` is the sum of the evaluated subtasks' scores (acc + acc+, 0-200 each), as
    MME's calculation.py and lmms-eval's MME aggregation total them; ``members`` are those subtasks."""
    members: dict[str, list[str]] = {}
    for task in results["results"]:
        group = results["configs"].get(task, {}).get("group")
        if group and group != task:
            members.setdefault(group, []).append(task)
    out: dict[str, dict[str, Any]] = {}
    for group, tasks in members.items():
        if len(tasks) < 2:  # a group of one task would repeat its numbers
            continue
        entries = [results["results"][t] for t in tasks]
        common = [k for k in entries[0] if k.endswith(",none") and "_stderr" not in k and not k.startswith("n_")
                  and all(isinstance(e.get(k), int | float) for e in entries)]  # fmt: skip
        entry: dict[str, Any] = {"alias": group, "members": tasks, "aggregation": "mean"}
        for key in common:
            entry[key] = sum(e[key] for e in entries) / len(entries)
        entry["n_samples,none"] = sum(e.get("n_samples,none", 0) for e in entries)
        primaries = {results["primary_metric"].get(t) for t in tasks}
        entry["primary_metric"] = primaries.pop() if len(primaries) == 1 else None
        out[group] = entry
    for task, config in results["configs"].items():
        scores = results["results"].get(task, {})
        for group, subtasks in config.get("summed_groups", {}).items():
            present = [s for s in subtasks if isinstance(scores.get(f"{s}_score,none"), int | float)]
            if not present:  # none of its subtasks was evaluated (--limit, a subtask filter): no total to report
                continue
            out[group] = {
                "alias": group, "task": task, "members": present, "aggregation": "sum",
                "score,none": sum(scores[f"{s}_score,none"] for s in present),
                "n_samples,none": sum(scores.get(f"n_{s},none", 0) for s in present),
                "primary_metric": "score",
            }  # fmt: skip
    return out


def _check_method(method: str, specs: Sequence[TaskSpec]) -> str:
    """The canonical spec of ``method`` (unknown names and options fail here, before any model loads)."""
    from zoo.methods import build_method

    canonical = build_method(method).spec()
    for spec in specs:
        call = OUTPUT_TYPES.get(spec.output_type)  # an unknown one is reported with the task's other pieces
        if call is not None and not accepts_keyword(call, "method"):
            raise ValueError(
                f"task {spec.name!r}: output type {spec.output_type!r} does not run methods (--method {canonical})"
            )
    return canonical


class UnwritableOutputError(ValueError):
    """The output folder cannot be created or written; raised before the model loads."""


def _check_writable(out: Path) -> None:
    from zoo.registry import writable_folder_error

    why = writable_folder_error(out)
    if why is not None:
        raise UnwritableOutputError(
            f"output folder {out} is not writable ({why}); pass --output-dir DIR with a writable folder"
        )


def _add_metadata(
    results: dict, name: str, model_args: Mapping[str, Any] | None, batch_size: int, limit: int | None,
    params: Any, obj: Any, method: str | None, start_time: float, pending: list[str],
) -> None:
    """The run's config and provenance; ``tasks_pending`` lists the tasks not evaluated yet (partial results)."""
    end_time = time.time()
    results["config"] = {
        "model": name, "model_args": dict(model_args or {}), "batch_size": batch_size, "limit": limit,
        "parameters": params, "device": _device(obj), "method": method,
    }  # fmt: skip
    results |= {
        "model_name": name,
        "model_name_sanitized": _sanitize(name),
        "git_hash": _git_hash(),
        "date": datetime.fromtimestamp(start_time, tz=timezone.utc).strftime("%Y%m%d_%H%M%S"),
        "start_time": start_time,
        "end_time": end_time,
        "total_evaluation_time_seconds": str(round(end_time - start_time, 3)),
        "environment": _versions(),
    }
    if pending:
        results["tasks_pending"] = pending
    else:
        results.pop("tasks_pending", None)


def _write(out: Path, results: dict, samples: Mapping[str, list[dict]], table: str) -> None:
    from zoo.registry import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=_json_default, allow_nan=False)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text + "\n"))
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    for task, records in samples.items():
        lines = "".join(json.dumps(r, default=_json_default) + "\n" for r in records)
        atomic_write(out / f"samples_{task}.jsonl", lambda tmp, lines=lines: Path(tmp).write_text(lines))


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(results: Mapping[str, Any]) -> str:
    """The Markdown summary: one row per task with its headline metric, counts and efficiency."""
    params = results.get("config", {}).get("parameters", {})
    total, active = params.get("total"), params.get("active")
    head = f"**{results.get('model_name', results.get('config', {}).get('model', '?'))}**"
    method = results.get("config", {}).get("method")
    if method is not None:
        head += f" - method: `{method}`"
    if total is not None:
        note = "" if params.get("active_reported") else " (not reported by the model: dense count)"
        head += f" - parameters: {total / 1e6:.3f}M total, {active / 1e6:.3f}M active{note}"
    lines = [
        head,
        "",
        "| Task | Metric | Value | Other metrics | n | unparsed | prefill ms/batch | decode ms/step | tok/s | samples/s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task, entry in results["results"].items():
        primary = results.get("primary_metric", {}).get(task, "accuracy")
        eff = results.get("efficiency", {}).get(task, {})
        others = [
            f"{k.split(',')[0]}={_fmt(v)}" for k, v in entry.items()
            if k.endswith(",none") and "_stderr" not in k and not k.startswith("n_") and k.split(",")[0] != primary
        ]  # fmt: skip
        # Whole-task numbers (MME's cognition total, POPE's precision) before per-subtask ones (artwork_acc_plus),
        # which are named <subtask>_<metric>: the six that fit are the ones a reader looks for.
        others = sorted(others, key=lambda text: "_" in text.split("=")[0])[:6]
        lines.append(
            f"| {task} | {primary} | {_fmt(entry.get(f'{primary},none'))} | {', '.join(others) or '-'} "
            f"| {_fmt(entry.get('n_samples,none'), 0)} | {_fmt(entry.get('n_unparsed,none'), 0)} "
            f"| {_fmt(eff.get('prefill_latency_ms'))} | {_fmt(eff.get('decode_latency_ms'))} "
            f"| {_fmt(eff.get('tokens_per_second'), 1)} | {_fmt(eff.get('samples_per_second'), 1)} |"
        )
    for group, entry in results.get("groups", {}).items():
        primary = entry.get("primary_metric") or "-"
        others = [f"{k.split(',')[0]}={_fmt(v)}" for k, v in entry.items() if k.endswith(",none")
                  and not k.startswith("n_") and k.split(",")[0] != primary][:6]  # fmt: skip
        if entry.get("aggregation") == "sum":
            n = len(entry["members"])
            label = f"sum of {n} {entry.get('task', '')} subtask{'' if n == 1 else 's'}"
        else:
            label = f"mean of {len(entry['members'])}"
        lines.append(
            f"| **{group}** ({label}) | {primary} | {_fmt(entry.get(f'{primary},none'))} "
            f"| {', '.join(others) or '-'} | {_fmt(entry.get('n_samples,none'), 0)} | - | - | - | - | - |"
        )
    return "\n".join(lines + _method_metrics_table(results))


def _method_metrics_table(results: Mapping[str, Any]) -> list[str]:
    """What the method measured per task (``efficiency.<task>.method_metrics``: exit layer, prefill FLOPs, ...)."""
    per_task = {t: e["method_metrics"] for t, e in results.get("efficiency", {}).items() if e.get("method_metrics")}
    if not per_task:
        return []
    names = sorted({k for m in per_task.values() for k in m})
    lines = ["", "| Task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task, metrics in per_task.items():
        lines.append(f"| {task} | " + " | ".join(_fmt(metrics.get(n), 4) for n in names) + " |")
    return lines
