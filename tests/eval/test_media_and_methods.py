"""Documents carrying media of any kind, and `--method` in the runner, `zoo eval` and `zoo chat`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from eval.registry import READERS, Doc, TaskSpec, register_reader
from eval.runner import run
from zoo.methods import _METHODS, Method, MethodContext, MethodPlan, build_method, register_method

TASKS = "shapes_vqa,shapes_pope_random"


class Clip:
    """A lazily loaded audio clip: counts how often it is loaded."""

    loads = 0

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self) -> torch.Tensor:
        Clip.loads += 1
        return torch.full((4,), self.value)


def _image(v: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (v, v, v))


if "test_media_docs" not in READERS:

    @register_reader("test_media_docs")
    def media_docs(spec, files):
        return [
            Doc(doc_id="0", question="q0", target="red", image=_image(10), media={"audio": [Clip(0.0)]}),
            Doc(doc_id="1", question="q1", target="red", media={"audio": [Clip(1.0), Clip(2.0)]}),
            Doc(doc_id="2", question="q2", target="red", image=_image(20)),
            Doc(doc_id="3", question="q3", target="red"),
            Doc(doc_id="4", question="q4", target="red", media={"image": [_image(30), _image(40)]}),
        ]


class Recorder:
    """Answers "red" and records what every generate call received."""

    def __init__(self) -> None:
        self.calls: list[tuple[list, dict]] = []

    def generate(self, images, prompts, max_new_tokens=16, **gen):
        self.calls.append((images, gen))
        return ["red"] * len(prompts)


def test_documents_carry_media_of_any_kind_lazily(tmp_path):
    spec = TaskSpec(name="test_media", reader="test_media_docs", scorer="shapes_vqa")
    docs = READERS["test_media_docs"](spec, {})
    Clip.loads = 0
    model = Recorder()
    res = run(model, [spec], batch_size=2, output_dir=tmp_path, progress=False)
    assert res["results"]["test_media"]["accuracy,none"] == 100.0
    assert Clip.loads == 3  # every clip loaded once, when its batch ran (not when the reader built the documents)
    (img0, gen0), (img1, gen1), (img2, gen2) = model.calls
    # The batch with audio gets media= (one entry per prompt: an item, a list of items); images go as always.
    assert [im.getpixel((0, 0)) for im in [img0[0]]] == [(10, 10, 10)] and img0[1] is None
    audio = gen0["media"]["audio"]
    assert torch.equal(audio[0], torch.zeros(4)) and [float(c[0]) for c in audio[1]] == [1.0, 2.0]
    assert set(gen0["media"]) == {"audio"}
    # Image-only batches are called exactly as before: no media argument at all.
    assert "media" not in gen1 and img1[0].getpixel((0, 0)) == (20, 20, 20) and img1[1] is None
    assert "media" not in gen2 and [im.getpixel((0, 0)) for im in img2[0]] == [(30, 30, 30), (40, 40, 40)]
    rows = [json.loads(line) for line in (tmp_path / "samples_test_media.jsonl").read_text().splitlines()]
    assert rows[1]["doc"]["media"] == {"audio": ["<in-memory Clip>", "<in-memory Clip>"]}
    assert "media" not in rows[2]["doc"] and rows[2]["doc"]["image"] == "<in-memory Image>"
    assert docs[0].media_refs() == {"audio": ["<in-memory Clip>"]}


def test_doc_media_is_checked():
    with pytest.raises(ValueError, match=r"f.json:3: both 'image' and 'media\['image'\]'"):
        Doc(doc_id="0", question="q", target="red", image=_image(1), media={"image": [_image(2)]}, source="f.json:3")
    with pytest.raises(ValueError, match=r"field 'media\['audio'\]' must be a list of items, got Tensor"):
        Doc(doc_id="0", question="q", target="red", media={"audio": torch.zeros(3)})
    doc = Doc(doc_id="0", question="q", target="red", media={"image": [b"not an image"]}, source="f.json:4")
    with pytest.raises(ValueError, match=r"f.json:4: field \"media\['image'\]\[0\]\" is not a decodable image"):
        doc.load_media()


class MethodAware:
    """Answers like the oracle; runs the method's plan, and a plan asking to contradict flips yes / no."""

    def __init__(self, oracle) -> None:
        self.oracle = oracle
        self.methods: list[str | None] = []

    def generate(self, images, prompts, max_new_tokens=16, *, method=None, **gen):
        self.methods.append(method)
        ctx = MethodContext(model=self, input_ids=None, attention_mask=None, media_mask=None)
        plan = build_method(method).plan(ctx)
        answers = self.oracle.generate(images, prompts, max_new_tokens, **gen)
        if plan.layer_kwargs.get("contradict"):
            answers = [{"yes": "no", "no": "yes"}.get(a, "?") for a in answers]
        return answers


@pytest.fixture
def contradict():
    class Contradict(Method):
        def plan(self, ctx):
            return MethodPlan(layer_kwargs={"contradict": True})

    register_method("test_contradict")(Contradict)
    yield "test_contradict"
    del _METHODS["test_contradict"]


def _oracle(doubles):
    from eval.registry import expand_tasks, resolve_files

    oracle = doubles["oracle"]()
    for spec in expand_tasks(TASKS):
        oracle.learn(spec, READERS[spec.reader](spec, resolve_files(spec), limit=6)[:6])
    return oracle


def test_method_none_gives_identical_scores_and_predictions(tmp_path, doubles, contradict):
    oracle = _oracle(doubles)
    plain, with_none, flipped = MethodAware(oracle), MethodAware(oracle), MethodAware(oracle)
    kw = dict(limit=6, batch_size=4, progress=False)
    a = run(plain, TASKS, output_dir=tmp_path / "a", **kw)
    b = run(with_none, TASKS, output_dir=tmp_path / "b", method="none", **kw)
    c = run(flipped, TASKS, output_dir=tmp_path / "c", method=contradict, **kw)
    assert plain.methods == [None] * 4 and with_none.methods == ["none"] * 4 and flipped.methods == [contradict] * 4
    assert a["results"] == b["results"] and a["results"]["shapes_pope_random"]["accuracy,none"] == 100.0
    for task in TASKS.split(","):
        resps_a, resps_b = (
            [json.loads(r)["resps"] for r in (tmp_path / d / f"samples_{task}.jsonl").read_text().splitlines()]
            for d in "ab"
        )
        assert resps_a == resps_b and len(resps_a) == 6
    # The method reaches the model: one that changes the answers changes the score.
    assert c["results"]["shapes_pope_random"]["accuracy,none"] == 0.0
    # Recorded and named: config.method and the table's title.
    assert a["config"]["method"] is None and b["config"]["method"] == "none"
    assert "method" not in (tmp_path / "a" / "results.md").read_text().splitlines()[0]
    assert "method: `none`" in (tmp_path / "b" / "results.md").read_text().splitlines()[0]
    assert json.loads((tmp_path / "c" / "results.json").read_text())["config"]["method"] == contradict


def test_bad_methods_fail_before_the_model_loads(monkeypatch):
    import zoo

    def no_load(name):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(zoo, "load", no_load)
    with pytest.raises(ValueError, match="unknown method 'bogus'; known: .*dyvte.*none"):
        run("some.weights", TASKS, method="bogus", progress=False)
    with pytest.raises(ValueError, match=r"method 'none' has no option\(s\) \['p'\]"):
        run("some.weights", TASKS, method="none:p=0.5", progress=False)
    with pytest.raises(ValueError, match="its generate takes no method="):
        run(_NoMethod(), TASKS, method="none", limit=2, progress=False)


class _NoMethod:
    def generate(self, images, prompts, max_new_tokens=16, do_sample=False):
        return ["yes"] * len(prompts)


def test_zoo_eval_method_flag(monkeypatch, tmp_path, capsys, doubles):
    from eval.cli import main

    assert main(["--list-methods"]) == 0
    assert "none" in capsys.readouterr().out.split()
    assert main(["--model", "x", "--method", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "zoo eval: error: --method bogus: unknown method 'bogus'; known: " in err and "none" in err
    import zoo
    from zoo import registry

    monkeypatch.setitem(registry._WEIGHTS, "fake", registry.WeightsCfg(file="/nonexistent"))  # a known name
    model = MethodAware(_oracle(doubles))
    monkeypatch.setattr(zoo, "load", lambda name: model)
    out = tmp_path / "out"
    args = ["--model", "fake", "--tasks", TASKS, "--limit", "6", "--method", "none", "--output-dir", str(out)]
    assert main(args) == 0
    assert "**fake** - method: `none`" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["config"]["method"] == "none"
    assert model.methods == ["none"] * 2


def test_zoo_chat_method_flag(monkeypatch, capsys):
    import zoo
    from zoo.chat import main

    def no_load(name):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(zoo.registry, "load", no_load)
    assert main(["--scene", "test:0", "--method", "none:x=1", "what ?"]) == 2
    assert "zoo chat: --method none:x=1: method 'none' has no option(s) ['x']" in capsys.readouterr().err

    class Chatty:
        def __init__(self):
            self.seen = []

        def generate(self, images, prompts, max_new_tokens=16, *, method=None):
            self.seen.append(method)
            return ["red"]

    chatty = Chatty()
    monkeypatch.setattr(zoo.registry, "load", lambda name: chatty)
    assert main(["--scene", "test:0", "--method", "none", "what colour ?"]) == 0
    assert capsys.readouterr().out.strip() == "red" and chatty.seen == ["none"]
    monkeypatch.setattr(zoo.registry, "load", lambda name: _NoMethod())
    assert main(["--scene", "test:0", "--method", "none", "what colour ?"]) == 2
    assert "takes no --method" in capsys.readouterr().err


def test_numbers_a_method_reports_are_averaged_over_batches():
    from zoo.components.generation import GenerationStats

    class Reports:
        calls = 0

        def generate(self, images, prompts, max_new_tokens=16, **gen):
            Reports.calls += 1
            self.last_generation_stats = GenerationStats(
                prefill_seconds=0.1, decode_seconds=0.1, generated_tokens=2, method="x",
                extra={"x/exit_layer": float(Reports.calls)} | ({"x/kept": 0.5} if Reports.calls == 1 else {}),
            )  # fmt: skip
            return ["yes"] * len(prompts)

    eff = run(Reports(), "shapes_pope_random", limit=6, batch_size=2, progress=False)["efficiency"]
    assert eff["shapes_pope_random"]["method_metrics"] == {"x/exit_layer": 2.0, "x/kept": 0.5}  # (1+2+3)/3
