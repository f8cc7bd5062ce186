"""MoE-LLaVA model: multimodal forward, MoE upcycling, batched cached generation, save/load, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.models.moe_llava import MoELLaVA, MoESettings
from zoo.moe import MoE
from zoo.registry import create_model, load, save_pretrained

CLIP_VISION = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
LM = dict(
    model_type="phi",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    partial_rotary_factor=0.5,
    max_position_embeddings=256,
)


def tiny(**kw) -> MoELLaVA:
    torch.manual_seed(0)
    args = dict(vision=dict(kind="hf", config=CLIP_VISION), lm=LM)
    args.update(kw)
    return create_model("moe_llava_tiny", **args).eval()


def _image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _batch(model: MoELLaVA):
    tok = model.tokenizer
    n = model.num_image_tokens
    img = model.image_token_id
    a = [img] * n + tok("what color is the circle ?", add_special_tokens=False).input_ids
    b = (
        tok("is there a red square ?", add_special_tokens=False).input_ids
        + [img] * n
        + tok("yes", add_special_tokens=False).input_ids
    )
    L = max(len(a), len(b))
    ids = torch.full((2, L), tok.pad_token_id)
    mask = torch.zeros(2, L, dtype=torch.long)
    ids[0, : len(a)], mask[0, : len(a)] = torch.tensor(a), 1
    ids[1, : len(b)], mask[1, : len(b)] = torch.tensor(b), 1
    labels = ids.masked_fill(ids == img, -100).masked_fill(mask == 0, -100)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ids, mask, px, labels


def test_forward_splices_projected_patch_features_in_order() -> None:
    model = tiny()
    ids, mask, px, labels = _batch(model)
    loss, logits, aux = model(ids, mask, px, labels)
    assert logits.shape == (2, ids.shape[1], model.llm.config.vocab_size) and torch.isfinite(loss)
    # the same thing by hand: embeddings with image rows replaced by projector(tower(px)) in order of appearance
    with torch.no_grad():
        emb = model.llm.embed(ids.masked_fill(ids == model.image_token_id, 0))
        feats = model.mm_projector(
            model.vision_tower.model(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        )
        pos = (ids == model.image_token_id).nonzero()
        emb[pos[:, 0], pos[:, 1]] = feats.reshape(-1, 32)
        ref = model.llm.lm(inputs_embeds=emb, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    assert aux["moe_aux_loss"] == 0  # dense model

    # a hook between layers sees the image span and can change the residual stream
    seen = []

    def hook(i, state):
        seen.append(i)
        if i == 1:
            state.hidden = state.hidden.masked_fill(model.image_mask(ids)[..., None], 0.0)
        return state

    with torch.no_grad():
        _, hooked, _ = model(ids, mask, px, hooks=[hook])
    assert seen == [0, 1, 2, 3] and not torch.allclose(hooked, logits)


def test_upcycled_model_equals_dense_at_eval_and_trains_with_aux_loss() -> None:
    model = tiny()
    ids, mask, px, labels = _batch(model)
    with torch.no_grad():
        _, dense_logits, _ = model(ids, mask, px)
    assert model.enable_moe() == [0, 2]
    assert model.model_args["moe"]["num_experts"] == 4
    assert sum(isinstance(m, MoE) for m in model.modules()) == 2
    with torch.no_grad():
        _, moe_logits, _ = model(ids, mask, px)  # identical experts, eval capacity 2.0 drops nothing
    torch.testing.assert_close(moe_logits, dense_logits, atol=1e-5, rtol=1e-5)

    model.train()
    loss, _, aux = model(ids, mask, px, labels)
    # at most E=4 per layer, at least ~1 at perfect balance; two layers, coefficient 0.01
    assert 0.01 * 2 * 0.9 < float(aux["moe_aux_loss"]) < 0.01 * 2 * 4
    torch.testing.assert_close(loss, aux["lm_loss"] + aux["moe_aux_loss"])
    loss.backward()
    router = model.llm.lm.model.layers[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    model.gradient_checkpointing_enable()  # same loss and gradients with per-layer recomputation
    loss2, _, _ = model(ids, mask, px, labels)
    loss2.backward()
    assert float(loss2) == float(loss)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n])

    counts = model.num_parameters()
    experts = sum(p.numel() for p in model.llm.lm.model.layers[0].mlp.experts.parameters())
    assert counts["total"] - counts["active"] == 2 * experts // 2  # 2 of 4 experts idle in each of 2 layers


def test_generate_batched_left_padded_matches_single_and_uncached() -> None:
    model = tiny(moe=MoESettings().to_dict())
    imgs = [_image(0), _image(1, (30, 30)), None]
    prompts = ["what color is the circle ?", "<image>\nhow many squares are there ?", "describe a red star ."]
    batched = model.generate(imgs, prompts, max_new_tokens=6)
    single = [model.generate([im], [p], max_new_tokens=6)[0] for im, p in zip(imgs, prompts)]
    assert batched == single
    stats = model.last_generation_stats
    assert stats.batch_size == 1 and stats.prefill_seconds > 0 and stats.method == "none"
    assert 0 < stats.generated_tokens <= 6 and stats.decode_steps == stats.generated_tokens - 1

    # greedy without a cache, recomputing the whole sequence each step, gives the same tokens
    batch = model.build_generation_inputs(imgs[:1], prompts[:1])
    ids, mask, px = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    out = []
    with torch.no_grad():
        for _ in range(6):
            _, logits, _ = model(ids, mask, px)
            nxt = logits[:, -1].argmax(-1)
            out.append(int(nxt))
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
    stop = model.stop_ids()
    keep = []
    for t in out:
        if t in stop:
            break
        keep.append(t)
    assert model.tokenizer.decode(keep, skip_special_tokens=True).strip() == batched[0]


def test_stop_ids_follow_the_template() -> None:
    tok = tiny().tokenizer
    assert tiny().stop_ids() == {tok.eos_token_id}  # phi: <|endoftext|> is both eos and sep2
    assert tiny(template="plain").stop_ids() == {tok.eos_token_id, tok.convert_tokens_to_ids("\n")}
    assert tiny(template="vicuna_v1").stop_ids() == {tok.eos_token_id, tok.convert_tokens_to_ids("</s>")}


def test_sampling_is_seeded_and_tiny_top_p_is_greedy() -> None:
    model = tiny()
    imgs, prompts = [_image(0), _image(2)], ["what shape ?", "what color ?"]
    greedy = model.generate(imgs, prompts, max_new_tokens=5)
    nucleus = model.generate(imgs, prompts, max_new_tokens=5, do_sample=True, top_p=1e-6)
    assert nucleus == greedy
    a = model.generate(
        imgs, prompts, 5, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(3)
    )
    b = model.generate(
        imgs, prompts, 5, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(3)
    )
    assert a == b


def test_save_load_round_trip(tmp_path) -> None:
    model = tiny()
    model.enable_moe(dict(layers=[1]))
    save_pretrained(model, tmp_path / "m", model.architecture, model.model_args)
    loaded = load(tmp_path / "m")
    assert isinstance(loaded, MoELLaVA) and loaded.moe_layers == [1]
    ids, mask, px, _ = _batch(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, px)[1], model(ids, mask, px)[1])
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert loaded.generate([_image(0)], ["what ?"], 4) == model.generate([_image(0)], ["what ?"], 4)


def test_bad_input_errors() -> None:
    model = tiny()
    ids, mask, px, _ = _batch(model)
    with pytest.raises(ValueError, match=r"image tokens .* but pixel_values has 1 image"):
        model(ids, mask, px[:1])
    with pytest.raises(ValueError, match="but pixel_values has 0 image"):
        model(ids, mask, None)
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        model.generate([_image(0)], ["<image> <image> what ?"])
    with pytest.raises(ValueError, match="1 <image> placeholder.* but 0 image"):
        model.generate([None], ["<image> what ?"])
    with pytest.raises(ValueError, match="2 image entries for 1 prompts"):
        model.generate([_image(0), _image(1)], ["what ?"])
    with pytest.raises(TypeError, match="expected a PIL.Image"):
        model.generate([torch.zeros(3, 32, 32)], ["what ?"])
    with pytest.raises(ValueError, match="already has MoE"):
        model.enable_moe()
        model.enable_moe()


def test_models_registered_and_converters_lightning_free() -> None:
    import ast
    from pathlib import Path

    assert {"moe_llava_tiny", "moe_llava_phi2_4e", "moe_llava_stablelm_4e", "moe_llava_qwen_4e"} <= set(
        zoo.registry.list_models("moe_llava*")
    )
    root = Path(zoo.__file__).parent
    files = [
        root / "models" / "moe_llava.py",
        *(root / "convert").glob("*.py"),
        *(root / "components").glob("*.py"),
    ]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for n in names:
                assert n.split(".")[0] not in ("lightning", "pytorch_lightning", "data", "eval"), (f, n)


def test_default_tiny_model_uses_the_tiny_clip_tower() -> None:
    model = create_model("moe_llava_tiny").eval()
    assert model.num_image_tokens == 64 and model.data_cfg["image_size"] == 64
    assert model.llm.config.vocab_size == len(model.tokenizer)
    out = model.generate([_image(0)], ["what color is the circle ?"], max_new_tokens=2)
    assert len(out) == 1


def test_image_pos_embed_adds_a_learned_vector_per_image_token(tmp_path) -> None:
    plain, model = tiny(), tiny(image_pos_embed=True)
    assert plain.image_pos_embed is None and model.image_pos_embed.shape == (model.num_image_tokens, 32)
    ids, mask, px, labels = _batch(model)
    with torch.no_grad():
        # zero-initialised: the same model as without it, so it can be switched on for a trained checkpoint
        torch.testing.assert_close(model(ids, mask, px)[1], plain(ids, mask, px)[1])
        model.image_pos_embed.copy_(torch.randn_like(model.image_pos_embed))
        feats = model.encode_images(px)
        torch.testing.assert_close(feats, plain.encode_images(px) + model.image_pos_embed)
    save_pretrained(model, tmp_path / "m", model.architecture, model.model_args)
    loaded = load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, px)[1], model(ids, mask, px)[1])
    loss, _, _ = model.train()(ids, mask, px, labels)
    loss.backward()
    assert model.image_pos_embed.grad is not None and model.image_pos_embed.grad.abs().sum() > 0


def test_image_pos_code_adds_a_fixed_grid_code_that_checkpoints_do_not_store(tmp_path) -> None:
    from zoo.components.position_code import grid_position_code

    plain, model = tiny(), tiny(image_pos_code=4.0)
    side = math.isqrt(plain.num_image_tokens)
    assert plain.image_pos_code is None
    torch.testing.assert_close(model.image_pos_code, grid_position_code((side, side), 32, 4.0))
    ids, mask, px, _ = _batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(px), plain.encode_images(px) + model.image_pos_code)
    # the official key layout is unchanged: the code is rebuilt from model_args, not read from the weights
    assert set(model.state_dict()) == set(plain.state_dict())
    assert not any("pos_code" in n for n, _ in model.named_parameters())
    save_pretrained(model, tmp_path / "m", model.architecture, model.model_args)
    loaded = load(tmp_path / "m")
    assert loaded.cfg.image_pos_code == 4.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, px)[1], model(ids, mask, px)[1])
        assert not torch.allclose(model(ids, mask, px)[1], plain(ids, mask, px)[1])


def test_image_newline_appends_a_learned_marker_after_each_row(tmp_path) -> None:
    plain, model = tiny(), tiny(image_newline=True)
    side = math.isqrt(plain.num_image_tokens)
    assert side * side == plain.num_image_tokens and plain.image_newline is None
    assert model.num_image_tokens == side * (side + 1) and model.image_newline.shape == (32,)
    ids, mask, px, labels = _batch(model)
    with torch.no_grad():
        feats = model.encode_images(px).reshape(px.shape[0], side, side + 1, 32)
        # each row is the plain model's row (same seed, same weights), then the marker
        torch.testing.assert_close(feats[:, :, :side].reshape(px.shape[0], -1, 32), plain.encode_images(px))
        torch.testing.assert_close(feats[:, :, side], model.image_newline.expand(px.shape[0], side, 32))
    save_pretrained(model, tmp_path / "m", model.architecture, model.model_args)
    loaded = load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, px)[1], model(ids, mask, px)[1])
    assert loaded.num_image_tokens == side * (side + 1)
    loss, _, _ = model.train()(ids, mask, px, labels)
    loss.backward()
    assert model.image_newline.grad is not None and model.image_newline.grad.abs().sum() > 0
    out = model.eval().generate([_image(0)], ["what color is the circle ?"], max_new_tokens=2)
    assert len(out) == 1


def test_tower_feature_cache_reuses_frozen_features_and_matches_the_plain_model() -> None:
    model = tiny()
    ids, mask, px, labels = _batch(model)
    with torch.no_grad():
        plain = model.encode_images(px)
    calls = []
    model.vision_tower.model.embeddings.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model.cache_tower_features()
    # while any tower parameter trains the cache is bypassed: gradients must reach the tower
    model.train()
    model(ids, mask, px, labels)[0].backward()
    assert calls == [2] and len(model.tower_cache) == 0
    assert model.vision_tower.model.embeddings.patch_embedding.weight.grad is not None
    model.vision_tower.requires_grad_(False)
    model.zero_grad()
    twice = torch.cat([px, px[:1]])  # the first image twice: encoded once
    feats = model.encode_images(twice)
    assert calls == [2, 2] and len(model.tower_cache) == 2 and model.tower_cache.hits == 1
    torch.testing.assert_close(feats, torch.cat([plain, plain[:1]]), rtol=1e-5, atol=1e-5)
    loss, _, _ = model(ids, mask, px, labels)  # all cached: no tower call, projector and LM still train
    loss.backward()
    assert calls == [2, 2] and model.tower_cache.hits == 3
    assert model.mm_projector[0].weight.grad is not None
    model.cache_tower_features(False)
    model.encode_images(px)
    assert calls == [2, 2, 2] and model.tower_cache is None


def test_frozen_feature_cache_evicts_least_recently_used() -> None:
    from zoo.components.feature_cache import FrozenFeatureCache

    cache, seen = FrozenFeatureCache(max_items=2), []

    def encode(x):
        seen.append(x[:, 0, 0].tolist())
        return x * 2

    a, b, c = (torch.full((1, 2, 2), v) for v in (1.0, 2.0, 3.0))
    torch.testing.assert_close(cache(encode, torch.cat([a, b])), torch.cat([a, b]) * 2)
    cache(encode, a)  # a is now the most recent
    cache(encode, c)  # evicts b
    out = cache(encode, torch.cat([b, a]))
    torch.testing.assert_close(out, torch.cat([b, a]) * 2)
    assert seen == [[1.0, 2.0], [3.0], [2.0]] and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 4)
    with pytest.raises(ValueError, match="max_items"):
        FrozenFeatureCache(max_items=0)


def test_image_pos_code_dims_puts_the_code_in_the_first_dimensions_only() -> None:
    from zoo.components.position_code import grid_position_code

    model = tiny(image_pos_code=4.0, image_pos_code_dims=8)
    side = math.isqrt(model.num_image_tokens)
    code = model.image_pos_code
    assert code.shape == (side * side, 32)
    torch.testing.assert_close(code[:, :8], grid_position_code((side, side), 8, 4.0))
    assert code[:, 8:].abs().max() == 0  # the rest of the width is left to the features
    assert torch.linalg.matrix_rank(code.double()) <= 8
    for bad in (2, 33):
        with pytest.raises(ValueError, match="image_pos_code_dims"):
            tiny(image_pos_code=4.0, image_pos_code_dims=bad)
