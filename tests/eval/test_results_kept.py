"""Issue 19: evaluation results are never lost at the end (unwritable folder checked first, partial results kept)."""

from __future__ import annotations

import json

import pytest

import eval

SHAPES = "shapes_vqa,shapes_pope"


class CountingModel:
    def __init__(self, fail_after_calls: int | None = None) -> None:
        self.calls, self.fail_after_calls = 0, fail_after_calls

    def generate(self, images, prompts, max_new_tokens=16, **gen):
        self.calls += 1
        if self.fail_after_calls is not None and self.calls > self.fail_after_calls:
            raise RuntimeError("the GPU fell over")
        return ["yes"] * len(prompts)


def test_unwritable_output_folder_fails_before_any_generation(tmp_path):
    from eval.runner import UnwritableOutputError

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model = CountingModel()
    with pytest.raises(UnwritableOutputError, match=f"output folder {blocker / 'out'} is not writable"):
        eval.run(model, SHAPES, limit=4, output_dir=blocker / "out", progress=False)
    assert model.calls == 0


def test_cli_reports_an_unwritable_folder_in_one_line(tmp_path, monkeypatch, capsys):
    import zoo
    from eval.cli import main

    model = CountingModel()
    monkeypatch.setattr(zoo, "load", lambda name, **load_kwargs: model)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = ["--model", "moe_llava_tiny.shapes", "--tasks", SHAPES, "--limit", "4", "--output-dir", str(blocker / "o")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err and model.calls == 0


def test_finished_tasks_are_on_disk_when_a_later_task_crashes(tmp_path):
    model = CountingModel(fail_after_calls=2)  # shapes_vqa takes 2 calls of 2 prompts; the next task crashes
    with pytest.raises(RuntimeError, match="fell over"):
        eval.run(model, SHAPES, limit=4, batch_size=2, output_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["results"]) == ["shapes_vqa"]
    assert saved["results"]["shapes_vqa"]["n_samples,none"] == 4
    assert saved["tasks_pending"] == ["shapes_pope_adversarial", "shapes_pope_popular", "shapes_pope_random"]
    assert len((tmp_path / "samples_shapes_vqa.jsonl").read_text().splitlines()) == 4
    assert "shapes_vqa" in (tmp_path / "results.md").read_text()
    # A run that finishes has no pending tasks left in its results.
    eval.run(CountingModel(), SHAPES, limit=4, batch_size=2, output_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "tasks_pending" not in saved and len(saved["results"]) == 4
