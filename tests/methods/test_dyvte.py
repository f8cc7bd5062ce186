"""DyVTE: batched exit equals running each row by hand (layers after its exit layer on the text tokens only).

The reference runs each row alone (batch of one, no padding) through the decoder-layer modules with its own
transformers ``DynamicCache``: it computes the router input from the row's full-sequence hidden states (the mean of the
text between the image and the last prompt token, and the last prompt token), finds the first layer whose router says
exit, drops the image positions after it, and decodes forced tokens. It shares no span, mask or padding code with the
method.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from zoo.methods import MethodContext, build_method, list_methods
from zoo.methods.accounting import prefill_accounting
from zoo.methods.dyvte import (
    ROUTER_CONFIG,
    ROUTER_FILE,
    DyVTE,
    ExitRouterConfig,
    ExitRouters,
    import_visual_gates,
    load_routers,
    save_routers,
)
from zoo.registry import create_model

CLIP_VISION = dict(
    model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, image_size=32, patch_size=8,
)  # fmt: skip
LM = dict(
    model_type="phi", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    partial_rotary_factor=0.5, max_position_embeddings=256,
)  # fmt: skip
PROMPTS = ["what color is the circle ?", "how many squares are there in the picture ?", "is there a red star ?"]
DECODE_STEPS = 5


def _model():
    torch.manual_seed(0)
    return create_model("moe_llava_tiny", vision=dict(kind="hf", config=CLIP_VISION), lm=LM).eval()


def _routers(seed: int = 1) -> ExitRouters:
    torch.manual_seed(seed)
    return ExitRouters(ExitRouterConfig(hidden_size=32, num_layers=4, router_hidden=16)).eval()


def _inputs(model):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in PROMPTS]
    return model.build_generation_inputs(images, PROMPTS)


def _run_row(model, embeds, ids, routers, exit_after, tokens):
    """One row by hand: per-layer p(exit) before the exit, prompt logits of the kept tokens, decode-step logits."""
    llm = model.llm
    base = llm.lm.base_model
    kv = DynamicCache(config=llm.lm.config)
    media = model.media_mask(ids[None])[0]
    n = ids.shape[0]
    image_cols = media.nonzero().flatten()
    text = torch.arange(int(image_cols.max()) + 1, n - 1)
    keep = ~media
    p_exit = []

    def run(hidden, pos, prompt):
        for i, layer in enumerate(llm.layers):
            out = layer(hidden, attention_mask=None, position_ids=pos, cache=kv, use_cache=True,
                        position_embeddings=base.rotary_emb(hidden, pos))  # fmt: skip
            hidden = out[0] if isinstance(out, tuple) else out
            if prompt and exit_after is None or (prompt and i <= exit_after):
                feats = torch.cat([hidden[0, text].mean(0), hidden[0, -1]])[None]
                p_exit.append(float(routers(i, feats).softmax(-1)[0, 1]))
            if prompt and i == exit_after:
                hidden, pos = hidden[:, keep], pos[:, keep]
        return llm.head(hidden)[1]

    prompt_logits = run(embeds[None], torch.arange(n)[None], True)[0]
    steps = [
        run(llm.embed(tok.view(1, 1)), torch.tensor([[n + s]]), False)[0, -1] for s, tok in enumerate(tokens)
    ]
    return p_exit, prompt_logits, torch.stack(steps) if steps else None


def _first_exit(p_row, threshold, layers=4):
    return next((i for i, p in enumerate(p_row[: layers - 1]) if p > threshold), layers)


def test_dyvte_is_registered_and_needs_routers() -> None:
    assert {"dyvte", "fastv"} <= set(list_methods())
    with pytest.raises(ValueError, match="routers=NAME_OR_PATH"):
        build_method("dyvte")
    with pytest.raises(FileNotFoundError, match="neither a registered name"):
        build_method("dyvte:routers=/no/such/dir").plan(
            MethodContext(_model(), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), torch.zeros(1, 2).bool())
        )


def test_batched_exit_matches_rows_run_alone_to_1e5() -> None:
    model, routers = _model(), _routers()
    batch = _inputs(model)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    with torch.no_grad():
        embeds = model.embed_multimodal(ids, pixels)
        rows = [(embeds[b, mask[b].bool()], ids[b, mask[b].bool()]) for b in range(len(PROMPTS))]
        p_all = [_run_row(model, e, i, routers, None, [])[0] for e, i in rows]
        # a threshold at which the rows exit at different layers (one of them possibly never)
        candidates = sorted({p for row in p_all for p in row[:3]})
        mids = [(a + b) / 2 for a, b in zip(candidates, candidates[1:])]
        threshold = max(mids, key=lambda t: len({_first_exit(row, t) for row in p_all}))
        expected = [_first_exit(row, threshold) for row in p_all]
        assert len(set(expected)) >= 2, expected

        # min_group_saving=0: split whenever it saves slots (3 short rows save less than the default 20%)
        method = DyVTE(routers=routers, threshold=threshold, min_group_saving=0.0)
        plan = method.plan(MethodContext(model, ids, mask, model.media_mask(ids)))
        groups: dict[int, list[list[int]]] = {}  # prefill layer -> the rows of each sub-batch that ran it

        def record(i, state):
            if state.cache.next_position is None:
                groups.setdefault(i, []).append(sorted(state.rows.tolist()) if state.rows is not None else [0, 1, 2])

        out = model.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, hooks=[*plan.hooks, record])
        assert method.exit_layers() == expected
        # after the first exit the rows run as length-grouped sub-batches (each row in exactly one), the exited
        # rows apart from those that still hold their image
        first = min(expected)
        for i in range(first + 1, 4):
            assert len(groups[i]) >= 2 and sorted(r for g in groups[i] for r in g) == [0, 1, 2], groups
            for g in groups[i]:
                assert len({expected[r] < i for r in g}) == 1, (i, groups[i], expected)
        logits = out.logits[:, -1]
        steps, chosen = [], []
        for _ in range(DECODE_STEPS):
            nxt = logits.argmax(-1)
            chosen.append(nxt)
            logits = model.llm(input_ids=nxt[:, None], cache=out.cache, hooks=plan.hooks).logits[:, -1]
            steps.append(logits)
        steps, chosen = torch.stack(steps, 1), torch.stack(chosen, 1)
        layers_with_image = out.state.layer_lengths
        for b, (e, i) in enumerate(rows):
            k = expected[b]
            _, ref_prompt, ref_steps = _run_row(model, e, i, routers, k if k < 4 else None, chosen[b])
            n_kept = ref_prompt.shape[0]
            torch.testing.assert_close(out.logits[b, out.logits.shape[1] - n_kept :], ref_prompt, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(steps[b], ref_steps, atol=1e-5, rtol=1e-5)
            n_image = int(model.media_mask(i[None]).sum())
            assert [int(t[b]) for t in layers_with_image] == [len(i) if j <= k else len(i) - n_image for j in range(4)]
        stats = method.finish(out.state)
        assert stats["mean_layers_with_visual"] == pytest.approx(np.mean([min(k + 1, 4) for k in expected]))
        assert stats["exit_rate"] == pytest.approx(np.mean([k < 4 for k in expected]))


def test_threshold_above_one_is_the_plain_model() -> None:
    model, routers = _model(), _routers()
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in PROMPTS]
    plain = model.generate(images, PROMPTS, max_new_tokens=8)
    plain_tokens = model.last_generation_stats.prefill_layer_tokens
    never = DyVTE(routers=routers, threshold=1.01)
    assert model.generate(images, PROMPTS, max_new_tokens=8, method=never) == plain
    stats = model.last_generation_stats
    assert stats.prefill_layer_tokens == plain_tokens
    assert stats.extra["dyvte/exit_rate"] == 0.0 and stats.extra["dyvte/mean_layers_with_visual"] == 4.0
    # every row exits after layer 0 at threshold 0: the later layers hold the text tokens only
    always = DyVTE(routers=routers, threshold=0.0)
    model.generate(images, PROMPTS, max_new_tokens=8, method=always)
    short = model.last_generation_stats
    images_total = len(PROMPTS) * model.num_image_tokens
    assert short.prefill_layer_tokens == (plain_tokens[0],) + (plain_tokens[0] - images_total,) * 3
    assert short.extra["dyvte/prefill_gflops_per_row"] < stats.extra["dyvte/prefill_gflops_per_row"]
    assert short.extra["dyvte/kv_cache_kb_per_row"] < stats.extra["dyvte/kv_cache_kb_per_row"]


def test_rows_without_an_image_never_exit() -> None:
    model, routers = _model(), _routers()
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    method = DyVTE(routers=routers, threshold=0.0)
    model.generate([image, None], PROMPTS[:2], max_new_tokens=2, method=method)
    assert method.exit_layers() == [0, 4]


def test_prefill_accounting_counts_each_layer_from_its_tokens() -> None:
    model = _model()
    lengths = [torch.tensor([10, 6])] * 2 + [torch.tensor([4, 6])] * 2
    acc = prefill_accounting(model.llm, lengths)
    d, ffn, heads = 32, 64, 4
    proj = 4 * d * d  # q, k, v, dense (phi's attention projections)
    per_token = proj + 2 * d * ffn
    flops = sum(2 * per_token * int(t.sum()) + 4 * heads * (d // heads) * int((t * t).sum()) for t in lengths)
    assert acc["prefill_gflops_per_row"] == pytest.approx(flops / 2 / 1e9)
    assert acc["kv_cache_kb_per_row"] == pytest.approx(((10 + 6) * 2 + (4 + 6) * 2) * 2 * d * 4 / 2 / 1024)


def test_routers_save_load_roundtrip_and_official_keys(tmp_path) -> None:
    routers = _routers(seed=3)
    save_routers(routers, tmp_path, base="some_model")
    assert json.loads((tmp_path / ROUTER_CONFIG).read_text())["base"] == "some_model"
    for source in (tmp_path, tmp_path / ROUTER_FILE):
        loaded = load_routers(source)
        for a, b in zip(routers.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(a, b)
    # the official layout: model.visual_gates.<layer>.<index>.weight, Linear first and last in a Sequential
    official = {}
    for i, gate in enumerate(routers.gates):
        official[f"model.visual_gates.{i}.0.weight"] = gate[0].weight.detach().clone()
        official[f"model.visual_gates.{i}.3.weight"] = gate[2].weight.detach().clone()
    official["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    imported = import_visual_gates(official)
    assert imported.cfg == routers.cfg
    x = torch.randn(5, 64)
    for i in range(4):
        torch.testing.assert_close(imported(i, x), routers(i, x))
    with pytest.raises(ValueError, match="no 'visual_gates' keys"):
        import_visual_gates({"model.embed_tokens.weight": torch.zeros(2, 2)})


def test_fastv_keeps_the_most_attended_visual_tokens() -> None:
    from zoo.components.attention import (
        CAPTURE_ATTENTION,
        AttentionCapture,
        media_key_positions,
        use_attention,
    )

    model = _model()
    batch = _inputs(model)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    media = model.media_mask(ids)
    keys = media_key_positions(media)
    with torch.no_grad():
        embeds = model.embed_multimodal(ids, pixels)
        # the reference: capture layer 1's last-query attention on the plain model, then drop by hand after layer 1
        capture = AttentionCapture(layers=[1], keys=keys, queries="last")
        with use_attention(model, CAPTURE_ATTENTION):
            model.llm(inputs_embeds=embeds, attention_mask=mask, layer_kwargs={"attention_capture": capture})
        top = capture.maps[1][0].mean(1)[:, 0].topk(4, dim=-1).indices
        keep = mask.bool() & ~media
        for b in range(ids.shape[0]):
            keep[b, keys[b, top[b]]] = True

        def drop(i, state):
            return model.llm.drop_tokens(state, keep) if i == 1 else None

        expected = model.llm(inputs_embeds=embeds, attention_mask=mask, hooks=[drop]).logits[:, -1]
        method = build_method("fastv:layer=1,keep=0.25")
        tokens = model.generate_ids(ids, mask, max_new_tokens=1, method=method, pixel_values=pixels)
    stats = model.last_generation_stats
    assert torch.equal(tokens[:, 0], expected.argmax(-1))
    n_prompt, n_image = stats.prompt_tokens, ids.shape[0] * model.num_image_tokens
    assert stats.prefill_layer_tokens == (n_prompt,) * 2 + (n_prompt - n_image + ids.shape[0] * 4,) * 2
    assert stats.extra["fastv/prefill_gflops_per_row"] > 0
    with pytest.raises(ValueError, match="keep must be in"):
        build_method("fastv:keep=1.5")


def test_shipped_routers_are_registered_for_the_shipped_model() -> None:
    import zoo
    from zoo.registry import resolve_weights

    routers = load_routers("moe_llava_tiny.shapes")
    model = zoo.load("moe_llava_tiny.shapes")
    assert routers.cfg == ExitRouterConfig(hidden_size=model.llm.hidden_size, num_layers=4, router_hidden=256)
    info = json.loads((resolve_weights("moe_llava_tiny.shapes") / ROUTER_CONFIG).read_text())
    assert info["base"] == "moe_llava_tiny.shapes" and 0.0 < info["labels/layer0_exit_share"] < 1.0
    with pytest.raises(ValueError, match="this model's LM has 4 layers of width 32"):
        DyVTE(routers="moe_llava_tiny.shapes").plan(
            MethodContext(_model(), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), torch.zeros(1, 2).bool())
        )
