"""zoo_capture: attention of chosen queries to media keys, equal to eager attention weights; outputs equal sdpa."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from zoo.components.attention import CAPTURE_ATTENTION, AttentionCapture, media_key_positions, use_attention
from zoo.components.lm import CausalLMWrapper, build_causal_lm, positions_from_mask

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
CONFIGS = {
    "phi": dict(model_type="phi", partial_rotary_factor=0.5, **TINY),
    "llama": dict(model_type="llama", num_key_value_heads=2, **TINY),
}
MEDIA = slice(5, 9)  # columns every row holds real tokens at (stand-ins for image tokens)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_capture_through_the_wrapper_equals_eager_in_prefill_and_decode(name: str) -> None:
    torch.manual_seed(0)
    wrap = CausalLMWrapper(build_causal_lm(dict(CONFIGS[name])).eval())
    ids, mask = _batch()
    prompt = 9
    media = torch.zeros(3, 12, dtype=torch.bool)
    media[:, MEDIA] = True
    capture = AttentionCapture(layers=[1], keys=media_key_positions(media[:, :prompt]))
    with torch.no_grad():
        plain = [wrap(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)]
        for t in range(prompt, 12):
            plain.append(wrap(input_ids=ids[:, t : t + 1], cache=plain[0].cache))
        with use_attention(wrap, CAPTURE_ATTENTION):
            ours = [
                wrap(
                    input_ids=ids[:, :prompt],
                    attention_mask=mask[:, :prompt],
                    use_cache=True,
                    layer_kwargs={"attention_capture": capture},
                )
            ]
            for t in range(prompt, 12):
                kw = {"attention_capture": capture}
                ours.append(wrap(input_ids=ids[:, t : t + 1], cache=ours[0].cache, layer_kwargs=kw))
        assert wrap.config._attn_implementation == "sdpa"  # restored
        # every layer's output is sdpa's, bit for bit
        for a, b in zip(ours, plain):
            assert torch.equal(a.logits, b.logits)
        # eager weights of the full sequence, by transformers' own forward
        wrap.lm.set_attn_implementation("eager")
        ref = wrap.lm(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions_from_mask(mask, 12),
            output_attentions=True,
        ).attentions
        wrap.lm.set_attn_implementation("sdpa")
    assert sorted(capture.maps) == [1] and len(capture.maps[1]) == 1 + 12 - prompt
    for call, got in enumerate(capture.maps[1]):
        assert got.shape == (3, 4, 1, 4)
        expected = ref[1][:, :, prompt - 1 + call, MEDIA].unsqueeze(2)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert float(capture.maps[1][0].sum()) > 0


def test_capture_on_transformers_llava_equals_eager() -> None:
    torch.manual_seed(0)
    image_id = 119
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=8, projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        ),
        image_token_index=image_id,
        vision_feature_layer=-2,
    )  # fmt: skip
    llava = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 100, (2, 8), generator=g)
    ids = torch.cat([text[:, :2], torch.full((2, 4), image_id), text[:, 2:]], 1)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    px = torch.randn(2, 3, 16, 16, generator=g)
    queries = torch.tensor([5, 8, 11])  # an image token, text after it, the last position
    capture = AttentionCapture(layers=[0, 2], keys=media_key_positions(ids == image_id), queries=queries)
    with torch.no_grad():
        plain = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        with use_attention(llava, CAPTURE_ATTENTION):
            assert llava.config.text_config._attn_implementation == CAPTURE_ATTENTION
            assert (
                llava.config.vision_config._attn_implementation == "sdpa"
            )  # only the language model switches
            got = llava(input_ids=ids, attention_mask=mask, pixel_values=px, attention_capture=capture).logits
        llava.set_attn_implementation("eager")
        ref = llava(input_ids=ids, attention_mask=mask, pixel_values=px, output_attentions=True).attentions
    assert llava.config.text_config._attn_implementation == "eager"
    assert torch.equal(got, plain)
    assert sorted(capture.maps) == [0, 2]
    for layer in (0, 2):
        (maps,) = capture.maps[layer]
        assert maps.shape == (2, 4, 3, 4)
        torch.testing.assert_close(maps, ref[layer][:, :, queries][..., 2:6], atol=1e-6, rtol=0)


def test_use_attention_restores_on_error_and_media_keys_need_equal_counts() -> None:
    wrap = CausalLMWrapper(build_causal_lm(dict(CONFIGS["llama"])).eval())
    with pytest.raises(RuntimeError, match="inside"), use_attention(wrap, "eager"):
        assert wrap.config._attn_implementation == "eager"
        raise RuntimeError("inside")
    assert wrap.config._attn_implementation == "sdpa"
    uneven = torch.tensor([[True, True, False], [False, True, False]])
    with pytest.raises(ValueError, match="different numbers of media tokens"):
        media_key_positions(uneven)
