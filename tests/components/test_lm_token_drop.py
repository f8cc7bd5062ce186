"""Per-layer lengths: a hook that drops tokens after layer k leaves a correct model, in prefill and decoding.

The reference runs each row on its own (batch of one, no padding) through the decoder-layer modules by hand: layers
<= k on the full prompt, layers > k on the kept tokens only with their original positions, each layer with its own
transformers ``DynamicCache`` layer. It shares no mask, padding or position code with the wrapper.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from zoo.components.lm import CausalLMWrapper, build_causal_lm

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=128,
)
CONFIGS = {
    "phi": dict(model_type="phi", partial_rotary_factor=0.5, **TINY),
    "llama": dict(model_type="llama", num_key_value_heads=2, **TINY),
}
DROP_AFTER = 1
DECODE_STEPS = 16


def _wrapper(name: str) -> CausalLMWrapper:
    torch.manual_seed(0)
    return CausalLMWrapper(build_causal_lm(dict(CONFIGS[name])).eval())


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :2] = 0  # left padding, rows of 10, 8 and 6 real tokens
    mask[2, :4] = 0
    return ids, mask


def _keep(mask: torch.Tensor, same_count: bool) -> torch.Tensor:
    """Drop a middle span of each row's real tokens: 3 / 1 / 4 tokens, or 2 in every row."""
    keep = mask.bool().clone()
    spans = [(3, 5)] * 3 if same_count else [(2, 5), (4, 5), (5, 9)]
    for b, (lo, hi) in enumerate(spans):
        keep[b, lo:hi] = False
    return keep


def _decode(wrap, ids, mask, hooks, tokens=None):
    """Prefill with ``hooks`` then greedy (or forced ``tokens``) decode steps without an attention mask."""
    out = wrap(input_ids=ids, attention_mask=mask, use_cache=True, hooks=hooks)
    prefill, cache = out, out.cache
    steps, chosen = [], []
    logits = out.logits[:, -1]
    for s in range(DECODE_STEPS):
        nxt = logits.argmax(-1) if tokens is None else tokens[:, s]
        chosen.append(nxt)
        logits = wrap(input_ids=nxt[:, None], cache=cache, hooks=hooks).logits[:, -1]
        steps.append(logits)
    return prefill, torch.stack(steps, 1), torch.stack(chosen, 1)


def _reference_row(wrap, ids_row, keep_row, tokens_row, drop_after=DROP_AFTER):
    """One row by hand: (logits of the kept prompt tokens, logits after each forced decode token)."""
    base = wrap.lm.base_model
    kv = DynamicCache(config=wrap.lm.config)

    def run(hidden, pos, drop):
        for i, layer in enumerate(wrap.layers):
            emb = base.rotary_emb(hidden, pos)
            out = layer(
                hidden,
                attention_mask=None,
                position_ids=pos,
                cache=kv,
                use_cache=True,
                position_embeddings=emb,
            )
            hidden = out[0] if isinstance(out, tuple) else out
            if drop is not None and i == drop_after:
                hidden, pos = hidden[:, drop], pos[:, drop]
        return wrap.head(hidden)[1]

    n = ids_row.shape[0]
    prompt = run(wrap.embed(ids_row[None]), torch.arange(n)[None], keep_row)
    steps = [
        run(wrap.embed(tok.view(1, 1)), torch.tensor([[n + s]]), None)[0, -1]
        for s, tok in enumerate(tokens_row)
    ]
    return prompt[0], torch.stack(steps)


def _drop_hook(wrap, keep):
    def hook(i, state):
        if i == DROP_AFTER and state.hidden.shape[1] == keep.shape[1]:  # prefill only
            return wrap.drop_tokens(state, keep)
        return None

    return hook


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dropping_nothing_is_bit_identical_to_the_plain_path(name: str) -> None:
    wrap = _wrapper(name)
    ids, mask = _batch()
    with torch.no_grad():
        plain_prefill, plain_steps, plain_tokens = _decode(wrap, ids, mask, ())
        hooked_prefill, hooked_steps, hooked_tokens = _decode(
            wrap, ids, mask, [_drop_hook(wrap, mask.bool())]
        )
    real = mask.bool()
    assert torch.equal(hooked_prefill.logits[real], plain_prefill.logits[real])
    assert torch.equal(hooked_tokens, plain_tokens)
    assert torch.equal(hooked_steps, plain_steps)


@pytest.mark.parametrize("same_count", [False, True], ids=["different_counts", "same_count"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dropping_tokens_matches_running_later_layers_on_the_short_sequence(
    name: str, same_count: bool
) -> None:
    wrap = _wrapper(name)
    ids, mask = _batch()
    keep = _keep(mask, same_count)
    with torch.no_grad():
        prefill, steps, tokens = _decode(wrap, ids, mask, [_drop_hook(wrap, keep)])
        kept = keep.sum(1)
        # left-padded to the longest kept row; per-layer real-token counts recorded for FLOPs
        assert prefill.logits.shape[1] == int(kept.max())
        lengths = [t.tolist() for t in prefill.state.layer_lengths]
        assert lengths == [mask.sum(1).tolist()] * (DROP_AFTER + 1) + [kept.tolist()] * (4 - DROP_AFTER - 1)
        cache = prefill.cache  # after the decode steps: every layer grew by one token per step
        short = int(kept.max()) + DECODE_STEPS
        assert [cache.get_seq_length(i) for i in range(4)] == [10 + DECODE_STEPS] * 2 + [short] * 2
        for b in range(3):
            real = mask[b].bool()
            ref_prompt, ref_steps = _reference_row(wrap, ids[b, real], keep[b, real], tokens[b])
            ours_prompt = prefill.logits[b, prefill.logits.shape[1] - int(kept[b]) :]
            torch.testing.assert_close(ours_prompt, ref_prompt, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(steps[b], ref_steps, atol=1e-5, rtol=1e-5)


def test_explicit_mask_is_refused_once_layers_cache_different_lengths() -> None:
    wrap = _wrapper("llama")
    ids, mask = _batch()
    keep = _keep(mask, same_count=True)
    with torch.no_grad():
        out = wrap(input_ids=ids, attention_mask=mask, use_cache=True, hooks=[_drop_hook(wrap, keep)])
        full = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        with pytest.raises(ValueError, match="different lengths per layer"):
            wrap(input_ids=ids[:, :1], attention_mask=full, cache=out.cache)


def test_drop_tokens_refuses_sliding_window_layers() -> None:
    torch.manual_seed(0)
    cfg = dict(
        CONFIGS["llama"], model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1
    )
    wrap = CausalLMWrapper(build_causal_lm(cfg).eval())
    ids, mask = _batch()
    with torch.no_grad(), pytest.raises(ValueError, match="full-attention layers only"):
        wrap(input_ids=ids, attention_mask=mask, hooks=[_drop_hook(wrap, mask.bool())])


def test_grouped_drops_run_sub_batches_and_match_rows_run_alone() -> None:
    """``drop_tokens(..., group_min_saving=0.2)`` at different layers per row: the loop splits the batch into length groups
    (twice: after layer 0 and again after layer 1) and merges their caches; prefill and decode equal the per-row
    reference to 1e-5 and the one-padded-tensor path's greedy tokens."""
    wrap = _wrapper("llama")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[3, :1] = 0  # one left-padded row
    drop_at = torch.tensor([0, 0, 1, 4])  # the layer after which each row drops positions 2..9 (4: never)
    dropped = torch.zeros(4, 12, dtype=torch.bool)
    dropped[:, 2:10] = True  # by RoPE position: tokens 2..9 of each row's real tokens
    seen: list[tuple[int, list[int]]] = []

    def hook_for(group: bool):
        def hook(i, state):
            rows = state.rows if state.rows is not None else torch.arange(4)
            if group:
                seen.append((i, rows.tolist()))
            if state.cache is not None and state.cache.next_position is not None:
                return None  # prefill only
            leave = drop_at[rows] == i
            if not bool(leave.any()):
                return None
            by_position = dropped[rows].gather(1, state.position_ids.expand(len(rows), -1))
            keep = state.padding_mask.bool() & ~(by_position & leave[:, None])
            return wrap.drop_tokens(state, keep, group_min_saving=0.2 if group else None)

        return hook

    with torch.no_grad():
        prefill, steps, tokens = _decode(wrap, ids, mask, [hook_for(True)])
        _, one_tensor_steps, one_tensor_tokens = _decode(wrap, ids, mask, [hook_for(False)])
        without_cache = wrap(input_ids=ids, attention_mask=mask, hooks=[hook_for(True)])  # groups without caches
    torch.testing.assert_close(without_cache.logits, prefill.logits, atol=1e-5, rtol=1e-5)
    calls = 1 + 2 + 2 * 2  # a prefill's hook calls: layer 0 whole, then two groups per layer
    for part in (seen[:calls], seen[-calls:]):  # with a cache (then decoding), and the forward without one
        groups: dict[int, list[list[int]]] = {}
        for i, rows in part:
            groups.setdefault(i, []).append(sorted(rows))
        # after layer 1 row 2 is as short as rows 0 and 1 (which dropped after layer 0): one group, not two
        assert groups == {0: [[0, 1, 2, 3]], 1: [[0, 1], [2, 3]], 2: [[0, 1, 2], [3]], 3: [[0, 1, 2], [3]]}
    assert torch.equal(tokens, one_tensor_tokens)
    torch.testing.assert_close(steps, one_tensor_steps, atol=1e-5, rtol=1e-5)
    real_len = mask.sum(1)
    kept = torch.where(drop_at < 4, real_len - 8, real_len)
    assert [t.tolist() for t in prefill.state.layer_lengths] == [
        real_len.tolist(),
        torch.where(drop_at <= 0, kept, real_len).tolist(),
        torch.where(drop_at <= 1, kept, real_len).tolist(),
        torch.where(drop_at <= 2, kept, real_len).tolist(),
    ]
    # the merged cache is padded per layer to that layer's longest row (row 2 holds 12 tokens up to layer 1, then
    # row 3 with its 11 is the longest)
    assert [prefill.cache.get_seq_length(i) for i in range(4)] == [12 + DECODE_STEPS] * 2 + [11 + DECODE_STEPS] * 2
    for b in range(4):
        real = mask[b].bool()
        keep_row = ~dropped[b, : int(real.sum())] if drop_at[b] < 4 else None
        ref_prompt, ref_steps = _reference_row(wrap, ids[b, real], keep_row, tokens[b], drop_after=int(drop_at[b]))
        ours_prompt = prefill.logits[b, prefill.logits.shape[1] - int(kept[b]) :]
        torch.testing.assert_close(ours_prompt, ref_prompt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(steps[b], ref_steps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("drop_after", [1, 3])
def test_grouped_drop_that_cannot_split_compacts_like_a_plain_drop(drop_after: int) -> None:
    """Where the loop may not split (``layer_kwargs`` present, or a drop after the last layer), a grouped drop is
    applied as one compacted batch: the same logits as the plain drop; a second hook of the same layer already sees
    the shortened rows."""
    wrap = _wrapper("phi")
    ids, mask = _batch()
    keep = _keep(mask, same_count=False)
    seen: dict[bool, list[tuple[int, ...]]] = {True: [], False: []}

    def drop(group: bool):
        def hook(i, state):
            if i == drop_after and state.hidden.shape[1] == keep.shape[1]:
                return wrap.drop_tokens(state, keep, group_min_saving=0.0 if group else None)
            return None

        return hook

    def look(group: bool):
        def hook(i, state):
            if i == drop_after:
                seen[group].append((tuple(state.hidden.shape), int(state.padding_mask.sum())))

        return hook

    with torch.no_grad():
        outs = {
            group: wrap(
                input_ids=ids, attention_mask=mask, use_cache=True, hooks=[drop(group), look(group)],
                layer_kwargs={"unused_flag": None} if drop_after == 1 else None,
            )
            for group in (True, False)
        }
    assert seen[True] == seen[False] == [((3, 7, 32), int(keep.sum()))]
    torch.testing.assert_close(outs[True].logits, outs[False].logits, atol=1e-6, rtol=1e-6)
    assert [outs[True].cache.get_seq_length(i) for i in range(4)] == [
        outs[False].cache.get_seq_length(i) for i in range(4)
    ]
