"""The dyvte_routers stage type: the official label rule, a toy run through the recipe runner after a MoE-LLaVA stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.stages.dyvte import IGNORE_INDEX, exit_labels

VISION = {"kind": "hf", "config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32,
                                   "patch_size": 16}}
LM = {"model_type": "phi", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
      "num_attention_heads": 2, "num_key_value_heads": 2, "partial_rotary_factor": 0.5, "hidden_act": "gelu_new",
      "max_position_embeddings": 256, "tie_word_embeddings": False}
RECIPE = """
recipe: toy_dyvte
stages:
  - name: sft
    type: moe_llava
    model: {architecture: moe_llava_tiny, vision: %(vision)s, lm: %(lm)s, template: phi_nosystem,
            vocab_world: &world {image_size: 32}, vocab_scenes: 20}
    data: {source: shapes, kind: vqa, world: *world, num_scenes: 8}
    trainable: ["mm_projector.*", "llm.*"]
    optim: {lr: 1.0e-2}
    batch_size: 4
    trainer: {max_steps: 1, enable_progress_bar: false}
  - name: routers
    type: dyvte_routers
    init_from: sft
    model: {router_hidden: 8}
    data: {source: shapes, kind: vqa, world: *world, num_scenes: 8, turns_per_conversation: 1}
    eval: {tasks: [shapes_vqa], limit: 4, batch_size: 4, thresholds: [1.01]}
    trainable: ["*"]
    optim: {lr: 1.0e-2}
    batch_size: 4
    trainer: {max_steps: 4, enable_progress_bar: false}
""".replace("%(vision)s", json.dumps(VISION)).replace("%(lm)s", json.dumps(LM))


def _logits(tokens: list[list[int]], vocab: int = 5, confidence: float = 4.0) -> torch.Tensor:
    """One-hot-ish logits: row r predicts ``tokens[r][t]`` at position t with the given margin."""
    out = torch.zeros(len(tokens), len(tokens[0]), vocab)
    for r, row in enumerate(tokens):
        for t, tok in enumerate(row):
            out[r, t, tok] = confidence
    return out


def test_exit_labels_follow_the_official_rule() -> None:
    # 2 samples; answers at columns 2..3 of the full copy and (after dropping) columns 1..2 of the exit copy.
    labels = torch.tensor([
        [IGNORE_INDEX, IGNORE_INDEX, 1, 2, IGNORE_INDEX],
        [IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX],
        [IGNORE_INDEX, IGNORE_INDEX, 1, 2, IGNORE_INDEX],   # exit copy of sample 0, left-padded one column more
        [IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX],
    ])  # fmt: skip
    full = _logits([[0, 1, 2, 0, 0], [0, 3, 4, 0, 0]])
    same = _logits([[0, 1, 2, 0, 0], [0, 3, 4, 0, 0]])
    label, agree, ratio = exit_labels(torch.cat([full, same]), labels, 2, 0.99, 1.03)
    assert label.tolist() == [1, 1] and agree.tolist() == [1.0, 1.0]
    torch.testing.assert_close(ratio, torch.ones(2))
    # sample 1's exit copy predicts one answer token wrong: agreement 0.5 -> label 0
    wrong = _logits([[0, 1, 2, 0, 0], [0, 3, 0, 0, 0]])
    label, agree, _ = exit_labels(torch.cat([full, wrong]), labels, 2, 0.99, 1.03)
    assert label.tolist() == [1, 0] and agree.tolist() == [1.0, 0.5]
    # same predictions but a less confident exit copy: the loss ratio decides (strictly below the bound)
    unsure = _logits([[0, 1, 2, 0, 0], [0, 3, 4, 0, 0]], confidence=2.0)
    label, _, ratio = exit_labels(torch.cat([full, unsure]), labels, 2, 0.99, 1.03)
    assert bool((ratio > 1.03).all()) and label.tolist() == [0, 0]
    label, _, _ = exit_labels(torch.cat([full, unsure]), labels, 2, 0.99, float(ratio.max()) + 1e-3)
    assert label.tolist() == [1, 1]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    from zoo.train import train

    tmp = tmp_path_factory.mktemp("toy_dyvte")
    (tmp / "toy.yaml").write_text(RECIPE)
    train(tmp / "toy.yaml", runs_dir=tmp / "runs")
    return tmp / "runs" / "toy_dyvte"


@pytest.mark.slow  # two toy stages through the runner plus an eval: 5-20 s on the shared 2-core machine
def test_router_stage_trains_only_routers_and_exports_them_beside_the_base(toy_run: Path) -> None:
    import zoo
    from zoo.methods.dyvte import ROUTER_FILE, load_routers

    final = toy_run / "routers" / "final"
    base, after = load_file(toy_run / "sft" / "final" / "model.safetensors"), load_file(final / "model.safetensors")
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base)  # the LLM stayed frozen
    routers = load_routers(final)
    assert routers.cfg.num_layers == 3 and routers.cfg.hidden_size == 32 and routers.cfg.router_hidden == 8
    assert (final / ROUTER_FILE).is_file()
    summary = json.loads((toy_run / "routers" / "summary.json").read_text())
    metrics = summary["metrics"] if "metrics" in summary else summary
    drawn = sum(v for k, v in metrics.items() if k.startswith("labels/layer") and k.endswith("_samples"))
    assert drawn + metrics["labels/skipped"] == 4 * 4  # every sample of the 4 steps was labelled or counted skipped
    assert not any(k.startswith("labels/layer2") for k in metrics)  # the last layer is never drawn
    # the exported pair runs through the method; threshold 1.01 scored as the plain model would
    model = zoo.load(final)
    assert "t1.01/shapes_vqa/accuracy" in metrics
    method = f"dyvte:routers={final},threshold=0.0"
    model.generate([None], ["hello"], max_new_tokens=2, method=method)
    assert model.last_generation_stats.extra["dyvte/exit_rate"] == 0.0  # no image, no exit
