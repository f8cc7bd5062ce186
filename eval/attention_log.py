"""``zoo eval --log-attention N``: attention pictures (``zoo attend``'s grid) for the first N documents of each task.

Each picture comes from one extra ``generate`` call on the document alone, with VAR recording its maps: the run's
own VAR settings when ``--method var...`` is given, else the official ones (``var``). The scored answers come from
the normal batched calls, so logging pictures never changes a result. Documents without exactly one image are
skipped and counted.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from eval.registry import Doc, TaskSpec

__all__ = ["AttentionLogger"]


class AttentionLogger:
    """Called with each batch of a task (``spec, docs, prompts``); writes ``<folder>/<task>_<doc_id>.png``.

    Args:
        model: a LLaVA-like zoo model (``llm`` and ``generate(..., method=)``).
        folder: where the pictures go (created on the first one).
        per_task: pictures per task.
        method: the run's method spec; a ``var`` spec is reused, anything else draws with the official VAR.
    """

    def __init__(self, model: Any, folder: Path, per_task: int, method: str | None) -> None:
        if not hasattr(model, "llm") or not hasattr(model, "generate"):
            raise ValueError(f"--log-attention needs a LLaVA-like zoo model (with an `llm`); got {type(model).__name__}")
        self.model, self.folder, self.per_task = model, Path(folder), per_task
        self.spec = method if method is not None and method.split(":", 1)[0] == "var" else "var"
        self.written: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.paths: list[Path] = []

    def __call__(self, spec: TaskSpec, docs: list[Doc], prompts: list[str]) -> None:
        from zoo.attend import save_attention_figure
        from zoo.methods import build_method

        for doc, prompt in zip(docs, prompts):
            if self.written[spec.name] >= self.per_task:
                return
            images = doc.load_media().get("image", [])
            if len(images) != 1:
                self.skipped[spec.name] += 1
                continue
            method = build_method(self.spec + (":" if ":" not in self.spec else ",") + "record=true")
            max_new = int(dict(spec.generation).get("max_new_tokens", 16))
            answer = self.model.generate(images, [prompt], max_new_tokens=max_new, method=method)[0]
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{spec.name}_{doc.doc_id}")
            title = f"{spec.name} {doc.doc_id} | Q: {doc.question} | target: {doc.target} | A with VAR: {answer!r}"
            pad = bool(getattr(getattr(self.model, "cfg", None), "pad_to_square", True))
            self.paths.append(
                save_attention_figure(self.folder / f"{name}.png", images[0], method.last_state, 0, title, pad)
            )
            self.written[spec.name] += 1

    def summary(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "written": dict(self.written), "skipped_not_one_image": dict(self.skipped)}
