"""VAR: sink score, head selection and redistribution against direct computations; zoo_var equals eager attention
with VAR off (our wrapper and transformers' Llava, prefill and decode); batches with left padding; planted sinks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from zoo.components.attention import use_attention
from zoo.components.lm import CausalLMWrapper, build_causal_lm, positions_from_mask
from zoo.methods import build_method
from zoo.methods.sinks import PUBLISHED_SINK_DIMS, find_sink_dims, resolve_sink_dims, sink_score
from zoo.methods.var import (
    VAR,
    VAR_ATTENTION,
    VARSettings,
    VARState,
    redistribute,
    select_image_centric,
    var_on_transformers,
)
from zoo.registry import create_model

# -- the math on random maps, against a direct per-row computation ------------------------------------------------


def _random_maps(seed: int = 0, b: int = 2, h: int = 3, q: int = 5, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    # peaked rows so that some rows are image-centric and some are not
    probs = (torch.randn(b, h, q, s, generator=g) * 2.5).softmax(-1)
    visual = torch.zeros(b, s, dtype=torch.bool)
    visual[:, 3:9] = True
    sinks = torch.zeros(b, s, dtype=torch.bool)
    sinks[0, [0, 4, 7]] = True  # a text sink (BOS) and two visual sinks
    sinks[1, [0, 5]] = True
    return probs.double(), visual, sinks


def _direct(probs, visual, sinks, st: VARSettings):
    """Row by row with Python floats: the selection rule and the edit as written in the reference."""
    b, h, q, s = probs.shape
    out = probs.clone()
    chosen = torch.zeros(b, h, q, dtype=torch.bool)
    for bi in range(b):
        vis = [j for j in range(s) if visual[bi, j]]
        sk = [j for j in range(s) if sinks[bi, j]]
        non = [j for j in vis if j not in sk]
        for hi in range(h):
            for qi in range(q):
                row = [float(x) for x in probs[bi, hi, qi]]
                mass = sum(row[j] for j in vis)
                if st.rule == "official":
                    r = sum(row[j] for j in non) / sum(row[j] + 1e-6 for j in vis)
                    ok = 1 - r <= st.rho
                else:
                    ok = sum(row[j] for j in non) / mass >= st.rho
                if not (ok and mass >= st.summ):
                    continue
                chosen[bi, hi, qi] = True
                kept = st.kept
                omega = (1 - kept) * sum(row[j] for j in sk)
                denom = sum(row[j] for j in non)
                for j in range(s):
                    if j in sk:
                        out[bi, hi, qi, j] = kept * row[j]
                    elif j in non:
                        out[bi, hi, qi, j] = row[j] + omega * row[j] / denom
    return chosen, out


@pytest.mark.parametrize(
    "settings",
    [VARSettings(), VARSettings(rho=0.8), VARSettings(rule="paper", rho=0.8), VARSettings(p=0.6, p_moves=True)],
)
def test_selection_and_redistribution_equal_a_direct_computation(settings: VARSettings) -> None:
    probs, visual, sinks = _random_maps()
    chosen = select_image_centric(probs, visual, sinks, settings)
    edited, moved = redistribute(probs, visual, sinks, chosen, settings.kept)
    want_chosen, want = _direct(probs, visual, sinks, settings)
    assert torch.equal(chosen, want_chosen)
    assert 0 < int(chosen.sum()) < chosen.numel()  # the case is not degenerate
    torch.testing.assert_close(edited, want, atol=1e-12, rtol=0)
    # rows keep their sum (1 up to the float32 softmax the maps came from)
    torch.testing.assert_close(edited.sum(-1), probs.sum(-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(edited.sum(-1), torch.ones_like(edited.sum(-1)), atol=1e-6, rtol=0)
    text_non_sink = ~visual & ~sinks
    assert torch.equal(edited[..., text_non_sink[0]][0], probs[..., text_non_sink[0]][0])
    sink_mass = (probs * sinks[:, None, None].double()).sum(-1)
    torch.testing.assert_close(moved, torch.where(chosen, (1 - settings.kept) * sink_mass, 0.0))


def test_rules_differ_at_rho_08_and_p_reads_kept_by_default() -> None:
    probs, visual, sinks = _random_maps(seed=3, q=40)
    official = select_image_centric(probs, visual, sinks, VARSettings(rho=0.8))
    paper = select_image_centric(probs, visual, sinks, VARSettings(rho=0.8, rule="paper"))
    assert not torch.equal(official, paper)  # sink share <= 0.8 is not non-sink share >= 0.8
    assert VARSettings(p=0.6).kept == 0.6 and VARSettings(p=0.6, p_moves=True).kept == pytest.approx(0.4)


def test_nothing_changes_without_sinks() -> None:
    probs, visual, _ = _random_maps()
    none = torch.zeros_like(visual)
    chosen = select_image_centric(probs, visual, none, VARSettings())
    edited, moved = redistribute(probs, visual, none, chosen, 0.6)
    assert torch.equal(edited, probs) and float(moved.abs().sum()) == 0.0


def test_sink_score_equals_direct_rms_formula_and_dims_resolve() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    x[1, 2, 7] = 40.0
    got = sink_score(x, (7, 11))
    for b in range(2):
        for t in range(5):
            row = [float(v) for v in x[b, t]]
            rms = math.sqrt(sum(v * v for v in row) / 16 + 1e-6)
            assert float(got[b, t]) == pytest.approx(max(abs(row[7]) / rms, abs(row[11]) / rms), rel=1e-5)
    assert float(got[1, 2]) > 3.5 and float(got[1, 2]) <= math.sqrt(16)  # one dim alone reaches at most sqrt(D)
    assert resolve_sink_dims("llama2_7b") == (1415, 2533) == PUBLISHED_SINK_DIMS["llama2_7b"]
    assert resolve_sink_dims("3+17") == (3, 17) and resolve_sink_dims("auto") is None
    with pytest.raises(ValueError, match="published backbone"):
        resolve_sink_dims("llama9")
    with pytest.raises(ValueError, match="do not fit hidden size"):
        sink_score(x, (16,))


# -- zoo_var with VAR off equals eager attention -------------------------------------------------------------------

TINY_LLAMA = dict(
    model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def _ids_mask():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids, mask


@pytest.mark.parametrize("with_state", [False, True])
def test_zoo_var_off_equals_eager_through_the_wrapper_prefill_and_decode(with_state: bool) -> None:
    torch.manual_seed(0)
    wrap = CausalLMWrapper(build_causal_lm(dict(TINY_LLAMA)).eval())
    ids, mask = _ids_mask()
    prompt = 9
    visual = torch.zeros(3, prompt, dtype=torch.bool)
    visual[:, 5:8] = True
    # with a state whose tau no token reaches, VAR finds no sinks and must change nothing
    state = VARState.for_prompt(VARSettings(tau=1e9), (1, 2), 4, visual, mask[:, :prompt])
    kw = {"var_state": state} if with_state else {}
    with torch.no_grad(), use_attention(wrap, VAR_ATTENTION):
        outs = [wrap(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True, layer_kwargs=kw)]
        for t in range(prompt, 12):
            outs.append(wrap(input_ids=ids[:, t : t + 1], cache=outs[0].cache, layer_kwargs=kw))
    assert wrap.config._attn_implementation == "sdpa"
    wrap.lm.set_attn_implementation("eager")
    with torch.no_grad():
        ref = wrap.lm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, 12)).logits
    got = torch.cat([outs[0].logits, *[o.logits for o in outs[1:]]], 1)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-6, rtol=0)


def _tiny_llava() -> tuple[LlavaForConditionalGeneration, int]:
    torch.manual_seed(0)
    image_id = 119
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=8, projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        ),
        image_token_index=image_id, vision_feature_layer=-2, pad_token_id=0,
    )  # fmt: skip
    return LlavaForConditionalGeneration(cfg).eval(), image_id


def _llava_batch(image_id: int):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 100, (2, 8), generator=g)
    ids = torch.cat([text[:, :2], torch.full((2, 4), image_id), text[:, 2:]], 1)
    ids[1, 0] = 0
    mask = torch.ones_like(ids)
    mask[1, :1] = 0  # left padding
    return ids, mask, torch.randn(2, 3, 16, 16, generator=g)


def test_zoo_var_off_equals_eager_on_transformers_llava_prefill_and_decode() -> None:
    llava, image_id = _tiny_llava()
    ids, mask, px = _llava_batch(image_id)
    off = VAR(tau=1e9, dims="1+2")
    with torch.no_grad():
        llava.set_attn_implementation({"text_config": "eager"})
        ref = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)  # fmt: skip
        with var_on_transformers(llava, off, ids, mask) as state:
            assert llava.config.text_config._attn_implementation == VAR_ATTENTION
            got = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    assert llava.config.text_config._attn_implementation == "eager"
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert sorted(state.sinks) == [2, 3] and not any(bool(s.any()) for s in state.sinks.values())
    assert state.rows > 0 and state.chosen == 0  # it ran over the queries (prefill + decode) and chose none


def test_var_on_llava_is_per_sample_in_a_left_padded_batch_and_acts_in_decode() -> None:
    llava, image_id = _tiny_llava()
    ids, mask, px = _llava_batch(image_id)
    # a low tau so this random tiny LM has sinks (a 48-dim state cannot reach the published tau of 20)
    method = VAR(tau=1.5, dims="1+2", rho=0.9, summ=0.0)
    runs = []
    with torch.no_grad():
        with var_on_transformers(llava, method, ids, mask) as state:
            batch = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3,
                                   do_sample=False, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        assert state.chosen > 0 and state.moved > 0 and state.rows > state.prefill_rows  # decode steps edited too
        for row in range(2):
            keep = mask[row].bool()
            one_ids, one_mask = ids[row : row + 1, keep], mask[row : row + 1, keep]
            with var_on_transformers(llava, method, one_ids, one_mask):
                runs.append(llava.generate(input_ids=one_ids, attention_mask=one_mask, pixel_values=px[row : row + 1],
                                           max_new_tokens=3, do_sample=False, output_scores=True,
                                           return_dict_in_generate=True))  # fmt: skip
    for row, alone in enumerate(runs):
        assert torch.equal(batch.sequences[row, ids.shape[1] :], alone.sequences[0, alone.sequences.shape[1] - 3 :])
        for a, b in zip(batch.scores, alone.scores):
            torch.testing.assert_close(a[row], b[0], atol=1e-5, rtol=1e-5)
    # and VAR changed the model's output at all
    llava.set_attn_implementation({"text_config": "eager"})
    with torch.no_grad():
        plain = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        with var_on_transformers(llava, method, ids, mask):
            edited = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert float((plain[:, -1] - edited[:, -1]).abs().max()) > 1e-4


# -- a planted sink: the finder recovers the dimensions, VAR moves the predicted share ------------------------------

CLIP_VISION = dict(
    model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, image_size=32, patch_size=8,
)  # fmt: skip
LM64 = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
PLANTED_DIMS = (11, 50)
PLANTED_VISUAL = (2, 9)  # which image tokens (of 16) carry the planted activation


def _planter(visual_rows: torch.Tensor | None):
    """A wrapper hook after layer 0: a massive activation on PLANTED_DIMS at each row's first real token and, in
    prefill, at the chosen image tokens."""

    def plant(i, state):
        decoding = visual_rows is not None and state.hidden.shape[1] != visual_rows.shape[1]
        if i != 0 or decoding:  # prefill only: decode steps reuse the prefill's sinks
            return None
        first = state.padding_mask.long().argmax(1)
        rows = torch.arange(state.hidden.shape[0])
        hidden = state.hidden.clone()
        for d in PLANTED_DIMS:
            hidden[rows, first, d] += 300.0
            if visual_rows is not None:
                hidden[..., d] += 300.0 * visual_rows
        state.hidden = hidden
        return state

    return plant


def test_planted_sinks_are_found_and_var_moves_the_predicted_share() -> None:
    torch.manual_seed(0)
    model = create_model("moe_llava_tiny", vision=dict(kind="hf", config=CLIP_VISION), lm=LM64).eval()
    prompts = ["what color is the circle ?", "how many squares are there ?"]
    text = model.build_generation_inputs([None, None], prompts, True)
    report = find_sink_dims(model.llm, text["input_ids"], text["attention_mask"], hooks=[_planter(None)])
    assert sorted(report.dims) == sorted(PLANTED_DIMS) and report.ratio > 10
    assert report.values[0] > 5.0 and not report.massive(tau=20.0)  # two dims of 64 reach at most sqrt(32) = 5.66

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    batch = model.build_generation_inputs(images, prompts, True)
    media = model.media_mask(batch["input_ids"])
    planted = torch.zeros_like(media)
    for r in range(2):
        cols = media[r].nonzero()[:, 0]
        planted[r, cols[list(PLANTED_VISUAL)]] = True
    method = VAR(tau=4.0, dims="+".join(map(str, report.dims)), record=True, rho=0.9, summ=0.05)
    model.generate(images, prompts, max_new_tokens=3, method=method, hooks=[_planter(planted.float())])
    state, stats = method.last_state, model.last_generation_stats
    first = batch["attention_mask"].argmax(1)
    expected_sinks = planted.clone()
    expected_sinks[torch.arange(2), first] = True
    for layer in (2, 3):
        assert torch.equal(state.sinks[layer], expected_sinks), layer
    # predicted from the recorded pre-edit maps of layer 2 (the only edited layer of 4: layers 2 .. L-2)
    assert sorted(state.maps) == [0, 1, 2, 3]  # recorded everywhere, edited in layer 2 only
    assert not any(bool(state.maps[i]["chosen"].any()) for i in (0, 1, 3))
    before = state.maps[2]["before"].double()
    settings = VARSettings(tau=4.0, rho=0.9, summ=0.05)
    chosen, _ = _direct(before, state.visual, state.sinks[2], settings)
    queries = state.queries[:, None, :].expand_as(chosen)
    chosen &= queries
    assert torch.equal(state.maps[2]["chosen"], chosen) and int(chosen.sum()) > 0
    sink_mass = (before * state.sinks[2][:, None, None].double()).sum(-1)
    predicted = float(((1 - settings.kept) * sink_mass * chosen).sum() / (queries.sum()))
    assert stats.extra["var/prefill_attention_moved"] == pytest.approx(predicted, rel=1e-5)
    assert stats.extra["var/prefill_heads_selected"] == pytest.approx(float(chosen.sum() / queries.sum()))
    assert stats.extra["var/visual_sinks_per_layer"] == pytest.approx(len(PLANTED_VISUAL))
    assert stats.method.startswith("var:") and "tau=4.0" in stats.method


def test_finder_on_transformers_llava_recovers_planted_dims_and_feeds_var() -> None:
    llava, image_id = _tiny_llava()
    ids, mask, px = _llava_batch(image_id)
    text = ids[:, 6:]  # the text after the image block: a text-only probe batch

    def plant(module, args, output):  # public forward-hook API: a massive activation at each row's first token
        hidden = output.clone()
        hidden[:, 0, [5, 30]] += 200.0
        return hidden

    handle = llava.model.language_model.layers[0].register_forward_hook(plant)
    try:
        report = find_sink_dims(llava, text)
    finally:
        handle.remove()
    assert sorted(report.dims) == [5, 30] and report.layers == (2,) and report.ratio > 10
    with torch.no_grad(), var_on_transformers(llava, VAR(tau=2.0, summ=0.0, rho=0.9), ids, mask,
                                              dims=report.dims) as state:  # fmt: skip
        llava(input_ids=ids, attention_mask=mask, pixel_values=px)
    assert state.dims == report.dims and sorted(state.sinks) == [2, 3]
    with pytest.raises(ValueError, match="wrapper only"):
        find_sink_dims(llava, text, hooks=[plant])


def test_var_spec_options_and_errors() -> None:
    assert build_method("var:p=0.5,rho=0.8").spec() == build_method("var:rho=0.8,p=0.5").spec()
    with pytest.raises(ValueError, match="rule must be"):
        build_method("var:rule=other")
    with pytest.raises(ValueError, match="no option"):
        build_method("var:q=1")
    llava, image_id = _tiny_llava()
    ids, mask, _ = _llava_batch(image_id)
    with pytest.raises(ValueError, match="needs sink dims"), var_on_transformers(llava, VAR(), ids, mask):
        pass


def _planted_for(model, images, prompts) -> torch.Tensor:
    media = model.media_mask(model.build_generation_inputs(images, prompts, True)["input_ids"])
    planted = torch.zeros(media.shape)
    for r in range(media.shape[0]):
        planted[r, media[r].nonzero()[:, 0][list(PLANTED_VISUAL)]] = 1.0
    return planted


def test_var_through_our_wrapper_is_per_sample_in_a_left_padded_batch() -> None:
    torch.manual_seed(0)
    model = create_model("moe_llava_tiny", vision=dict(kind="hf", config=CLIP_VISION), lm=LM64).eval()
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["what color is the big circle on the left ?", "how many ?"]  # different lengths: left padding
    spec = "var:tau=4,dims=11+50,rho=0.9,summ=0.05,record=true"
    batch = build_method(spec)
    hook = _planter(_planted_for(model, images, prompts))
    together = model.generate(images, prompts, max_new_tokens=3, method=batch, hooks=[hook])
    st = batch.last_state
    assert bool((~st.padding).any()) and st.chosen > 0 and st.rows > st.prefill_rows  # padded; decode edited too
    for row in range(2):
        alone = build_method(spec)
        hook = _planter(_planted_for(model, images[row : row + 1], prompts[row : row + 1]))
        answer = model.generate([images[row]], [prompts[row]], max_new_tokens=3, method=alone, hooks=[hook])
        assert answer == [together[row]]
        one = alone.last_state
        real = st.padding[row]
        assert torch.equal(st.sinks[2][row, real], one.sinks[2][0]) and int(one.sinks[2].sum()) == 3
        torch.testing.assert_close(st.maps[2]["after"][row][:, real], one.maps[2]["after"][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(st.maps[2]["chosen"][row][:, real], one.maps[2]["chosen"][0])
        assert bool(one.maps[2]["chosen"].any())
