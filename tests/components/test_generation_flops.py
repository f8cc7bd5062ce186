"""decoder_prefill_flops against torch's FlopCounterMode (eager attention, so the score matmuls are counted)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from zoo.components.generation import decoder_prefill_flops, next_token
from zoo.components.lm import CausalLMWrapper, build_causal_lm
from zoo.moe import upcycle_causal_lm

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
CONFIGS = {
    "phi": dict(model_type="phi", partial_rotary_factor=0.5, **TINY),
    "llama": dict(model_type="llama", num_key_value_heads=2, **TINY),
    "llama_moe": dict(model_type="llama", num_key_value_heads=2, **TINY),
}


def _measured(wrap: CausalLMWrapper, ids: torch.Tensor, hooks=()) -> tuple[int, list[torch.Tensor]]:
    """FLOPs the decoder layers actually ran (per-module counts), and the lengths the wrapper recorded."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = wrap(input_ids=ids, hooks=hooks)
    per_module = counter.get_flop_counts()
    layers = [f"CausalLMWrapper.lm.model.layers.{i}" for i in range(len(wrap.layers))]
    return sum(sum(per_module[name].values()) for name in layers), out.state.layer_lengths


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_flops_equal_a_direct_count(name: str) -> None:
    torch.manual_seed(0)
    lm = build_causal_lm(dict(CONFIGS[name]), attn_implementation="eager").eval()
    if (
        name == "llama_moe"
    ):  # dropless top-2 of 4 experts on layers 0 and 2: every token reaches exactly 2 experts
        assert upcycle_causal_lm(lm, num_experts=4, top_k=2, layers=[0, 2]) == [0, 2]
    wrap = CausalLMWrapper(lm)
    ids = torch.randint(0, 97, (1, 11))
    measured, lengths = _measured(wrap, ids)
    assert decoder_prefill_flops(wrap, lengths) == measured

    # a hook that drops 5 tokens after layer 0: the later layers are credited with the 6 tokens they ran on
    def drop(i, state):
        if i != 0:
            return None
        keep = torch.ones_like(state.padding_mask, dtype=torch.bool)
        keep[:, 2:7] = False
        return wrap.drop_tokens(state, keep)

    dropped, lengths = _measured(wrap, ids, hooks=[drop])
    assert [int(n) for n in torch.stack(lengths)[:, 0]] == [11, 6, 6]
    assert decoder_prefill_flops(wrap, lengths) == dropped < measured


def test_flops_count_rows_of_a_padded_batch_separately() -> None:
    torch.manual_seed(0)
    wrap = CausalLMWrapper(build_causal_lm(dict(CONFIGS["llama"])).eval())
    one = decoder_prefill_flops(wrap, [[7]] * 3) + decoder_prefill_flops(wrap, [[4]] * 3)
    assert decoder_prefill_flops(wrap, [[7, 4]] * 3) == one
    with pytest.raises(ValueError, match="lengths for 2 layers"):
        decoder_prefill_flops(wrap, [[7], [7]])


def test_next_token_greedy_and_nucleus() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9]])
    assert next_token(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    # a nucleus this small keeps only the most likely token, so sampling is greedy
    assert next_token(logits, do_sample=True, top_p=1e-6, generator=g).tolist() == [1, 0]
    samples = torch.stack(
        [next_token(logits, do_sample=True, temperature=5.0, generator=g) for _ in range(200)]
    )
    assert set(samples[:, 0].tolist()) == {0, 1, 2}  # a high temperature reaches every token
