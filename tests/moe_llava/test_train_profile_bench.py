"""The default job's training-throughput bench (eval/bench/train.py) and the stage profiler
(recipes/moe_llava/profile_stages.py): what they build and how they add up (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from eval.bench import train as bench_train

ROOT = Path(__file__).resolve().parents[2]


def _load_profiler():
    spec = importlib.util.spec_from_file_location("profile_stages", ROOT / "recipes/moe_llava/profile_stages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_baseline_recipe_is_f236d27_in_todays_schema() -> None:
    """The frozen baseline differs from the recipe at f236d27 only by the `task:` -> `type:` rename."""
    ours = yaml.safe_load(bench_train.BASELINE.read_text())
    try:
        old = subprocess.run(["git", "show", "f236d27:recipes/moe_llava/shapes_tiny.yaml"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("git history with f236d27 not available (shallow clone or no git)")
    old = yaml.safe_load(old)
    for stage in old["stages"]:
        stage["type"] = stage.pop("task")
    assert ours == old


def test_bench_steps_both_recipes_on_real_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    m = bench_train.measure("sft", steps=1, rounds=1, scenes=12)
    assert list(tmp_path.iterdir()) == []  # the stages' exported data went to a temporary folder, not the cwd
    assert m["batch"] == m["baseline_batch"] == 16
    assert m["f236d27_tok_s"] > 0 and m["current_tok_s"] > 0 and math.isfinite(m["ratio"])
    assert m["f236d27_samples_s"] > 0 and math.isfinite(m["samples_ratio"])
    assert m["cached"]  # stage II's tower is frozen: the current side serves it from the cache, as a run does


def test_profiler_report_medians_and_checkpoint_excess() -> None:
    prof = _load_profiler()
    timer = prof.StepPhaseTimer(warmup=1)
    phases = {"data": 0.01, "tower_forward": 0.02, "other_forward": 0.03, "backward": 0.05, "optimizer": 0.004,
              "bookkeeping": 0.001}
    steps = [dict(phases, checkpoint_step=False) for _ in range(6)]
    steps[0] = dict(phases, data=5.0, checkpoint_step=False)  # warm-up step: left out
    steps[4] = dict(phases, bookkeeping=0.101, checkpoint_step=True)  # a checkpoint costing 100 ms more
    timer.stages["sft"] = {"steps": steps, "ckpt_every": 4, "wall": 1.0, "user_s": 1.5, "sys_s": 0.1, "threads": 2}
    rep = timer.report()["sft"]
    assert rep["steps_timed"] == 5
    assert rep["median_ms"] == {k: round(v * 1000, 2) for k, v in phases.items()}
    assert rep["step_ms"] == pytest.approx(115.0)
    assert rep["checkpoint_ms"] == pytest.approx(100.0)
    table = prof.format_table({"sft": rep})
    assert "| sft | 115.0 ms | 10.0 (9%) |" in table and "100 ms (4)" in table


def _load_job_timer():
    spec = importlib.util.spec_from_file_location("time_default_job", ROOT / "recipes/moe_llava/time_default_job.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_default_job_timer_clones_each_commit_and_tabulates_its_stages(tmp_path: Path) -> None:
    """The back-to-back timer runs `make train` in a fresh clone of each commit and reads the stages' summaries;
    here a stand-in Makefile writes summaries whose scores differ by commit."""
    timer = _load_job_timer()
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@t")
    _git(repo, "config", "user.name", "t")
    revs = []
    for vqa in (84.0, 91.5):
        make = ["train:"]
        for stage in ("clip", "align", "sft", "moe"):
            d = f"runs/moe_llava_shapes_tiny/{stage}"
            summary = {"train_wall_s": 2.0, "steps": 10, "metrics": {"shapes_vqa/accuracy": vqa, "shapes_pope/f1": 95.0}}
            make += [f"\tmkdir -p {d}", f"\techo '{json.dumps(summary)}' > {d}/summary.json"]
        (repo / "Makefile").write_text("\n".join(make) + "\n")
        _git(repo, "add", "Makefile")
        _git(repo, "commit", "-qm", f"vqa {vqa}")
        revs.append(_git(repo, "rev-parse", "--short", "HEAD"))
    out = tmp_path / "out"
    assert timer.main(["--repo", str(repo), "--out", str(out), *revs]) == 0
    results = json.loads((out / "compare.json").read_text())
    assert [r["sha"] for r in results] == revs
    assert [r["stages"]["moe"]["metrics"]["shapes_vqa/accuracy"] for r in results] == [84.0, 91.5]
    md = (out / "compare.md").read_text().splitlines()
    assert len(md) == 4 and "| 1.00x |" in md[2] and md[3].endswith("| 91.5 | 91.5 | 95.0 | 95.0 |")
    assert sorted(p.name for p in out.iterdir()) == sorted([*revs, *(f"{r}.log" for r in revs), "compare.json", "compare.md"])
    with pytest.raises(FileExistsError, match="pass an empty --out folder"):
        timer.main(["--repo", str(repo), "--out", str(out), revs[0]])



def test_side_probe_tells_left_from_right_only_with_the_position_code(tmp_path: Path, capsys) -> None:
    """The probe script on two tiny untrained models: with the code the projected object tokens say their side."""
    import zoo
    from zoo.registry import save_pretrained

    spec = importlib.util.spec_from_file_location("side_probe", ROOT / "recipes/moe_llava/side_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = zoo.load("moe_llava_tiny.shapes")
    args = {**base.model_args, "moe": None}
    results = {}
    for code in (0.0, 20.0):
        model = zoo.create_model(base.architecture, **{**args, "image_pos_code": code})
        save_pretrained(model, tmp_path / str(code), model.architecture, model.model_args)
        mod.main(["--model", str(tmp_path / str(code)), "--scenes", "800"])
        out = capsys.readouterr().out
        assert "| projector output |" in out and out.count("after LM layer") == 4
        results[code] = float(out.split("| projector output |")[1].split("|")[1])  # the test scenes' column
    assert results[20.0] >= 90.0 and results[20.0] > results[0.0] + 15
