"""The runner end to end with test doubles: outputs, numbers, efficiency, bad predictions, the CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

import eval
from eval.registry import READERS, expand_tasks, get_task, resolve_files
from eval.runner import run
from tests.eval.test_percent_units import accuracy_like
from zoo.components.generation import GenerationStats

FIXTURES = Path(__file__).parent / "fixtures"
SHAPES = "shapes_vqa,shapes_pope"
SHAPES_TASKS = ["shapes_vqa", "shapes_pope_adversarial", "shapes_pope_popular", "shapes_pope_random"]


def _oracle_for(doubles, specs, limit=None, root=None):
    oracle = doubles["oracle"]()
    for spec in specs:
        reader = READERS[spec.reader]
        files = resolve_files(spec, data_root=root)
        docs = reader(spec, files, limit=limit) if spec.reader.startswith("shapes") else reader(spec, files)
        oracle.learn(spec, docs[:limit] if limit else docs)
    return oracle


def test_shapes_end_to_end_with_oracle(tmp_path, doubles, capsys):
    oracle = _oracle_for(doubles, expand_tasks(SHAPES), limit=8)
    res = eval.run(oracle, SHAPES, limit=8, batch_size=3, output_dir=tmp_path, print_table=True)
    assert list(res["results"]) == SHAPES_TASKS
    assert res["results"]["shapes_vqa"]["accuracy,none"] == 100.0
    for t in SHAPES_TASKS[1:]:
        r = res["results"][t]
        assert (r["f1,none"], r["accuracy,none"], r["n_samples,none"]) == (100.0, 100.0, 8)
        assert r["yes_ratio,none"] == pytest.approx(50.0)  # the world's probes are balanced
    assert oracle.calls == 4 * 3  # 8 documents in batches of 3, per task
    # The three outputs, in lmms-eval's layout.
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config", "date",
                "git_hash", "model_name", "total_evaluation_time_seconds", "efficiency", "environment"):  # fmt: skip
        assert key in saved, key
    assert saved["n-samples"]["shapes_vqa"]["effective"] == 8
    assert saved["config"]["limit"] == 8 and saved["config"]["batch_size"] == 3
    assert saved["results"]["shapes_vqa"]["accuracy_stderr,none"] == "N/A"
    rows = [json.loads(line) for line in (tmp_path / "samples_shapes_vqa.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["score"] == 1.0 for r in rows)
    assert rows[0]["arguments"]["prompt"].endswith("\nAnswer the question using a single word or phrase.")
    assert set(rows[0]) >= {
        "doc_id",
        "doc",
        "target",
        "arguments",
        "resps",
        "filtered_resps",
        "score",
        "unparsed",
    }
    table = (tmp_path / "results.md").read_text()
    assert "| shapes_vqa | accuracy | 100.00 |" in table
    assert table.strip() in capsys.readouterr().out


def test_constant_yes_model_numbers(doubles):
    res = run(doubles["constant"]("Yes"), ["shapes_pope_random", "shapes_vqa"], limit=8, progress=False)
    pope = res["results"]["shapes_pope_random"]
    assert (pope["recall,none"], pope["yes_ratio,none"], pope["precision,none"]) == (100.0, 100.0, 50.0)
    # "Yes" is right exactly on the "exist" questions whose answer is yes.
    docs = READERS["shapes_vqa"](get_task("shapes_vqa"), {}, limit=8)[:8]
    expected = 100 * sum(d.target == "yes" for d in docs) / 8
    assert res["results"]["shapes_vqa"]["accuracy,none"] == pytest.approx(expected)


def test_empty_predictions_are_counted_and_wrong(doubles, tmp_path):
    res = run(doubles["constant"](""), ["shapes_vqa", "scienceqa_img", "mmbench_en_dev"], limit=8,
              data_root=FIXTURES, output_dir=tmp_path, progress=False)  # fmt: skip
    for task, metric in (("shapes_vqa", "accuracy"), ("scienceqa_img", "accuracy"),
                         ("mmbench_en_dev", "circular_accuracy")):  # fmt: skip
        r = res["results"][task]
        assert r[f"{metric},none"] == 0.0
        assert r["n_unparsed,none"] == r["n_samples,none"] > 0
    rows = [json.loads(x) for x in (tmp_path / "samples_scienceqa_img.jsonl").read_text().splitlines()]
    assert all(r["unparsed"] and r["filtered_resps"] == [None] and r["score"] == 0.0 for r in rows)


def test_every_fixture_task_with_oracle(doubles):
    # Audio / video / speech tasks have their own oracle, keyed by media too (tests/eval/test_av_benchmarks.py).
    av_groups = {"clotho_aqa", "audio_captioning", "video_qa", "speech_mcq"}
    specs = [s for s in expand_tasks(eval.list_tasks())
             if s.files and s.output_type == "generate_until" and s.group not in av_groups]  # fmt: skip
    specs = [dataclasses.replace(s, reader_args={"subtasks": ["existence", "artwork", "code_reasoning"]})
             if s.name == "mme" else s for s in specs]  # fmt: skip
    oracle = _oracle_for(doubles, specs, root=FIXTURES)
    res = run(oracle, specs, data_root=FIXTURES, progress=False, batch_size=4)
    primary = res["primary_metric"]
    got = {t: res["results"][t][f"{primary[t]},none"] for t in res["results"]}
    assert got == {
        "vqav2_val": 100.0, "gqa_testdev_balanced": 100.0, "textvqa_val": 100.0, "vizwiz_val": 100.0,
        "scienceqa_img": 100.0, "pope_random": 100.0, "pope_popular": 100.0, "pope_adversarial": 100.0,
        "mme": 400.0,  # existence + artwork at 200 each
        "mmbench_en_dev": 100.0,
    }  # fmt: skip
    assert res["results"]["mme"]["cognition,none"] == 200.0
    assert res["results"]["vqav2_val"]["accuracy_number,none"] == 100.0
    # Every accuracy-like number is in percent: a perfect model scores 100 (a fraction would read 1.0). Breakdowns
    # with no document in the fixtures report 0 (GroupedAccuracy's empty group).
    empty = {("scienceqa_img", "accuracy_no_img"), ("vizwiz_val", "accuracy_number")}
    checked = 0
    for task, entry in [*res["results"].items(), *res["groups"].items()]:
        for key, value in accuracy_like(entry).items():
            assert value == (0.0 if (task, key) in empty else pytest.approx(100.0)), (task, key, value)
            checked += 1
    assert checked >= 30  # VQA answer types, POPE's five, MME's acc / acc+ per subtask, MMBench, ScienceQA, ...


def test_vqav2_scores_like_llava_submission(doubles):
    class Answers:
        def generate(self, images, prompts, max_new_tokens=16, **gen):
            return ["Red.", "Three", "Yes"]  # processed to "red", "3", "yes"

    res = run(Answers(), "vqav2_val", data_root=FIXTURES, batch_size=3, progress=False)
    r = res["results"]["vqav2_val"]
    # red: 7 of 10 -> 1.0; "3": 3 of 10 -> 0.9; yes: unanimous -> 1.0
    assert r["accuracy,none"] == pytest.approx(100 * 2.9 / 3)
    assert r["accuracy_number,none"] == pytest.approx(90.0)


def test_efficiency_from_model_stats(doubles):
    res = run(doubles["timed"]("no"), "shapes_pope_random", limit=8, batch_size=4, progress=False)
    eff = res["efficiency"]["shapes_pope_random"]
    assert eff["prefill_latency_ms"] == pytest.approx(20.0)  # per batch
    assert eff["decode_latency_ms"] == pytest.approx(10.0)  # 30 ms over 3 steps
    assert eff["tokens_per_second"] == pytest.approx(8 / 0.05)  # 4 tokens per batch over 50 ms
    assert eff["generated_tokens"] == 16 and eff["decode_steps_estimated"] is False
    assert res["config"]["parameters"] == {"total": 4_000_000, "active": 1_500_000, "active_reported": True}


def test_stats_dict_is_ignored_with_a_warning_and_dense_param_count(caplog):
    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def generate(self, images, prompts, max_new_tokens=16, **gen):
            assert not self.training  # generation runs in eval mode
            self.last_generation_stats = {"prefill_seconds": 0.01, "decode_seconds": 0.04, "generated_tokens": 8}
            return ["yes"] * len(prompts)

    m = Module().train()
    with caplog.at_level(logging.WARNING, logger="eval.models"):
        res = run(m, "shapes_pope_random", limit=4, batch_size=2, progress=False)
    assert m.training  # restored for a recipe that goes on training
    eff = res["efficiency"]["shapes_pope_random"]
    # Only GenerationStats is read: a dict (even with the right field names) leaves the latency columns empty.
    assert "decode_latency_ms" not in eff and eff["samples_per_second"] > 0
    warnings = [r.getMessage() for r in caplog.records if "last_generation_stats" in r.getMessage()]
    assert len(warnings) == 1 and "is a dict, not zoo.components.generation.GenerationStats" in warnings[0]
    assert res["config"]["parameters"] == {"total": 8, "active": 8, "active_reported": False}


def test_bad_models_and_arguments(doubles):
    class Short:
        def generate(self, images, prompts, max_new_tokens=16, **gen):
            return ["yes"]

    with pytest.raises(ValueError, match="returned list of length 1 for 4 prompts"):
        run(Short(), "shapes_pope_random", limit=4, batch_size=4, progress=False)
    with pytest.raises(TypeError, match="has no generate"):
        run(object(), "shapes_vqa", limit=1, progress=False)
    with pytest.raises(KeyError, match="unknown eval task or group 'nope'"):
        run(doubles["constant"](), "shapes_vqa,nope", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        run(doubles["constant"](), "shapes_vqa", batch_size=0)


def test_cli(monkeypatch, tmp_path, capsys, doubles):
    from eval.cli import main

    assert main(["--list"]) == 0
    assert "shapes_pope_adversarial" in capsys.readouterr().out
    assert main([]) == 2
    import zoo
    from zoo import registry

    monkeypatch.setattr(zoo, "load", lambda name: doubles["constant"]("no"))
    monkeypatch.setitem(registry._WEIGHTS, "fake.tag", registry.WeightsCfg(file="/nonexistent"))  # a known name
    out = tmp_path / "out"
    assert main(["--model", "fake.tag", "--tasks", SHAPES, "--limit", "8", "--batch-size", "4",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| shapes_pope_random | f1 | 0.00 |" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json", "results.md", *(f"samples_{t}.jsonl" for t in SHAPES_TASKS)]
    )
    assert json.loads((out / "results.json").read_text())["model_name"] == "fake.tag"
    monkeypatch.delenv("MMZOO_DATA", raising=False)
    monkeypatch.delenv("MMZOO_VQAV2", raising=False)
    assert main(["--model", "fake.tag", "--tasks", "vqav2_val", "--output-dir", str(out)]) == 1
    assert "MMZOO_VQAV2" in capsys.readouterr().err


def test_predictions_are_stripped_like_llava():
    class Padded:
        def generate(self, images, prompts, max_new_tokens=16, **gen):
            return ["  A\n"] * len(prompts)

    res = run(Padded(), "scienceqa_img", data_root=FIXTURES, progress=False)
    assert res["results"]["scienceqa_img"]["accuracy,none"] == 50.0  # "A" is right for pid 10, not for pid 11


def test_custom_output_type_and_scorer_for_another_family(tmp_path):
    """What a non-VQA family does: its own reader, output type and scorer, on a model without generate()."""
    from torchmetrics.aggregation import MeanMetric

    from eval.registry import OUTPUT_TYPES, SCORERS, Doc, TaskSpec, register_output_type, register_reader
    from eval.registry import register_scorer as reg_scorer
    from eval.scorers import Scorer

    if "test_labels" not in READERS:

        @register_reader("test_labels")
        def labels(spec, files):
            return [Doc(doc_id=str(i), question=f"class {i}", target=i) for i in range(spec.reader_args["n"])]

    if "test_sample" not in OUTPUT_TYPES:

        @register_output_type("test_sample")
        def sample(model, docs, prompts, spec):
            return [model.sample(d.target) for d in docs]

    if "test_mean_pixel" not in SCORERS:

        @reg_scorer("test_mean_pixel")
        class MeanPixel(Scorer):
            primary = "mean"

            def build_metric(self, docs):
                return MeanMetric()

            def score(self, predictions, docs):
                values = [float(p.mean()) for p in predictions]
                self.metric.update(torch.tensor(values))
                return [{"parsed": None, "score": v, "unparsed": False} for v in values]

            def compute(self):
                return {"mean": float(self.metric.compute())}

            def write_artifacts(self, out_dir):
                path = Path(out_dir) / "mean.txt"
                path.write_text(str(self.compute()["mean"]))
                return {"mean": str(path)}

    class Sampler:
        def sample(self, label):
            return torch.full((3, 4, 4), float(label))

    spec = TaskSpec(name="test_gen", reader="test_labels", reader_args={"n": 5}, output_type="test_sample",
                    scorer="test_mean_pixel")  # fmt: skip
    res = run(Sampler(), [spec], batch_size=2, output_dir=tmp_path, progress=False)
    assert res["results"]["test_gen"]["mean,none"] == pytest.approx(2.0)
    row = json.loads((tmp_path / "samples_test_gen.jsonl").read_text().splitlines()[0])
    assert row["resps"] == ["<Tensor (3, 4, 4)>"]
    assert res["artifacts"]["test_gen"] == {"mean": str(tmp_path / "mean.txt")}
    assert (tmp_path / "mean.txt").read_text() == "2.0"


@pytest.mark.slow
def test_cli_on_untrained_moe_llava_tiny(tmp_path, capsys):
    """`zoo eval` on a real zoo model (random weights) over the shapes benchmarks at --limit 8."""
    from eval.cli import main

    out = tmp_path / "tiny"
    assert (
        main(["--model", "moe_llava_tiny", "--tasks", SHAPES, "--limit", "8", "--output-dir", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "moe_llava_tiny (random init)" in printed and "| shapes_vqa | accuracy |" in printed
    saved = json.loads((out / "results.json").read_text())
    params = saved["config"]["parameters"]
    assert (
        params["active_reported"] and 0 < params["active"] <= params["total"]
    )  # reported by the model itself
    eff = saved["efficiency"]["shapes_vqa"]
    assert eff["prefill_latency_ms"] > 0 and eff["tokens_per_second"] > 0
    assert all((out / f"samples_{t}.jsonl").read_text().count("\n") == 8 for t in SHAPES_TASKS)


def test_stale_stats_are_not_counted_twice(doubles):
    class ReportsOnce(doubles["constant"]):
        def __init__(self):
            super().__init__("yes")
            self.n = 0

        def generate(self, images, prompts, max_new_tokens=16, **gen):
            self.n += 1
            if self.n == 1:  # only the first call reports
                self.last_generation_stats = GenerationStats(
                    prefill_seconds=0.1, decode_seconds=0.2, generated_tokens=4, batch_size=2
                )
            return super().generate(images, prompts, max_new_tokens, **gen)

    eff = run(ReportsOnce(), "shapes_pope_random", limit=6, batch_size=2, progress=False)["efficiency"]
    assert eff["shapes_pope_random"]["generated_tokens"] == 4
    assert eff["shapes_pope_random"]["prefill_latency_ms"] == pytest.approx(100.0)
