"""`zoo eval` as an lmms-eval user types it: flag aliases, groups, n-samples.original, errors on stderr, fast name
checks that never import torch, the name indexes in step with the registries, and the routing heatmap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo import registry

ROOT = Path(__file__).resolve().parents[2]


class ParityModel:
    """Says "yes" to every other prompt, so the three POPE splits score differently."""

    def generate(self, images, prompts, max_new_tokens=16, **gen):
        self.max_new_tokens = max_new_tokens
        return ["Yes" if sum(map(ord, p)) % 2 else "No" for p in prompts]


@pytest.fixture
def fake_model(monkeypatch):
    import zoo

    model = ParityModel()
    monkeypatch.setattr(zoo, "load", lambda name, **kw: model)
    monkeypatch.setitem(registry._WEIGHTS, "fake.tag", registry.WeightsCfg(file="/nonexistent"))
    return model


def test_lmms_eval_flags_groups_and_original_counts(fake_model, tmp_path, capsys):
    from eval.cli import main
    from eval.registry import READERS, get_task, resolve_files

    out = tmp_path / "out"
    code = main(["--model_args", "pretrained=fake.tag", "--tasks", "shapes_pope", "--limit", "6", "--batch_size", "3",
                 "--output_path", str(out), "--log_samples", "--gen_kwargs", "max_new_tokens=3", "--seed", "1"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| **shapes_pope** (mean of 3) | f1 |" in printed
    results = json.loads((out / "results.json").read_text())
    f1s = [results["results"][f"shapes_pope_{s}"]["f1,none"] for s in ("adversarial", "popular", "random")]
    assert len(set(f1s)) > 1  # the splits differ, so the mean is a real mean
    group = results["groups"]["shapes_pope"]
    assert group["f1,none"] == pytest.approx(sum(f1s) / 3)
    assert group["members"] == ["shapes_pope_adversarial", "shapes_pope_popular", "shapes_pope_random"]
    assert group["n_samples,none"] == 18
    spec = get_task("shapes_pope_random")
    full = len(READERS[spec.reader](spec, resolve_files(spec, None, None)))
    assert results["n-samples"]["shapes_pope_random"] == {"original": full, "effective": 6} and full > 6
    assert fake_model.max_new_tokens == 3
    sample = json.loads((out / "samples_shapes_pope_random.jsonl").read_text().splitlines()[0])
    assert sample["arguments"]["gen_kwargs"]["max_new_tokens"] == 3


def test_include_path_registers_extra_task_files(fake_model, tmp_path, capsys, monkeypatch):
    import eval.registry
    from eval.cli import main

    eval.registry._load_builtin()
    monkeypatch.setattr(eval.registry, "_TASKS", dict(eval.registry._TASKS))  # the extra task leaves with the test

    extra = tmp_path / "my_tasks"
    extra.mkdir()
    shapes = (ROOT / "eval" / "tasks" / "shapes" / "shapes_vqa.yaml").read_text()
    (extra / "my_shapes.yaml").write_text(shapes.replace("shapes_vqa\n", "my_shapes_vqa\n", 1))
    assert "my_shapes_vqa" in (extra / "my_shapes.yaml").read_text()
    out = tmp_path / "out"
    assert main(["--model", "fake.tag", "--tasks", "my_shapes_vqa", "--limit", "2", "--include_path", str(extra),
                 "--output-dir", str(out)]) == 0  # fmt: skip
    assert "my_shapes_vqa" in json.loads((out / "results.json").read_text())["results"]


def test_typos_are_named_on_stderr_with_a_suggestion(capsys):
    from eval.cli import main

    assert main(["--model", "moe_llava_tiny.shapez"]) == 2
    err = capsys.readouterr()
    assert "unknown model 'moe_llava_tiny.shapez'. Did you mean moe_llava_tiny.shapes," in err.err and not err.out
    assert main(["--model", "moe_llava_tiny.shapes", "--tasks", "shapes_vqa,shapes_poppe"]) == 2
    assert "unknown task 'shapes_poppe'. Did you mean shapes_pope" in capsys.readouterr().err
    assert main(["--model", "fake.tag", "--gen_kwargs", "max_new_tokens"]) == 2
    assert "is not key=value" in capsys.readouterr().err


def test_listing_and_name_errors_never_import_torch(tmp_path):
    """What makes them answer in well under 2 s: no torch, no model family (timings are in the closing note)."""
    code = (
        "import sys, contextlib, io\n"
        "from zoo import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    for argv in (['list'], ['list', '--pretrained'], ['list', '--tasks'], ['list', '--recipes'],\n"
        "                 ['eval', '--list'], ['eval', '--model', 'nosuch.tag'],\n"
        "                 ['eval', '--model', 'moe_llava_tiny.shapes', '--tasks', 'nosuch']):\n"
        "        cli.main(argv)\n"
        "    for argv in (['sample', '--help'], ['chat', '--help'], ['eval', '--help']):\n"
        "        try:\n"
        "            cli.main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'zoo.models') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_name_indexes_match_the_registries():
    """zoo.model_index and eval.task_index are fast copies; regenerate with `python -m zoo.model_index` /
    `python -m eval.task_index` when this fails."""
    from eval import task_index
    from zoo import model_index

    # Rendered in a fresh interpreter: other tests of this session may have registered test-only models or tasks.
    code = "from zoo import model_index; from eval import task_index; print(model_index.render() + '\\0' + task_index.render())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    models, tasks = out.stdout.rstrip("\n").split("\0")
    assert models.rstrip("\n") == (ROOT / "zoo" / "model_index.py").read_text().rstrip("\n"), "run: python -m zoo.model_index"
    assert tasks.rstrip("\n") == (ROOT / "eval" / "task_index.py").read_text().rstrip("\n"), "run: python -m eval.task_index"
    assert model_index.MODEL_FAMILIES["moe_llava_tiny"] == "moe_llava"
    assert task_index.GROUPS["shapes_pope"] == ["shapes_pope_adversarial", "shapes_pope_popular", "shapes_pope_random"]


def test_routing_by_modality_counts_every_choice_of_every_token(tmp_path):
    import numpy as np

    import zoo
    from eval.registry import PROMPTS, READERS, get_task, resolve_files
    from eval.routing_report import routing_by_modality, save_routing_by_modality

    model = zoo.load("moe_llava_tiny.shapes")
    spec = get_task("shapes_vqa")
    docs = READERS[spec.reader](spec, resolve_files(spec, None, None), limit=3)[:3]
    prompts = [PROMPTS[spec.prompt](d, spec) for d in docs]
    counts = routing_by_modality(model, [d.load_image() for d in docs], prompts)
    inputs = model.build_generation_inputs([d.load_image() for d in docs], prompts)
    real = inputs["attention_mask"].bool()
    n_image = int((model.image_mask(inputs["input_ids"]) & real).sum())
    n_text = int(real.sum()) - n_image
    top_k = 2
    assert counts["layers"] and counts["image"].shape == counts["text"].shape == (len(counts["layers"]), 4)
    assert (counts["image"].sum(axis=1) == n_image * top_k).all() and n_image == 3 * 64
    assert (counts["text"].sum(axis=1) == n_text * top_k).all()
    assert not np.array_equal(counts["image"], counts["text"])  # the two modalities route differently
    png = save_routing_by_modality(counts, tmp_path / "routing.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_shows_mme_totals_before_its_subtasks():
    from eval.runner import format_table

    entry = {f"{t}_{m},none": 50.0 for t in ("artwork", "celebrity", "code_reasoning") for m in ("acc", "acc_plus")}
    entry |= {"perception,none": 1234.5, "cognition,none": 321.0, "n_samples,none": 10}
    table = format_table({"results": {"mme": entry}, "primary_metric": {"mme": "perception"}})
    row = next(line for line in table.splitlines() if line.startswith("| mme |"))
    assert "| perception | 1234.50 | cognition=321.00, artwork_acc=50.00" in row


def test_mme_totals_are_summed_groups_in_results_and_table(tmp_path, capsys):
    """MME's perception / cognition totals as lmms-eval reports them: per group, the sum over its evaluated
    subtasks of acc + acc+ (0-200 each), computed here by hand from the fixture's documents."""
    import dataclasses

    import eval
    from eval.metrics import MME_COGNITION, MME_PERCEPTION
    from eval.registry import READERS, get_task, resolve_files

    fixtures = ROOT / "tests" / "eval" / "fixtures"
    spec = dataclasses.replace(get_task("mme"), reader_args={"subtasks": ["existence", "artwork", "code_reasoning"]})
    docs = READERS[spec.reader](spec, resolve_files(spec, data_root=fixtures))
    answer = "Yes"  # right on the "Yes" half of the pairs

    def subtask_score(name: str) -> float:
        mine = [d for d in docs if d.fields["subtask"] == name]
        right = [d.target == answer for d in mine]
        pairs = {d.fields["pair_id"] for d in mine}
        both = [all(r for d, r in zip(mine, right) if d.fields["pair_id"] == p) for p in pairs]
        return 100 * sum(right) / len(right) + 100 * sum(both) / len(both)

    class Constant:
        def generate(self, images, prompts, max_new_tokens=16, **gen):
            return [answer] * len(prompts)

    eval.run(Constant(), [spec], data_root=fixtures, output_dir=tmp_path, progress=False, print_table=True)
    results = json.loads((tmp_path / "results.json").read_text())
    groups = results["groups"]
    perception, cognition = groups["mme_perception"], groups["mme_cognition"]
    assert perception["members"] == ["existence", "artwork"] and cognition["members"] == ["code_reasoning"]
    assert perception["aggregation"] == cognition["aggregation"] == "sum" and perception["task"] == "mme"
    expected_p = subtask_score("existence") + subtask_score("artwork")
    assert 0 < expected_p < 400  # neither all right nor all wrong: the sum is a real sum
    assert perception["score,none"] == pytest.approx(expected_p)
    assert cognition["score,none"] == pytest.approx(subtask_score("code_reasoning"))
    assert perception["n_samples,none"] == 6 and cognition["n_samples,none"] == 2
    # the task's own totals agree with its groups
    assert results["results"]["mme"]["perception,none"] == pytest.approx(expected_p)
    assert results["configs"]["mme"]["summed_groups"] == {"mme_perception": list(MME_PERCEPTION),
                                                          "mme_cognition": list(MME_COGNITION)}  # fmt: skip
    printed = capsys.readouterr().out
    assert f"| **mme_perception** (sum of 2 mme subtasks) | score | {expected_p:.2f} | - | 6 |" in printed
    assert "| **mme_cognition** (sum of 1 mme subtask) | score |" in printed
