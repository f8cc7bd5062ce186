"""The LM wrapper's layer loop must reproduce the transformers model's own forward exactly."""

from __future__ import annotations

import pytest
import torch

from zoo.components.lm import CausalLMWrapper, build_causal_lm, positions_from_mask

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=128,
)
CONFIGS = {
    "phi": dict(model_type="phi", partial_rotary_factor=0.5, **TINY),
    "llama": dict(model_type="llama", num_key_value_heads=2, **TINY),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **TINY),
    "qwen2_sliding": dict(
        model_type="qwen2",
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        **TINY,
    ),
    "stablelm": dict(model_type="stablelm", num_key_value_heads=2, partial_rotary_factor=0.25, **TINY),
}


def _lm(name: str):
    torch.manual_seed(0)
    lm = build_causal_lm(CONFIGS[name]).eval()
    return lm, CausalLMWrapper(lm)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_wrapper_matches_hf_forward_left_padded_and_cached(name: str) -> None:
    lm, wrap = _lm(name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :5] = 0
    pos = positions_from_mask(mask, 9)
    with torch.no_grad():
        ref = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ours = wrap(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=1e-5)

        # prefill 6 tokens, then decode 3 one by one with the cache: same logits as the full forward
        out = wrap(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        cache = out.cache
        steps = [out.logits[:, -1]]
        for t in range(6, 9):
            o = wrap(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
            steps.append(o.logits[:, -1])
        torch.testing.assert_close(torch.stack(steps, 1), ref[:, 5:9], atol=1e-5, rtol=1e-5)

        # HF's own cached path agrees too
        hf = lm(input_ids=ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], use_cache=True)
        hf2 = lm(
            input_ids=ids[:, 6:7],
            attention_mask=mask[:, :7],
            position_ids=pos[:, 6:7],
            cache=hf.past_key_values,
            use_cache=True,
        )
        torch.testing.assert_close(hf2.logits[:, -1], steps[1], atol=1e-5, rtol=1e-5)


def test_wrapper_unpadded_matches_and_hooks_see_every_layer() -> None:
    lm, wrap = _lm("phi")
    ids = torch.randint(0, 97, (2, 7))
    seen = []

    def hook(i, state):
        seen.append((i, tuple(state.hidden.shape)))
        return None

    with torch.no_grad():
        ref = lm(input_ids=ids).logits
        out = wrap(input_ids=ids, hooks=[hook])
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    assert seen == [(i, (2, 7, 32)) for i in range(3)]


def test_wrapper_gradients_flow_through_inputs_embeds() -> None:
    lm, wrap = _lm("llama")
    emb = wrap.embed(torch.randint(0, 97, (2, 5))).detach().requires_grad_(True)
    wrap(inputs_embeds=emb).logits.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_wrapper_rejects_bad_mask_shape() -> None:
    _, wrap = _lm("llama")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        wrap(input_ids=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_layer_kwargs_reach_a_registered_attention_function() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, kwargs.get("image_span")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("zoo_test_spy", spy)
    from transformers import AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionMaskInterface.register("zoo_test_spy", sdpa_mask)
    lm, wrap = _lm("llama")
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        ref = wrap(input_ids=ids).logits
        lm.set_attn_implementation("zoo_test_spy")
        out = wrap(input_ids=ids, layer_kwargs={"image_span": (1, 4)}).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert seen == [(i, (1, 4)) for i in range(3)]
