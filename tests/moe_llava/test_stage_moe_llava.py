"""MoELLaVAStage: the three stages through the recipe runner at toy size, init_from semantics, data wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.recipe import load_recipe
from zoo.stages.moe_llava import MoELLaVAStage, summarise_eval

VISION = {"kind": "hf", "config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32,
                                   "patch_size": 16}}
LM = {"model_type": "phi", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
      "num_attention_heads": 2, "num_key_value_heads": 2, "partial_rotary_factor": 0.5, "hidden_act": "gelu_new",
      "max_position_embeddings": 256, "tie_word_embeddings": False}
RECIPE = """
recipe: toy
stages:
  - name: align
    type: moe_llava
    model: &model {architecture: moe_llava_tiny, vision: %(vision)s, lm: %(lm)s, template: phi_nosystem,
                   vocab_world: &world {image_size: 32}, vocab_scenes: 20}
    data: {source: shapes, kind: caption, world: *world, num_scenes: 12, template: plain}
    trainable: ["mm_projector.*"]
    optim: {lr: 1.0e-2}
    batch_size: 4
    trainer: {max_steps: 2, enable_progress_bar: false}
  - name: sft
    type: moe_llava
    init_from: align
    model: *model
    data: {source: shapes, kind: vqa, world: *world, num_scenes: 12}
    trainable: ["mm_projector.*", "llm.*"]
    optim: {lr: 1.0e-2}
    batch_size: 4
    trainer: {max_steps: 2, enable_progress_bar: false}
  - name: moe
    type: moe_llava
    init_from: sft
    model: {<<: *model, moe: {num_experts: 4, top_k: 2}}
    data: {source: shapes, kind: vqa, world: *world, num_scenes: 12}
    trainable: ["llm.lm.model.layers.*.mlp.*"]
    optim: {lr: 1.0e-2}
    batch_size: 4
    trainer: {max_steps: 2, enable_progress_bar: false}
""".replace("%(vision)s", json.dumps(VISION)).replace("%(lm)s", json.dumps(LM))


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    from zoo.train import train

    tmp = tmp_path_factory.mktemp("toy")
    (tmp / "toy.yaml").write_text(RECIPE)
    rows = train(tmp / "toy.yaml", runs_dir=tmp / "runs")
    return tmp / "runs" / "toy", rows


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / "final" / "model.safetensors"))


def test_stages_train_what_the_paper_trains(toy_runs):
    root, rows = toy_runs
    align, sft, moe = (_weights(root / s) for s in ("align", "sft", "moe"))
    changed = lambda a, b, k: not torch.equal(a[k], b[k])  # noqa: E731
    # Stage II changed the LLM and the projector; stage I changed only the projector (so II started from it).
    assert all(not changed(align, sft, k) for k in align if k.startswith("vision_tower."))
    assert any(changed(align, sft, k) for k in align if k.startswith("llm."))
    # Stage III: experts/routers and the dense FFNs of odd layers moved; attention, embeddings, projector did not.
    for k, v in moe.items():
        if ".mlp." in k and k.startswith("llm.lm.model.layers.1."):
            assert changed(sft, moe, k), k
        if k in sft and ".mlp." not in k:
            assert torch.equal(sft[k], v), k
    assert "llm.lm.model.layers.0.mlp.router.weight" in moe and "llm.lm.model.layers.1.mlp.fc1.weight" in moe
    summary = json.loads((root / "moe" / "summary.json").read_text())
    m = summary["metrics"]
    assert m["params_active_M"] < m["params_total_M"] and m["train_tokens_per_s"] > 0
    dense = json.loads((root / "sft" / "summary.json").read_text())["metrics"]
    assert dense["params_active_M"] == dense["params_total_M"]


def test_stage_one_trains_only_the_projector(toy_runs):
    from zoo.registry import create_model

    root, _ = toy_runs
    align = _weights(root / "align")
    cfg = json.loads((root / "align" / "final" / "config.json").read_text())
    torch.manual_seed(0)
    fresh = create_model(cfg["architecture"], **cfg["model_args"]).state_dict()
    # Same init (the runner seeds before building), so only the projector may differ.
    diff = {k.split(".")[0] for k in align if not torch.equal(align[k], fresh[k])}
    assert diff == {"mm_projector"}


def test_upcycled_model_reproduces_the_dense_model(toy_runs):
    """Experts start as copies of the stage-II FFN; at eval (no token dropped) the MoE model equals the dense one."""
    from zoo.registry import load

    root, _ = toy_runs
    recipe = load_recipe(root.parent.parent / "toy.yaml")
    stage = recipe.stages[2]
    stage.out_dir = root / "moe_check"
    task = MoELLaVAStage(stage.model, stage.data, stage.eval, stage)
    task.init_from(root / "sft" / "final")
    dense = load(root / "sft" / "final")
    e = task.model.state_dict()
    d = dense.state_dict()
    for i in (0,):
        for name in ("fc1", "fc2"):
            w = e[f"llm.lm.model.layers.{i}.mlp.experts.{name}_weight"]
            assert all(torch.equal(w[j], d[f"llm.lm.model.layers.{i}.mlp.{name}.weight"]) for j in range(4))
    task.model.eval()
    ids = torch.randint(10, 60, (2, 12))
    mask = torch.ones_like(ids)
    ids[:, 2:6] = dense.image_token_id
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, a, _ = dense(ids, mask, px)
        _, b, _ = task.model(ids, mask, px)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_init_from_rejects_moe_into_dense(toy_runs):
    root, _ = toy_runs
    recipe = load_recipe(root.parent.parent / "toy.yaml")
    stage = recipe.stages[1]
    stage.out_dir = root / "dense_check"
    task = MoELLaVAStage(stage.model, stage.data, stage.eval, stage)
    with pytest.raises(ValueError, match="holds an MoE model but this stage builds a dense one"):
        task.init_from(root / "moe" / "final")


def test_training_data_has_no_unknown_words(toy_runs):
    root, _ = toy_runs
    recipe = load_recipe(root.parent.parent / "toy.yaml")
    stage = recipe.stages[1]
    stage.out_dir = root / "data_check"
    task = MoELLaVAStage(stage.model, stage.data, stage.eval, stage)
    ds = task.train_dataset()
    unk = task.model.tokenizer.unk_token_id
    assert len(ds) >= 2 * 12 and all(unk not in e.input_ids for e in ds.encoded)
    batch = task.collate_fn([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    n_img = int((batch["input_ids"] == task.model.image_token_id).sum())
    assert n_img == 2 * task.model.num_image_tokens


def test_summarise_eval_flattens_primary_metrics_and_group_means():
    res = {
        "results": {"shapes_vqa": {"acc,none": 0.9}, "shapes_pope_random": {"f1,none": 0.8},
                    "shapes_pope_popular": {"f1,none": 0.6}},
        "primary_metric": {"shapes_vqa": "acc", "shapes_pope_random": "f1", "shapes_pope_popular": "f1"},
        "configs": {"shapes_vqa": {"group": "shapes"}, "shapes_pope_random": {"group": "shapes_pope"},
                    "shapes_pope_popular": {"group": "shapes_pope"}},
    }
    out = summarise_eval(res)
    assert out["shapes_vqa/acc"] == 0.9 and out["shapes_pope/f1"] == pytest.approx(0.7)
    assert "shapes/acc" not in out  # a one-member group adds nothing


def test_shapes_vqa_conversations_are_shuffled_and_complete(tmp_path):
    from data.formats import export_llava
    from data.shapes import ShapesWorld, WorldConfig
    from data.shapes_llava import write_shapes_vqa

    world = ShapesWorld(WorldConfig(image_size=32))
    export_llava(world, "train", 8, tmp_path, "caption")
    records = json.loads(write_shapes_vqa(world, 8, tmp_path, 3, 2, True, seed=0).read_text())
    first_kinds = set()
    for scene in world.iter_scenes("train", 8):
        mine = [r for r in records if r["image"] == f"images/{scene.id}.png"]
        turns = [t for r in mine for t in r["conversations"]]
        questions = [t["value"].replace("<image>\n", "").split("\n")[0] for t in turns[::2]]
        # every VQA question once, plus at most one "yes" and one "no" POPE probe not already asked
        assert len(questions) == len(set(questions)) and {qa.question for qa in scene.vqa} <= set(questions)
        assert all(len(r["conversations"]) <= 6 and r["conversations"][0]["value"].startswith("<image>\n")
                   for r in mine)
        vqa_q = {qa.question for qa in scene.vqa}
        extra = [(q, a["value"]) for q, a in zip(questions, turns[1::2]) if q not in vqa_q]
        assert sorted(a for _, a in extra) in (["no", "yes"], ["no"])  # balanced when a new "yes" exists
        kinds = {qa.question: qa.kind for qa in scene.vqa}
        first_kinds |= {kinds.get(r["conversations"][0]["value"].split("\n")[1], "pope") for r in mine}
    assert len(first_kinds) >= 4  # the first turn is not always the colour question


def test_answer_prompt_on_first_turn_only(tmp_path):
    from data.formats import SHORT_ANSWER_PROMPT, export_llava
    from data.shapes import ShapesWorld, WorldConfig
    from data.shapes_llava import write_shapes_vqa

    world = ShapesWorld(WorldConfig(image_size=32))
    export_llava(world, "train", 6, tmp_path, "caption")
    every = json.loads(write_shapes_vqa(world, 6, tmp_path, 3, 2, True, seed=0).read_text())
    first = json.loads(write_shapes_vqa(world, 6, tmp_path, 3, 2, True, seed=0, answer_prompt_turns="first").read_text())
    assert len(every) == len(first)
    for a, b in zip(every, first):
        human_a, human_b = a["conversations"][::2], b["conversations"][::2]
        assert all(t["value"].endswith(SHORT_ANSWER_PROMPT) for t in human_a)
        assert human_b[0]["value"] == human_a[0]["value"]  # the first turn is the benchmark's prompt
        for ta, tb in zip(human_a[1:], human_b[1:]):
            assert tb["value"] == ta["value"].removesuffix(f"\n{SHORT_ANSWER_PROMPT}")
        assert b["conversations"][1::2] == a["conversations"][1::2]  # same answers, same order
    assert any(len(r["conversations"]) > 2 for r in first)  # later turns exist and lost the instruction
    with pytest.raises(ValueError, match="answer_prompt_turns"):
        write_shapes_vqa(world, 6, tmp_path, 3, 2, True, seed=0, answer_prompt_turns="last")


def test_questions_per_kind_draws_more_questions_of_each_kind(tmp_path):
    from data.shapes import ShapesWorld, WorldConfig
    from data.shapes_llava import _scene_questions

    world = ShapesWorld(WorldConfig(image_size=64))
    want = {"color": 3, "shape": 2, "exist": 1}
    totals = dict.fromkeys(want, 0)
    for scene in world.iter_scenes("train", 20):
        qas = _scene_questions(world, scene, want)
        assert len({qa.question for qa in qas}) == len(qas)  # distinct questions
        counts = {k: sum(qa.kind == k for qa in qas) for k in ("color", "shape", "count", "position", "exist")}
        assert counts["count"] == counts["position"] == 0 and all(counts[k] <= n for k, n in want.items())
        for k in want:
            totals[k] += counts[k]
        for qa in qas:  # every drawn question is still answered correctly from the scene's objects
            if qa.kind == "color":
                assert qa.answer in {o.color for o in scene.objects}
            if qa.kind == "shape":
                assert qa.answer in {o.shape for o in scene.objects}
    # single-object scenes have fewer phrases to give; multi-object scenes fill the quota
    assert totals["color"] > 2 * 20 and totals["shape"] > 1.5 * 20 and totals["exist"] == 20
    with pytest.raises(ValueError, match="unknown kinds"):
        _scene_questions(world, world.scene(0), {"colour": 1})


def test_spatial_questions_answer_from_the_geometry():
    from data.shapes import ShapesWorld, WorldConfig

    world = ShapesWorld(WorldConfig(image_size=64))
    seen = set()
    for scene in world.iter_scenes("train", 40):
        by_name = {o.name: o for o in scene.objects}
        qas = world.spatial_questions(scene)
        assert len({qa.question for qa in qas}) == len(qas)
        # the scene's own position question, when it has one about uniquely named objects, is among them
        names = [o.name for o in scene.objects]
        for qa in scene.vqa:
            if qa.kind == "position" and all(names.count(n) == 1 for n in names):
                assert (qa.question, qa.answer) in {(q.question, q.answer) for q in qas}
        for qa in qas:
            q = qa.question
            if qa.kind in ("color", "shape"):
                # "What color is the circle on the left?": the extreme matching object on that axis
                words = q.removesuffix("?").split()
                assert words[-1] in ("left", "right", "top", "bottom"), q
                noun = words[4] if words[4] != "object" else None
                cands = [o for o in scene.objects if noun is None or noun in (o.shape, o.color)]
                axis, pick = {"left": (0, min), "right": (0, max), "top": (1, min), "bottom": (1, max)}[words[-1]]
                target = pick(cands, key=lambda o: o.center[axis])
                assert qa.answer == (target.color if qa.kind == "color" else target.shape), q
                seen.add("by position")
                continue
            assert qa.kind == "position"
            if q.endswith("of the image?"):
                o = by_name[q.removeprefix("Is the ").split(" on the left")[0].split(" above or")[0]]
                x, y = o.center[0] + 0.5 - 32, o.center[1] + 0.5 - 32
                want = ("left" if x < 0 else "right") if "left or" in q else ("above" if y < 0 else "below")
                seen.add("image")
            else:
                rel = " to the left or to the right of the " if "to the left" in q else " above or below the "
                a, b = (by_name[n] for n in q.removeprefix("Is the ").removesuffix("?").split(rel))
                dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
                want = ("left" if dx > 0 else "right") if "to the left" in q else ("above" if dy > 0 else "below")
                seen.add("relation")
            assert qa.answer == want, q
    assert seen == {"image", "relation", "by position"}


def test_extra_spatial_adds_spatial_questions_and_zero_changes_nothing(tmp_path):
    from data.shapes import ShapesWorld, WorldConfig
    from data.shapes_llava import write_shapes_vqa

    world = ShapesWorld(WorldConfig(image_size=64))
    plain = json.loads(write_shapes_vqa(world, 30, tmp_path, 3, 2, True, seed=0).read_text())
    again = json.loads(write_shapes_vqa(world, 30, tmp_path, 3, 2, True, seed=0, extra_spatial=0).read_text())
    assert plain == again
    more = json.loads(write_shapes_vqa(world, 30, tmp_path, 3, 2, True, seed=0, extra_spatial=3).read_text())
    spatial = {qa.question for scene in world.iter_scenes("train", 30) for qa in world.spatial_questions(scene)}

    def questions(records):
        return [t["value"].split("\n")[-2] for r in records for t in r["conversations"] if t["from"] == "human"]

    added = len(questions(more)) - len(questions(plain))
    new_spatial = sum(q in spatial for q in questions(more)) - sum(q in spatial for q in questions(plain))
    assert added == new_spatial and 30 < added <= 90  # only spatial questions were added, up to 3 a scene


def test_recipe_validation_rejects_a_misspelt_question_kind(monkeypatch):
    from zoo.recipe import RecipeError

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    bad = "stages.sft.data.questions_per_kind={colour: 2}"
    with pytest.raises(RecipeError, match=r"stages\[1\]\.data\.questions_per_kind.*did you mean 'color'"):
        load_recipe("recipes/moe_llava/shapes_tiny.yaml", [bad])


def test_questions_per_kind_literal_lists_the_worlds_kinds():
    import typing

    from data.shapes import QA_KINDS
    from zoo.stages.moe_llava import MoELLaVADataConfig

    key_type = typing.get_args(typing.get_type_hints(MoELLaVADataConfig)["questions_per_kind"])[0]
    assert typing.get_args(key_type) == QA_KINDS  # the config's copy (kept import-free) matches the world's


def test_stage_outside_the_runner_refuses_to_write_into_the_current_directory(toy_runs, tmp_path, monkeypatch):
    """A stage whose out_dir the runner did not set says so instead of exporting data/ into the cwd."""
    root, _ = toy_runs
    recipe = load_recipe(root.parent.parent / "toy.yaml")
    stage = recipe.stages[1]
    assert stage.out_dir is None
    monkeypatch.chdir(tmp_path)
    task = MoELLaVAStage(stage.model, stage.data, stage.eval, stage)
    with pytest.raises(ValueError, match="out_dir is not set"):
        task.train_dataset()
    assert list(tmp_path.iterdir()) == []
