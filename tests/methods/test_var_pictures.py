"""Attention pictures: `zoo attend` on the shipped demo model, and `zoo eval --log-attention N` in the runner."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from eval.runner import run
from zoo.attend import attention_figure, main
from zoo.methods import build_method
from zoo.registry import create_model

CLIP_VISION = dict(
    model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, image_size=32, patch_size=8,
)  # fmt: skip
LM = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)


def test_zoo_attend_writes_the_grid_and_reports_the_sink_dims(tmp_path, capsys) -> None:
    out = tmp_path / "sub" / "looks.png"
    assert main(["--scene", "test:2", "--var", "var:tau=2,rho=0.9", "--out", str(out), "What color is the circle?"]) == 0
    text = capsys.readouterr().out
    assert "sink dims used:" in text and "ratio" in text and "answer:" in text
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 800 and img.size[1] > 4 * 200  # four layer rows
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["looks.png", "sub"]  # no temp file left behind
    with pytest.raises(SystemExit, match="expected SPLIT:INDEX"):
        main(["--scene", "nosplit:1", "--out", str(out), "q"])
    assert main(["--scene", "test:2", "--var", "none", "--out", str(out), "q"]) == 2


def test_attention_figure_has_a_row_per_layer_and_marks_sinks() -> None:
    torch.manual_seed(0)
    model = create_model("moe_llava_tiny", vision=dict(kind="hf", config=CLIP_VISION), lm=LM).eval()
    image = Image.new("RGB", (40, 32), (200, 30, 30))  # not square: drawn padded, as the model sees it
    method = build_method("var:tau=1.5,dims=3+7,record=true,summ=0")
    model.generate([image], ["what color is it ?"], max_new_tokens=2, method=method)
    state = method.last_state
    record = {
        layer: {**maps, "visual": state.visual[0], "sinks": state.sinks[layer][0] if layer in state.sinks else None}
        for layer, maps in state.maps.items()
    }
    fig = attention_figure(image, record, 0, "t")
    assert len(fig.axes) == 4 * 4
    outlined = [len(ax.patches) for ax in fig.axes]
    n_sinks = [int((state.sinks[i][0] & state.visual[0]).sum()) if i in state.sinks else 0 for i in range(4)]
    assert outlined[::4] == n_sinks and sum(n_sinks) > 0
    record[2]["visual"] = record[2]["visual"].clone()
    record[2]["visual"][record[2]["visual"].nonzero()[0, 0]] = False  # 15 tokens: no square grid
    with pytest.raises(ValueError, match="square grid"):
        attention_figure(image, record, 0, "t")


def test_eval_log_attention_writes_pictures_for_the_first_docs_without_changing_scores(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("moe_llava_tiny", vision=dict(kind="hf", config=CLIP_VISION), lm=LM).eval()
    plain = run(model, "shapes_vqa", limit=2, batch_size=1, output_dir=tmp_path / "a", progress=False)
    logged = run(model, "shapes_vqa", limit=2, batch_size=1, output_dir=tmp_path / "b", progress=False,
                 log_attention=1)  # fmt: skip
    pics = sorted((tmp_path / "b" / "attention").glob("*.png"))
    assert [p.name for p in pics] == ["shapes_vqa_0_0.png"]  # the first document only
    assert logged["attention_log"]["written"] == {"shapes_vqa": 1}
    assert logged["results"] == plain["results"]
    answers = [
        [json.loads(line)["resps"] for line in (tmp_path / d / "samples_shapes_vqa.jsonl").read_text().splitlines()]
        for d in ("a", "b")
    ]
    assert answers[0] == answers[1] and len(answers[0]) == 2
    with pytest.raises(ValueError, match="needs an output_dir"):
        run(model, "shapes_vqa", limit=1, progress=False, log_attention=1)
