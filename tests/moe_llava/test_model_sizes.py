"""Full-size MoE-LLaVA architectures, built on the meta device: parameter counts against the paper."""

from __future__ import annotations

import pytest
import torch

from zoo.models.moe_llava import PAPER_PARAMS_B
from zoo.registry import create_model


@pytest.mark.parametrize(
    "arch,size,n_moe,tokens",
    [
        ("moe_llava_stablelm_4e", "stablelm", 12, 576),
        ("moe_llava_qwen_4e", "qwen", 12, 576),
        ("moe_llava_phi2_4e", "phi2", 16, 576),
        ("moe_llava_phi2_4e_384", "phi2", 16, 728),
    ],
)
def test_full_size_parameter_counts_match_paper(arch: str, size: str, n_moe: int, tokens: int) -> None:
    with torch.device("meta"):
        model = create_model(arch)
    assert len(model.moe_layers) == n_moe and model.moe_layers[:3] == [0, 2, 4]
    assert model.num_image_tokens == tokens
    n = model.num_parameters()
    total_b, active_b = PAPER_PARAMS_B[size]
    # The paper's totals/activated counts are the language model's (the ~0.3-0.4B vision tower is not in them).
    assert n["llm_total"] / 1e9 == pytest.approx(total_b, abs=0.06)
    assert n["llm_active"] / 1e9 == pytest.approx(active_b, abs=0.06)
    assert n["active"] < n["total"]
