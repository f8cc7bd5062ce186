"""digits_gen through the eval runner: an oracle generator scores like real data, a DiT-MoE yields routing plots."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import eval as mm_eval
import zoo
from eval.generation.digits_data import load_real_digits
from eval.generation.tasks import DIGITS_GEN, class_labels_reader, routing_mutual_information


class OracleGenerator(torch.nn.Module):
    """'Generates' real digits of the requested class (cycling through the scans), or noise when asked."""

    def __init__(self, noise: bool = False) -> None:
        super().__init__()
        self.x, self.y = load_real_digits(16)
        self.noise = noise
        self.calls: list[dict] = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def sample(self, class_labels, num_steps, cfg_scale, generator):
        self.calls.append({"n": len(class_labels), "num_steps": num_steps, "cfg_scale": cfg_scale})
        if self.noise:
            return torch.rand(len(class_labels), 1, 16, 16, generator=generator) * 2 - 1
        out = []
        for c in class_labels.tolist():
            pool = (self.y == c).nonzero().flatten()
            out.append(self.x[pool[torch.randint(len(pool), (1,), generator=generator)]][0])
        return torch.stack(out)


def _spec(**over):
    return dataclasses.replace(DIGITS_GEN, **over)


def test_reader_interleaves_classes_and_respects_limit() -> None:
    docs = class_labels_reader(_spec(reader_args={"num_classes": 4, "per_class": 3}), {}, limit=6)
    assert [d.target for d in docs] == [0, 1, 2, 3, 0, 1] and docs[5].doc_id == "5"
    with pytest.raises(ValueError, match="unknown reader_args"):
        class_labels_reader(_spec(reader_args={"classes": 4}), {})


def test_digits_gen_oracle_vs_noise(tmp_path) -> None:
    spec = _spec(
        reader_args={"num_classes": 10, "per_class": 30},
        scorer_args={
            "features": "digit_cnn",
            "reference": "sklearn_digits",
            "kid_subsets": 10,
            "grid_per_class": 4,
        },
    )
    oracle = OracleGenerator()
    res = mm_eval.run(oracle, [spec], batch_size=100, output_dir=tmp_path / "oracle", progress=False)
    r = res["results"]["digits_gen"]
    assert oracle.calls[0] == {"n": 100, "num_steps": 50, "cfg_scale": 1.5}
    assert r["class_acc,none"] > 95.0 and r["fid,none"] < 3.0 and r["n_fake,none"] == 300
    assert (
        res["primary_metric"]["digits_gen"] == "fid" and res["higher_is_better"]["digits_gen"]["fid"] is False
    )
    assert "class_acc" not in res["higher_is_better"]["digits_gen"]  # opposite direction: reported as neutral
    noise = mm_eval.run(OracleGenerator(noise=True), [spec], batch_size=100, progress=False)["results"][
        "digits_gen"
    ]
    assert noise["fid,none"] > 30 * r["fid,none"] and noise["class_acc,none"] < 30.0
    assert Image.open(res["artifacts"]["digits_gen"]["samples"]).size == (4 * 66 + 2, 10 * 66 + 2)
    lines = (tmp_path / "oracle" / "samples_digits_gen.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 300 and first["target"] == 0 and first["score"] in (0.0, 1.0)


def test_digits_gen_dit_moe_writes_grid_and_routing_plots(tmp_path) -> None:
    torch.manual_seed(0)
    model = zoo.create_model("dit_tiny", num_experts=4, hidden_size=32, depth=2, num_heads=2)
    art = tmp_path / "artifacts"
    spec = _spec(
        reader_args={"num_classes": 10, "per_class": 2},
        generation={"num_steps": 3, "cfg_scale": 1.5, "seed": 0},
        scorer_args={"features": "digit_cnn", "reference": "sklearn_digits", "kid_subsets": 2, "grid_per_class": 2,
                     "artifacts_dir": str(art)},
    )  # fmt: skip
    r1 = mm_eval.run(model, [spec], batch_size=8, progress=False)["results"]["digits_gen"]
    r2 = mm_eval.run(model, [spec], batch_size=8, progress=False)["results"]["digits_gen"]
    assert r1 == r2  # seeded per batch: the same run twice gives the same numbers
    for key in ("routing_mi_step", "routing_mi_position", "routing_mi_class", "routing_max_expert_share"):
        assert r1[f"{key},none"] is not None and r1[f"{key},none"] >= 0
    grid = Image.open(art / "samples_digits_gen.png")
    assert grid.size == (2 * 66 + 2, 10 * 66 + 2)  # 2 per class, one row per class, 64 px tiles
    for name in ("step", "position", "class", "position_maps"):
        assert Image.open(art / f"routing_{name}.png").format == "PNG"
    assert (art / "routing_counts.npz").is_file()
    with pytest.raises(ValueError, match="unknown generation keys"):
        mm_eval.run(model, [_spec(generation={"steps": 3})], limit=2, progress=False)


def test_mutual_information() -> None:
    independent = torch.ones(1, 4, 3).numpy()
    assert routing_mutual_information(independent)[0] == pytest.approx(0.0, abs=1e-12)
    deterministic = torch.eye(4).reshape(1, 4, 4).numpy()  # row y always picks expert y: I = log2(4)
    assert routing_mutual_information(deterministic)[0] == pytest.approx(2.0)


def test_digits_gen_is_found_by_name() -> None:
    assert "digits_gen" in mm_eval.list_tasks()
    res = mm_eval.run(OracleGenerator(), "digits_gen", limit=20, batch_size=20, progress=False)
    r = res["results"]["digits_gen"]
    assert r["n_fake,none"] == 20 and r["class_acc,none"] >= 90.0


def test_npz_reference_and_bad_scorer_args(tmp_path) -> None:
    x, y = load_real_digits(16)
    # an ADM-style reference batch: uint8 NHWC under arr_0 (RGB copies of the grey digits)
    arr = ((x[:600] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)
    np_path = tmp_path / "ref.npz"
    np.savez(np_path, arr_0=arr.numpy())
    spec = _spec(
        reader_args={"num_classes": 10, "per_class": 10},
        scorer_args={"features": "digit_cnn", "reference": str(np_path), "kid_subsets": 5},
    )
    r = mm_eval.run(OracleGenerator(), [spec], batch_size=100, progress=False)["results"]["digits_gen"]
    assert r["n_real,none"] == 600 and r["class_acc,none"] > 90.0 and r["fid,none"] < 10
    with pytest.raises(ValueError, match="unknown scorer_args"):
        mm_eval.run(OracleGenerator(), [_spec(scorer_args={"feature": "digit_cnn"})], limit=2, progress=False)
    with pytest.raises(ValueError, match="needs scorer_args.inception_weights"):
        mm_eval.run(
            OracleGenerator(), [_spec(scorer_args={"features": "inception"})], limit=2, progress=False
        )
    with pytest.raises(FileNotFoundError, match="ADM-style"):
        mm_eval.run(
            OracleGenerator(), [_spec(scorer_args={"reference": "imagenet"})], limit=2, progress=False
        )
