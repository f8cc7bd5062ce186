"""transformers LlavaForConditionalGeneration -> our model: same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from zoo.convert import convert, main
from zoo.convert.llava_hf import load_llava_hf
from zoo.registry import load

VOCAB = 120
IMAGE = 119


def _llava(tmp_path, strategy: str = "default"):
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        ),
        image_token_index=IMAGE,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "llava")
    return model


def _inputs(n_img_tokens: int):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 100, (2, 12), generator=g)
    ids = torch.cat([text[:, :3], torch.full((2, n_img_tokens), IMAGE), text[:, 3:]], 1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    px = torch.randn(2, 3, 32, 32, generator=g)
    return ids, mask, px


@pytest.mark.parametrize("strategy,n_tokens", [("default", 16), ("full", 17)])
def test_llava_hf_logits_reproduced(tmp_path, strategy: str, n_tokens: int) -> None:
    ref_model = _llava(tmp_path, strategy)
    ours = load_llava_hf(tmp_path / "llava")
    assert ours.num_image_tokens == n_tokens and ours.image_token_id == IMAGE
    ids, mask, px = _inputs(n_tokens)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask, pixel_values=px, position_ids=pos).logits
        _, logits, _ = ours(ids, mask, px)
    keep = mask.bool()
    assert (logits[keep] - ref[keep]).abs().max() < 1e-4


def test_llava_hf_convert_cli_round_trip(tmp_path) -> None:
    ref_model = _llava(tmp_path)
    assert main(["auto", str(tmp_path / "llava"), str(tmp_path / "zoo")]) == 0
    ours = load(tmp_path / "zoo")
    ids, mask, px = _inputs(16)
    with torch.no_grad():
        ref = ref_model(input_ids=ids[:1], pixel_values=px[:1]).logits
        _, logits, _ = ours(ids[:1], None, px[:1])
    assert (logits - ref).abs().max() < 1e-4
    with pytest.raises(ValueError, match="not a format zoo convert knows"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text('{"model_type": "gpt2"}')
        convert(tmp_path / "bad", tmp_path / "out")


def test_llava_hf_pre_4_52_key_layout(tmp_path) -> None:
    """The hub layout of llava-hf checkpoints (transformers 4.x): vision_tower.vision_model.*, language_model.*."""
    from safetensors.torch import load_file, save_file

    ref_model = _llava(tmp_path)
    d = tmp_path / "llava"
    sd = load_file(str(d / "model.safetensors"))
    old = {}
    for k, v in sd.items():
        # transformers 5 writes the tower without `vision_model.`; 4.x files (the hub's) have it
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower.") :]
        old[k] = v
    assert any(k.startswith("language_model.model.") for k in old)
    save_file(old, str(d / "model.safetensors"))
    ours = load_llava_hf(d)
    ids, mask, px = _inputs(16)
    with torch.no_grad():
        ref = ref_model(input_ids=ids[:1], pixel_values=px[:1]).logits
        assert (ours(ids[:1], None, px[:1])[1] - ref).abs().max() < 1e-4


def test_greedy_generation_matches_hf_llava_generate(tmp_path) -> None:
    ref_model = _llava(tmp_path)
    ours = load_llava_hf(tmp_path / "llava")
    ids, mask, px = _inputs(16)
    with torch.no_grad():
        ref = ref_model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=px,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    new = ours.generate_ids(ids, mask, max_new_tokens=8, pixel_values=px)
    assert torch.equal(new, ref[:, ids.shape[1] :])
    assert ours.last_generation_stats.generated_tokens == 16
