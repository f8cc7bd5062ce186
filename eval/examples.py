"""The first few examples of a task, as files a person can open from the run report.

A task opts in with ``examples: N`` in its YAML (``TaskSpec.examples``; the audio, video and speech tasks show 3).
For each of its first N documents :func:`write_examples` writes under ``<output_dir>/examples/<task>/`` the image
(PNG), each video as an animated GIF and a strip PNG, each audio item (a 1-D waveform at 16 kHz) as a spectrogram
PNG (``data.show``) and a WAV, and returns what it wrote; an item of another type is listed as not drawable.
:func:`examples_markdown` turns that into the "Examples" section appended to ``results.md``, one line per document
with the question, the gold answer, the prediction and links.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eval.registry import Doc

__all__ = ["write_examples", "examples_markdown"]


def write_examples(out_dir: Path, task: str, docs: Sequence[Doc], records: Sequence[Mapping[str, Any]]
                   ) -> list[dict[str, Any]]:  # fmt: skip
    from data.show import write_gif, write_spectrogram, write_strip
    from data.speech import write_wav

    predictions = {r["doc_id"]: r.get("resps", [None])[0] for r in records}
    folder = out_dir / "examples" / task
    out = []
    for k, doc in enumerate(docs):
        files: list[str] = []
        not_drawable: list[str] = []
        for kind, items in doc.load_media().items():
            for j, item in enumerate(items):
                stem = folder / f"{k}_{kind}{j}"
                if kind == "image":
                    stem.parent.mkdir(parents=True, exist_ok=True)
                    item.save(stem.with_suffix(".png"))
                    files.append(stem.with_suffix(".png"))
                elif isinstance(item, list | tuple) and item and all(isinstance(f, Image.Image) for f in item):
                    files += [write_gif(item, stem.with_suffix(".gif")), write_strip(item, stem.with_suffix(".png"))]
                elif isinstance(item, np.ndarray) and item.ndim == 1 and len(item) >= 400:  # a waveform
                    wave = item.astype(np.float32)
                    files.append(write_spectrogram(wave, stem.with_suffix(".png"), title=f"{task} {doc.doc_id}"))
                    stem.parent.mkdir(parents=True, exist_ok=True)
                    write_wav(stem.with_suffix(".wav"), wave)
                    files.append(stem.with_suffix(".wav"))
                else:
                    not_drawable.append(f"{kind}[{j}]: {type(item).__name__}")
        out.append({
            "doc_id": doc.doc_id, "question": doc.question or doc.fields.get("transcript", ""), "target": doc.target,
            "prediction": predictions.get(doc.doc_id), "files": [str(Path(f).relative_to(out_dir)) for f in files], "not_drawable": not_drawable,
        })  # fmt: skip
    return out


def examples_markdown(examples: Mapping[str, Sequence[Mapping[str, Any]]] | None) -> str:
    if not examples:
        return ""
    lines = ["", "### Examples", ""]
    for task, items in examples.items():
        for e in items:
            links = ", ".join(f"[{Path(f).suffix[1:]} {Path(f).stem.split('_', 1)[1]}]({f})" for f in e["files"])
            extra = f" (not drawable: {', '.join(e['not_drawable'])})" if e["not_drawable"] else ""
            lines.append(f"- {task} `{e['doc_id']}`: {e['question']!r} -> gold {e['target']!r}, "
                         f"predicted {e['prediction']!r}: {links or '-'}{extra}")  # fmt: skip
    return "\n".join(lines)
