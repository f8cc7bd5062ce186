"""Methods through the generation engine: the no-op method, hooks in prefill and decode, attention switch, stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.components.attention import CAPTURE_ATTENTION, AttentionCapture, media_key_positions
from zoo.components.generation import GenerationStats
from zoo.methods import Method, MethodContext, MethodPlan, build_method, list_methods, register_method
from zoo.registry import create_model

CLIP_VISION = dict(
    model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, image_size=32, patch_size=8,
)  # fmt: skip
LM = dict(
    model_type="phi", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    partial_rotary_factor=0.5, max_position_embeddings=256,
)  # fmt: skip


@register_method("test_keep_every_other_media")
class KeepEveryOtherMedia(Method):
    """Drops every second media token after layer ``after`` (prefill only); counts the calls its hook saw."""

    def __init__(self, after: int = 1, keep_all: bool = False) -> None:
        self.after, self.keep_all = after, keep_all
        self._calls = {"prefill": 0, "decode": 0}

    def plan(self, ctx: MethodContext) -> MethodPlan:
        model = ctx.model
        keep = ctx.attention_mask.bool().clone()
        if not self.keep_all:
            media_rank = ctx.media_mask.long().cumsum(1)
            keep &= ~(ctx.media_mask & (media_rank % 2 == 0))

        def hook(i, state):
            if i != self.after:
                return None
            if state.hidden.shape[1] == keep.shape[1]:
                self._calls["prefill"] += 1
                return model.llm.drop_tokens(state, keep)
            self._calls["decode"] += 1
            return None

        return MethodPlan(hooks=[hook])

    def finish(self, state) -> dict[str, float]:
        return {"prefill_calls": self._calls["prefill"], "decode_calls": self._calls["decode"]}


def _model():
    torch.manual_seed(0)
    return create_model("moe_llava_tiny", vision=dict(kind="hf", config=CLIP_VISION), lm=LM).eval()


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)] + [None]


PROMPTS = ["what color is the circle ?", "how many squares are there ?", "describe a red star ."]


def test_method_none_gives_identical_outputs_and_names_itself() -> None:
    model = _model()
    plain = model.generate(_images(), PROMPTS, max_new_tokens=8)
    plain_stats = model.last_generation_stats
    with_none = model.generate(_images(), PROMPTS, max_new_tokens=8, method="none")
    stats = model.last_generation_stats
    assert with_none == plain
    assert isinstance(stats, GenerationStats) and stats.method == "none" == plain_stats.method
    assert stats.batch_size == 3 and stats.extra == {}
    # every layer held every real prompt token: media (16 per image) + text, padding excluded
    assert stats.prefill_layer_tokens == (stats.prompt_tokens,) * 4
    assert stats.prompt_tokens > 2 * model.num_image_tokens


def test_a_method_that_keeps_everything_runs_the_hook_path_bit_identically() -> None:
    model = _model()
    imgs = _images()
    batch = model.build_generation_inputs(imgs, PROMPTS)
    ids, mask, px = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    plain = model.generate_ids(ids, mask, max_new_tokens=8, pixel_values=px)
    method = build_method("test_keep_every_other_media:keep_all=true")
    hooked = model.generate_ids(ids, mask, max_new_tokens=8, pixel_values=px, method=method)
    assert torch.equal(hooked, plain)
    stats = model.last_generation_stats
    assert stats.method == "test_keep_every_other_media:after=1,keep_all=True"
    assert stats.extra == {
        "test_keep_every_other_media/prefill_calls": 1.0,
        "test_keep_every_other_media/decode_calls": float(stats.decode_steps),
    }


def test_a_dropping_method_is_credited_per_layer_and_keeps_decoding() -> None:
    model = _model()
    texts = model.generate(_images(), PROMPTS, max_new_tokens=6, method="test_keep_every_other_media:after=1")
    stats = model.last_generation_stats
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    dropped = model.num_image_tokens  # half of the 16 media tokens of each of the two images
    assert stats.prefill_layer_tokens == (stats.prompt_tokens,) * 2 + (stats.prompt_tokens - dropped,) * 2
    assert stats.extra["test_keep_every_other_media/decode_calls"] == stats.decode_steps


def test_method_attention_implementation_is_switched_for_the_call_only() -> None:
    model = _model()
    imgs = _images()[:2]
    prompts = PROMPTS[:2]
    plain = model.generate(imgs, prompts, max_new_tokens=4)
    batch = model.build_generation_inputs(imgs, prompts)
    capture = AttentionCapture(layers=[2], keys=media_key_positions(model.media_mask(batch["input_ids"])))
    seen = []

    def spy(i, state):
        seen.append(model.llm.config._attn_implementation)

    out = model.generate(
        imgs, prompts, max_new_tokens=4, hooks=[spy], attn_implementation=CAPTURE_ATTENTION,
        layer_kwargs={"attention_capture": capture},
    )  # fmt: skip
    assert out == plain  # capturing changes no output
    assert set(seen) == {CAPTURE_ATTENTION} and model.llm.config._attn_implementation == "sdpa"
    steps = model.last_generation_stats.decode_steps
    assert len(capture.maps[2]) == 1 + steps
    prefill = capture.maps[2][0]
    assert prefill.shape == (2, 4, 1, model.num_image_tokens)
    assert bool((prefill > 0).all()) and bool((prefill.sum(-1) <= 1 + 1e-6).all())


def test_method_specs_are_checked() -> None:
    assert "none" in list_methods() and "test_keep_every_other_media" in list_methods()
    assert build_method(None).spec() == "none"
    assert build_method("test_keep_every_other_media:after=2").after == 2
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_method("nope")
    with pytest.raises(ValueError, match=r"has no option\(s\) \['k'\]"):
        build_method("test_keep_every_other_media:k=1")
    with pytest.raises(ValueError, match="is not key=value"):
        build_method("test_keep_every_other_media:after")
