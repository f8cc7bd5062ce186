"""The names of the registered architectures, written out so that `zoo list` and a misspelt `--model` answer without
importing torch or any model family (importing them all takes 5-20 s; reading this file takes milliseconds).

Generated from the live registry by ``python -m zoo.model_index``; tests/test_model_index.py fails, naming that
command, when a family registers or drops a name without regenerating it. ``zoo.registry.list_models`` stays the
authority (it imports every family); this file is only its fast copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["MODEL_FAMILIES", "render"]

# architecture name -> family (the module that registers it)
MODEL_FAMILIES: dict[str, str] = {
    'clip_vit_tiny': 'clip',
    'clip_vit_tiny4': 'clip',
    'digit_cnn': 'digit_cnn',
    'dit_b_2': 'dit',
    'dit_b_4': 'dit',
    'dit_b_8': 'dit',
    'dit_l_2': 'dit',
    'dit_l_4': 'dit',
    'dit_l_8': 'dit',
    'dit_moe_b_2_8e2a': 'dit',
    'dit_moe_g_2_16e2a': 'dit',
    'dit_moe_l_2_8e2a': 'dit',
    'dit_moe_s_2_16e2a': 'dit',
    'dit_moe_s_2_8e2a': 'dit',
    'dit_moe_tiny': 'dit',
    'dit_moe_xl_2_8e2a': 'dit',
    'dit_s_2': 'dit',
    'dit_s_4': 'dit',
    'dit_s_8': 'dit',
    'dit_tiny': 'dit',
    'dit_xl_2': 'dit',
    'dit_xl_4': 'dit',
    'dit_xl_8': 'dit',
    'flmm': 'flmm',
    'moe_llava_custom': 'moe_llava',
    'moe_llava_phi2_4e': 'moe_llava',
    'moe_llava_phi2_4e_384': 'moe_llava',
    'moe_llava_qwen_4e': 'moe_llava',
    'moe_llava_stablelm_4e': 'moe_llava',
    'moe_llava_stablelm_4e_384': 'moe_llava',
    'moe_llava_tiny': 'moe_llava',
    'uni_moe_audio_4e': 'uni_moe',
    'uni_moe_custom': 'uni_moe',
    'uni_moe_speech_4e': 'uni_moe',
    'uni_moe_speech_4e_interval': 'uni_moe',
    'uni_moe_speech_8e': 'uni_moe',
    'uni_moe_tiny': 'uni_moe',
}


def render() -> str:
    """This file's text with MODEL_FAMILIES taken from the live registry."""
    from zoo.registry import _MODELS, list_models

    rows = "".join(f"    {name!r}: {_MODELS[name].family!r},\n" for name in list_models())
    text = Path(__file__).read_text()
    head, rest = text.split("MODEL_FAMILIES: dict[str, str] = {\n", 1)
    return head + "MODEL_FAMILIES: dict[str, str] = {\n" + rows + rest[rest.index("}\n"):]


if __name__ == "__main__":
    Path(__file__).write_text(render())
    print(f"wrote {Path(__file__)}", file=sys.stderr)
