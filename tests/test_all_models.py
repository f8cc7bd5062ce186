"""Every registered architecture: it builds (full sizes on the meta device, CPU-sized ones for real), its parameter
counts equal the table below (the one place they are written; the README's model table quotes them, checked here),
and the CPU-sized ones round-trip save_pretrained -> zoo.load with identical state dicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zoo
from zoo import registry
from zoo.models import uni_moe
from zoo.models.dit import DiT, count_params
from zoo.registry import SHIPPED_WEIGHTS_DIR, list_models, save_pretrained

ROOT = Path(__file__).resolve().parents[1]

# The shipped tiny MoE-LLaVA's own arguments: the README's tiny row is that model (stage III, with experts; its
# word-level vocabulary, 162 words, is the one it was trained with, 8 more than build_tokenizer() gives today).
_SHIPPED_TINY_ARGS = json.loads((SHIPPED_WEIGHTS_DIR / "moe_llava_tiny.shapes" / "config.json").read_text())["model_args"]

# A complete Uni-MoE description (uni_moe_custom takes the whole model): the tiny model's parts, 160-word vocabulary.
_UNI_MOE_CUSTOM_ARGS = dict(
    vision=uni_moe.TINY_VISION, lm={**uni_moe.TINY_LM, "vocab_size": 160}, speech=uni_moe.TINY_SPEECH,
    uni_moe=uni_moe.UniMoESettings().to_dict(), lora=uni_moe.STAGE3_LORA, video_frames=4,
)

# Arguments a builder needs (moe_llava_custom takes the whole model description) or that pick the README's variant.
BUILD_ARGS: dict[str, dict] = {
    "moe_llava_tiny": _SHIPPED_TINY_ARGS,
    "moe_llava_custom": _SHIPPED_TINY_ARGS,
    "uni_moe_custom": _UNI_MOE_CUSTOM_ARGS,
    # F-LMM with its default heads (U-Net 32 wide, 3 levels; TINY_SAM) on the shipped tiny MoE-LLaVA.
    "flmm": {"base_architecture": "moe_llava_tiny", "base_args": _SHIPPED_TINY_ARGS},
}

# Small enough to build for real on a CPU in a test (and open_clip towers cannot be built on the meta device).
CPU_SIZED = {"clip_vit_tiny", "clip_vit_tiny4", "digit_cnn", "dit_tiny", "dit_moe_tiny", "moe_llava_tiny",
             "moe_llava_custom", "uni_moe_tiny", "uni_moe_custom", "flmm"}

# name -> (total, activated) parameters; activated counts top-k of the routed experts of each MoE layer.
EXPECTED_PARAMS: dict[str, tuple[int, int]] = {
    "clip_vit_tiny": (3_916_673, 3_916_673),
    "clip_vit_tiny4": (4_114_945, 4_114_945),
    "digit_cnn": (28_218, 28_218),
    "dit_s_2": (32_963_360, 32_963_360),
    "dit_s_4": (32_945_024, 32_945_024),
    "dit_s_8": (33_148_160, 33_148_160),
    "dit_b_2": (130_512_416, 130_512_416),
    "dit_b_4": (130_475_648, 130_475_648),
    "dit_b_8": (130_881_536, 130_881_536),
    "dit_l_2": (458_102_816, 458_102_816),
    "dit_l_4": (458_053_760, 458_053_760),
    "dit_l_8": (458_594_816, 458_594_816),
    "dit_xl_2": (675_129_632, 675_129_632),
    "dit_xl_4": (675_074_432, 675_074_432),
    "dit_xl_8": (675_683_072, 675_683_072),
    "dit_moe_s_2_8e2a": (199_307_552, 71_905_568),
    "dit_moe_s_2_16e2a": (369_213_728, 71_942_432),
    "dit_moe_b_2_8e2a": (795_861_536, 286_253_600),
    "dit_moe_l_2_8e2a": (2_823_764_000, 1_011_824_672),
    "dit_moe_xl_2_8e2a": (4_168_172_192, 1_492_730_528),
    "dit_moe_g_2_16e2a": (16_503_731_232, 3_181_573_152),
    "dit_tiny": (332_576, 332_576),
    "dit_moe_tiny": (627_744, 332_832),
    "moe_llava_tiny": (2_501_282, 1_974_434),
    "moe_llava_custom": (2_501_282, 1_974_434),
    "flmm": (4_735_405, 4_208_557),  # the tiny MoE-LLaVA's 2,501,282 (frozen) + 2,234,123 grounding parameters
    "moe_llava_phi2_4e": (5_609_732_096, 3_931_600_896),
    "moe_llava_phi2_4e_384": (5_734_777_920, 4_056_646_720),
    "moe_llava_stablelm_4e": (3_200_124_928, 2_369_652_736),
    "moe_llava_stablelm_4e_384": (3_325_105_216, 2_494_633_024),
    "moe_llava_qwen_4e": (3_364_126_720, 2_552_528_896),
    "uni_moe_tiny": (3_082_944, 2_222_784),
    "uni_moe_custom": (3_084_480, 2_224_320),
    "uni_moe_speech_4e": (20_348_703_488, 11_668_460_288),
    "uni_moe_speech_4e_interval": (13_832_459_008, 9_492_337_408),
    "uni_moe_audio_4e": (13_780_275_312, 9_440_153_712),
    "uni_moe_speech_8e": (37_709_714_176, 11_668_984_576),
}
# The paper (and the README) count MoE-LLaVA's language model only: name -> (LM total, LM activated).
EXPECTED_LM_PARAMS: dict[str, tuple[int, int]] = {
    "moe_llava_phi2_4e": (5_297_044_480, 3_618_913_280),
    "moe_llava_phi2_4e_384": (5_297_044_480, 3_618_913_280),
    "moe_llava_stablelm_4e": (2_890_321_920, 2_059_849_728),
    "moe_llava_stablelm_4e_384": (2_890_321_920, 2_059_849_728),
    "moe_llava_qwen_4e": (3_054_323_712, 2_242_725_888),
}


def _zoo_models() -> list[str]:
    """Registered architectures that zoo ships (other tests register throwaway ones of their own)."""
    return [n for n in list_models() if registry._MODELS[n].builder.__module__.startswith("zoo.")]


def _counts(model: torch.nn.Module) -> tuple[int, int]:
    if isinstance(model, DiT):
        return count_params(model)
    if hasattr(model, "num_parameters"):
        n = model.num_parameters()
        return n["total"], n["active"]
    total = sum(p.numel() for p in model.parameters())
    return total, total


def _build(name: str) -> torch.nn.Module:
    if name in CPU_SIZED:
        torch.manual_seed(0)
        return zoo.create_model(name, **BUILD_ARGS.get(name, {}))
    with torch.device("meta"):
        return zoo.create_model(name, **BUILD_ARGS.get(name, {}))


def test_the_table_covers_every_registered_architecture() -> None:
    assert set(_zoo_models()) == set(EXPECTED_PARAMS)
    assert CPU_SIZED <= set(EXPECTED_PARAMS) and set(EXPECTED_LM_PARAMS) <= set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", _zoo_models())
def test_every_architecture_builds_with_its_tabled_parameter_count(name: str, tmp_path: Path) -> None:
    model = _build(name)
    assert _counts(model) == EXPECTED_PARAMS[name]
    if name in EXPECTED_LM_PARAMS:
        n = model.num_parameters()
        assert (n["llm_total"], n["llm_active"]) == EXPECTED_LM_PARAMS[name]
    if name not in CPU_SIZED:
        assert all(p.is_meta for p in model.parameters())
        return
    out = save_pretrained(model, tmp_path / name, name, BUILD_ARGS.get(name, {}))
    loaded = zoo.load(out)
    assert type(loaded) is type(model) and not loaded.training
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _si(n: int, unit: str, decimals: int) -> str:
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}[unit]
    return f"{n / scale:.{decimals}f}{unit}"


def test_readme_model_table_quotes_the_tabled_counts() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Models") : readme.index("## Recipes")]
    p, lm = EXPECTED_PARAMS, EXPECTED_LM_PARAMS
    quotes = [
        f"{_si(p['moe_llava_tiny'][0], 'M', 2)} / {_si(p['moe_llava_tiny'][1], 'M', 2)}",
        f"LM {_si(lm['moe_llava_phi2_4e'][0], 'B', 2)} / {_si(lm['moe_llava_phi2_4e'][1], 'B', 2)}",
        f"LM {_si(lm['moe_llava_stablelm_4e'][0], 'B', 2)} / {_si(lm['moe_llava_stablelm_4e'][1], 'B', 2)}",
        f"LM {_si(lm['moe_llava_qwen_4e'][0], 'B', 2)} / {_si(lm['moe_llava_qwen_4e'][1], 'B', 2)}",
        f"| {_si(p['clip_vit_tiny'][0], 'M', 1)} |",
        f"| {_si(p['clip_vit_tiny4'][0], 'M', 1)} |",
        f"DiT-XL/2: {p['dit_xl_2'][0]:,} params",
        f"S/2-8E2A {_si(p['dit_moe_s_2_8e2a'][0], 'M', 1)} / {_si(p['dit_moe_s_2_8e2a'][1], 'M', 1)}",
        f"XL/2-8E2A {_si(p['dit_moe_xl_2_8e2a'][0], 'B', 2)} / {_si(p['dit_moe_xl_2_8e2a'][1], 'B', 2)}",
        f"G/2-16E2A {_si(p['dit_moe_g_2_16e2a'][0], 'B', 1)} / {_si(p['dit_moe_g_2_16e2a'][1], 'B', 2)}",
        f"dense {_si(p['dit_tiny'][0], 'K', 0)}; MoE {_si(p['dit_moe_tiny'][0], 'K', 0)} / "
        f"{_si(p['dit_moe_tiny'][1], 'K', 0)}",
        f"| {_si(p['digit_cnn'][0], 'K', 0)} |",
        f"{_si(p['uni_moe_tiny'][0], 'M', 2)} / {_si(p['uni_moe_tiny'][1], 'M', 2)}",
        f"{_si(p['uni_moe_speech_4e'][0], 'B', 2)} / {_si(p['uni_moe_speech_4e'][1], 'B', 2)}; interval "
        f"{_si(p['uni_moe_speech_4e_interval'][0], 'B', 2)} / {_si(p['uni_moe_speech_4e_interval'][1], 'B', 2)}",
        f"{_si(p['uni_moe_audio_4e'][0], 'B', 2)} / {_si(p['uni_moe_audio_4e'][1], 'B', 2)}",
        f"{_si(p['uni_moe_speech_8e'][0], 'B', 2)} / {_si(p['uni_moe_speech_8e'][1], 'B', 2)}",
    ]
    assert [q for q in quotes if q not in table] == []
