"""A converted Phi-2-layout MoE-LLaVA release evaluates on a GPU when one is there (`zoo.load(..., device=,
dtype=)`, `zoo eval --device/--dtype`). Skipped without CUDA; the tiny release is written in the official layout
by the converter tests' own helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

def _helpers():
    # Loaded inside the test, so that collecting this file on a machine without CUDA costs nothing.
    spec = importlib.util.spec_from_file_location("convert_official_helpers",
                                                  Path(__file__).parent / "test_convert_official.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converted_phi_release_runs_on_the_gpu_like_on_the_cpu(tmp_path):
    import zoo
    from zoo.convert import convert

    _h = _helpers()
    model = _h._tiny_release(tmp_path, _h.PHI)
    sd = _h._official_phi_or_stablelm(model, swiglu=False)
    src = _h._write_release(tmp_path, "rel", sd, _h._official_config(tmp_path, model, "moe_llava_phi", _h.PHI))
    out = convert(src, tmp_path / "converted")
    cpu = zoo.load(out)
    gpu = zoo.load(out, device="cuda", dtype="bf16")
    assert next(gpu.parameters()).device.type == "cuda"
    ids, mask, px = _h._inputs()
    with torch.no_grad():
        ref = cpu(ids, mask, px)[1]
        got = gpu(ids.cuda(), mask.cuda(), px.cuda().bfloat16())[1].float().cpu()
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=0.15, rtol=0.05)  # bf16 against fp32
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert gpu.generate([image], ["what color?"], max_new_tokens=4) == cpu.to(torch.bfloat16).cuda().generate(
        [image], ["what color?"], max_new_tokens=4)  # fmt: skip
