"""Time the default job (`make train`) of two commits back to back, as a new user runs it: fresh clone, install included.

    python recipes/moe_llava/time_default_job.py --out /tmp/default_job f236d27 HEAD

For each commit, in the order given: ``git clone`` this repository into ``OUT/<commit>``, check the commit out, run
``make train`` there (its own ``.venv``, its own ``runs/``) and time it. Then one table: total wall time (install
included), the process tree's user / system CPU seconds, each stage's training wall time and the stage-II / III
ShapesVQA accuracy and ShapesPOPE F1 from the stages' ``summary.json``; and the wall-time ratio of each commit to the
first. Written to ``OUT/compare.md`` and ``OUT/compare.json``; logs in ``OUT/<commit>.log``. Nothing is written
outside ``OUT``.

Timings mean something only on an otherwise idle machine: the script prints the load average before and after each
run and warns when the machine was busy when a run started.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPE_RUNS = "runs/moe_llava_shapes_tiny"
STAGES = ("clip", "align", "sft", "moe")
SCORES = (("sft", "shapes_vqa/accuracy"), ("moe", "shapes_vqa/accuracy"), ("sft", "shapes_pope/f1"), ("moe", "shapes_pope/f1"))


def _children_cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime, r.ru_stime


def time_commit(repo: Path, rev: str, out: Path) -> dict[str, Any]:
    """Clone ``repo`` at ``rev`` into ``out/<rev>``, run ``make train`` there, return timings and scores."""
    where = out / rev
    if where.exists():
        raise FileExistsError(f"{where} exists: pass an empty --out folder (the clone must be fresh, install included)")
    subprocess.run(["git", "clone", "-q", str(repo), str(where)], check=True)
    subprocess.run(["git", "-C", str(where), "checkout", "-q", rev], check=True)
    sha = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.2f} when {rev} starts: other jobs make the timing wrong",
              file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # A cold uv cache, as on a fresh machine (commits whose Makefile installs with uv); deleted after the run, as it
    # holds another copy of torch. pip's cache is left as it is: that only flatters commits that install with pip.
    uv_cache = out / f"{rev}.uv-cache"
    env["UV_CACHE_DIR"] = str(uv_cache)
    user0, sys0 = _children_cpu()
    t0 = time.perf_counter()
    with open(out / f"{rev}.log", "w") as log:
        proc = subprocess.run(["make", "train"], cwd=where, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    shutil.rmtree(uv_cache, ignore_errors=True)
    user1, sys1 = _children_cpu()
    if proc.returncode != 0:
        raise RuntimeError(f"make train at {rev} failed (exit {proc.returncode}); see {out / f'{rev}.log'}")
    stages = {}
    for stage in STAGES:
        summary = where / RECIPE_RUNS / stage / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            stages[stage] = {"train_wall_s": s["train_wall_s"], "steps": s["steps"], "metrics": s.get("metrics", {})}
    return {"rev": rev, "sha": sha, "wall_s": round(wall, 3), "user_s": round(user1 - user0, 1),
            "sys_s": round(sys1 - sys0, 1), "load_before": load_before, "load_after": os.getloadavg()[0],
            "stages": stages}


def table(results: list[dict[str, Any]]) -> str:
    head = ["commit", "wall (install incl.)", "vs first", "user / sys CPU s"]
    head += [f"{s} train s" for s in STAGES]
    head += [f"{'II' if st == 'sft' else 'III'} {m.split('/')[0].replace('shapes_', '')}" for st, m in SCORES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = results[0]["wall_s"]
    for r in results:
        row = [f"{r['rev']} ({r['sha']})", f"{r['wall_s']:.0f} s", f"{r['wall_s'] / first:.2f}x",
               f"{r['user_s']:.0f} / {r['sys_s']:.0f}"]
        row += [f"{r['stages'][s]['train_wall_s']:.0f}" if s in r["stages"] else "-" for s in STAGES]
        for st, m in SCORES:
            v = r["stages"].get(st, {}).get("metrics", {}).get(m)
            row.append("-" if v is None else f"{v:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("revs", nargs="+", help="commits to time, in this order (the first is the baseline)")
    p.add_argument("--out", required=True, help="an empty folder for the clones, logs and the table")
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]), help="the repository to clone")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for rev in args.revs:
        print(f"== {rev}: fresh clone, make train", flush=True)
        results.append(time_commit(Path(args.repo), rev, out))
        print(f"   {results[-1]['wall_s']:.0f} s wall, load {results[-1]['load_before']:.2f} -> "
              f"{results[-1]['load_after']:.2f}", flush=True)
    md = table(results)
    (out / "compare.json").write_text(json.dumps(results, indent=2))
    (out / "compare.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
