"""Two gloo processes give the same metrics and the same predictions file as one process (slow: spawns Python)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eval.runner import run

FIXTURES = Path(__file__).parent / "fixtures"
TASKS = ["shapes_vqa", "shapes_pope_random", "pope_popular", "mmbench_en_dev"]

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    import eval

    class Hash:
        def generate(self, images, prompts, max_new_tokens=16, **gen):
            words = ["yes", "no", "red", "2", "B", "C"]
            return [words[sum(map(ord, p)) % len(words)] for p in prompts]

    dist.init_process_group("gloo")
    out = sys.argv[1] if dist.get_rank() == 0 else None
    res = eval.run(Hash(), {tasks!r}, limit=7, batch_size=2, data_root={root!r}, output_dir=out, progress=False)
    if dist.get_rank() == 0:
        json.dump(res["results"], open(sys.argv[2], "w"))
    dist.destroy_process_group()
    """
)


class Hash:
    def generate(self, images, prompts, max_new_tokens=16, **gen):
        words = ["yes", "no", "red", "2", "B", "C"]
        return [words[sum(map(ord, p)) % len(words)] for p in prompts]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single = run(
        Hash(), TASKS, limit=7, batch_size=2, data_root=FIXTURES, output_dir=tmp_path / "one", progress=False
    )
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tasks=TASKS, root=str(FIXTURES)))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "two"), str(tmp_path / "r.json")],
                                      env=env, cwd=Path(__file__).parents[2]))  # fmt: skip
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    two = json.loads((tmp_path / "r.json").read_text())
    assert set(two) == set(TASKS)
    for task in TASKS:
        numbers = {k: v for k, v in single["results"][task].items() if isinstance(v, int | float)}
        assert {k: two[task][k] for k in numbers} == pytest.approx(numbers), task
    for task in TASKS:
        a = (tmp_path / "one" / f"samples_{task}.jsonl").read_text().splitlines()
        b = (tmp_path / "two" / f"samples_{task}.jsonl").read_text().splitlines()
        assert [json.loads(x)["doc_id"] for x in a] == [json.loads(x)["doc_id"] for x in b]
        assert [json.loads(x)["resps"] for x in a] == [json.loads(x)["resps"] for x in b]
