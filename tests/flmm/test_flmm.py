"""F-LMM on the shipped tiny MoE-LLaVA: the captured word-to-image maps equal transformers' eager attention weights,
only the heads learn, the LMM's weights and answers stay exactly the base model's, checkpoints round-trip, and masks
come back at each image's own size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from data.refseg import ShapesRefSeg
from data.shapes import WorldConfig
from zoo.models.flmm import FLMM, dice_loss, grounding_loss
from zoo.registry import SHIPPED_WEIGHTS_DIR, save_pretrained

BASE = "moe_llava_tiny.shapes"
ROOT = Path(__file__).resolve().parents[2]
SAM8 = {
    "vision_config": {"hidden_size": 16, "output_channels": 16, "num_hidden_layers": 1, "num_attention_heads": 1,
                      "image_size": 64, "patch_size": 8, "window_size": 0, "global_attn_indexes": [0], "mlp_dim": 32,
                      "num_pos_feats": 8},
    "prompt_encoder_config": {"hidden_size": 16, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
    "mask_decoder_config": {"hidden_size": 16, "mlp_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 1,
                            "iou_head_depth": 1, "iou_head_hidden_dim": 16},
}  # fmt: skip


def _args() -> dict:
    cfg = json.loads((SHIPPED_WEIGHTS_DIR / BASE / "config.json").read_text())
    return {"base_architecture": cfg["architecture"], "base_args": cfg["model_args"], "sam": SAM8,
            "instruction": "Describe the image.", "map_size": 16, "unet_channels": 4, "unet_depth": 2}  # fmt: skip


@pytest.fixture(scope="module")
def base():
    return zoo.load(BASE)


@pytest.fixture()
def flmm(base) -> FLMM:
    torch.manual_seed(0)
    model = zoo.create_model("flmm", **_args())
    model.lmm.load_state_dict(base.state_dict())
    return model


@pytest.fixture(scope="module")
def samples():
    ds = ShapesRefSeg(WorldConfig(image_size=64, seed=0), "train", 6)
    return [ds[i] for i in range(0, len(ds), max(1, len(ds) // 6))][:6]


def _batch(model, samples):
    return model.prepare([s.image for s in samples], [s.text for s in samples], [s.mask() for s in samples])


def test_captured_maps_equal_eager_attention_averaged_over_the_words(flmm, samples) -> None:
    batch = _batch(flmm, samples)
    words = batch["word_mask"]
    assert (words.sum(1) == torch.tensor([len(flmm.lmm.tokenizer(s.text).input_ids) for s in samples])).all()
    maps, hidden = flmm.lmm_features(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], words)
    lm = flmm.lmm.llm.lm
    with torch.no_grad():
        embeds = flmm.lmm.embed_multimodal(batch["input_ids"], batch["pixel_values"])
        mask = batch["attention_mask"]
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        lm.set_attn_implementation("eager")
        try:
            ref = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True,
                     output_hidden_states=True)  # fmt: skip
        finally:
            lm.set_attn_implementation("sdpa")
    media = flmm.lmm.media_mask(batch["input_ids"])
    grid = math.isqrt(int(media[0].sum()))
    for b in range(len(samples)):
        expected = torch.cat([a[b][:, words[b]][:, :, media[b]].mean(1) for a in ref.attentions])  # [L*H, K]
        torch.testing.assert_close(maps[b], expected.view(-1, grid, grid), atol=1e-5, rtol=0)
    # hidden states of every layer (the refiner's text tokens read them) are transformers' own
    real = mask.bool()  # left padding rows differ (no real token to attend to) and are never read
    for layer in range(flmm.num_layers - 1):  # the last one the LM returns after its final norm
        torch.testing.assert_close(hidden[layer][real], ref.hidden_states[layer + 1][real], atol=1e-5, rtol=1e-5)
    assert maps.shape == (len(samples), 32, 8, 8)


def test_only_the_heads_learn_and_the_lmm_stays_bit_for_bit(flmm, samples, base) -> None:
    trainable = [p for p in flmm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    flmm.train()
    assert not flmm.lmm.training  # frozen: eval mode whatever train() says
    batch = _batch(flmm, samples)
    first = None
    for _ in range(3):
        loss, logs = flmm.loss(batch)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        assert all(p.grad is None for p in flmm.lmm.parameters())
        heads = {"mask_head", "refiner", "layer_weights", "text_proj"}
        got = {n.split(".")[0] for n, p in flmm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == heads
        opt.step()
        opt.zero_grad()
    assert float(flmm.loss(batch)[0]) < first
    assert set(logs) == {"bce_coarse", "dice_coarse", "bce_refined", "dice_refined"}
    ref = base.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in flmm.lmm.state_dict().items())


def test_grounded_model_answers_exactly_as_the_base_model(flmm, base) -> None:
    import eval as zoo_eval

    flmm.eval()
    kw = dict(tasks=["shapes_vqa", "shapes_pope_adversarial"], limit=8, batch_size=8, progress=False)
    ours, theirs = zoo_eval.run(flmm, **kw), zoo_eval.run(base, **kw)
    for task in ("shapes_vqa", "shapes_pope_adversarial"):
        assert ours["results"][task] == theirs["results"][task]
    a = flmm.generate([Image.new("RGB", (64, 64), (40, 90, 235))], ["What color is the square?"])
    b = base.generate([Image.new("RGB", (64, 64), (40, 90, 235))], ["What color is the square?"])
    assert a == b


def test_checkpoint_round_trip_and_masks_at_the_image_size(flmm, tmp_path) -> None:
    out = save_pretrained(flmm, tmp_path / "flmm", "flmm", flmm.model_args)
    loaded = zoo.load(out)
    assert isinstance(loaded, FLMM)
    ours, theirs = flmm.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    wide = Image.new("RGB", (80, 48), (118, 118, 118))
    flmm.eval()
    probs = loaded.ground([wide, Image.new("RGB", (64, 64))], ["the red circle", "the blue square to the left of the red star"])
    assert probs[0].shape == (48, 80) and probs[1].shape == (64, 64)
    assert all(p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1 for p in probs)
    coarse = loaded.ground([wide], ["the red circle"], stage="coarse")[0]
    assert coarse.shape == (48, 80)


def test_text_tokens_are_padded_with_sams_not_a_point_embedding(flmm, samples) -> None:
    batch = _batch(flmm, samples)
    hidden = torch.randn(flmm.num_layers, *batch["input_ids"].shape, flmm.lmm.llm.hidden_size)
    tokens = flmm._text_tokens(hidden, batch["word_mask"])
    counts = batch["word_mask"].sum(1)
    n = int(counts.max())
    assert tokens.shape[:3] == (len(samples), 1, n)
    pad = flmm.refiner.prompt_encoder.not_a_point_embed.weight[0]
    short = int(counts.argmin())
    assert int(counts[short]) < n
    assert torch.equal(tokens[short, 0, 0], pad)
    mixed = torch.einsum("l,lbtd->btd", flmm.layer_weights.softmax(0), hidden)
    torch.testing.assert_close(tokens[short, 0, -1], flmm.text_proj(mixed[short, -1]))


def test_losses_by_hand() -> None:
    logits = torch.tensor([[[[0.0, 2.0], [-2.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    p = logits.sigmoid().flatten()
    g = target.flatten()
    assert float(dice_loss(logits, target)) == pytest.approx(1 - (2 * float((p * g).sum()) + 1) / (float(p.sum()) + 2 + 1))
    bce, dice = grounding_loss(logits, target)
    assert float(bce) == pytest.approx(float(torch.nn.functional.binary_cross_entropy(p, g)), rel=1e-6)
    big = torch.zeros(1, 1, 4, 4)
    big[..., :2, :] = 1.0  # ground truth at twice the resolution is area-averaged down
    assert float(grounding_loss(logits, big)[0]) == pytest.approx(float(bce), rel=1e-6)


def test_zoo_ground_writes_the_overlay_and_mask(flmm, tmp_path, capsys) -> None:
    from zoo.ground import main

    model_dir = save_pretrained(flmm, tmp_path / "flmm", "flmm", flmm.model_args)
    out, mask_out = tmp_path / "overlay.png", tmp_path / "mask.png"
    assert main(["--model", str(model_dir), "--scene", "test:3", "--out", str(out), "--mask-out", str(mask_out),
                 "the", "blue", "square"]) == 0  # fmt: skip
    with Image.open(out) as pic:
        assert pic.size == (256, 256 + 14)  # 64 px scene x 4, plus the caption line
    with Image.open(mask_out) as m:
        assert m.size == (64, 64) and set(np.unique(np.asarray(m))) <= {0, 255}
    assert "pixels selected" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="SPLIT:INDEX"):
        main(["--model", str(model_dir), "--scene", "nowhere", "the square"])


EXTRAS = {"coord_channels": True, "image_channels": True, "pixel_refine": 4, "word_slots": 3, "word_slot_channels": 2,
          "text_film": 8, "sim_maps": 2, "sim_dim": 4}


@pytest.fixture()
def flmm_extras(base) -> FLMM:
    torch.manual_seed(0)
    model = zoo.create_model("flmm", **_args(), **EXTRAS)
    model.lmm.load_state_dict(base.state_dict())
    return model


def test_word_slots_are_each_words_own_maps_and_zero_past_the_end(flmm_extras, samples) -> None:
    m = flmm_extras
    batch = _batch(m, samples)
    ids, attn, px, words = batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["word_mask"]
    maps, _ = m.lmm_features(ids, attn, px, words)
    n = m.num_layers * m.num_heads
    assert maps.shape == (len(samples), n * (1 + 3), 8, 8)
    counts = words.sum(1)
    T = words.shape[1]
    for j in range(3):
        # the word-merged maps of a mask holding only word j are word j's own maps
        only = torch.zeros_like(words)
        for b in range(len(samples)):
            if j < int(counts[b]):
                only[b, T - int(counts[b]) + j] = True
        single, _ = m.lmm_features(ids, attn, px, only)
        for b in range(len(samples)):
            slot = maps[b, n * (1 + j) : n * (2 + j)]
            if j < int(counts[b]):
                torch.testing.assert_close(slot, single[b, :n], atol=1e-6, rtol=0)
            else:
                assert torch.equal(slot, torch.zeros_like(slot))


def test_film_starts_as_the_identity_and_every_extra_head_learns(flmm_extras, samples, base) -> None:
    m = flmm_extras
    x = torch.randn(2, 5, 16, 16)
    head = type(m.mask_head)(5, 4, 2, cond_dim=3)
    torch.testing.assert_close(head(x, torch.randn(2, 3)), head(x))
    batch = _batch(m, samples)
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    # FiLM's projections start at zero, so the expression encoder under them gets gradient from the second step
    for _ in range(2):
        opt.zero_grad()
        loss, _ = m.loss(batch)
        loss.backward()
        opt.step()
    got = {n.split(".")[0] for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {"mask_head", "refiner", "layer_weights", "text_proj", "word_reduce", "text_cond", "sim_text",
                   "sim_image", "pixel_head"}  # fmt: skip
    assert all(p.grad is None for p in m.lmm.parameters())
    # the coarse head's input: 32 merged maps, 3 slots x 2 reduced channels, x and y, RGB, 4 layers x 2 similarity maps
    assert m.mask_head.encoder[0][0].in_channels == 32 + 3 * 2 + 2 + 3 + 4 * 2
    ref = base.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in m.lmm.state_dict().items())


def _unet_input(m, samples):
    """The batch, its LMM features and media mask, and the ``[B, C, s, s]`` input the U-Net received."""
    batch = _batch(m, samples)
    maps, hidden = m.lmm_features(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["word_mask"])
    media = m.lmm.media_mask(batch["input_ids"])
    captured = {}
    handle = m.mask_head.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0]))
    try:
        m.coarse_logits(maps, hidden, batch["word_mask"], media, batch["sam_pixel_values"])
    finally:
        handle.remove()
    return batch, maps, hidden, media, captured["x"]


def test_similarity_maps_are_scaled_dot_products_of_the_projections(flmm_extras, samples) -> None:
    m = flmm_extras
    batch, maps, hidden, media, x = _unet_input(m, samples)  # the similarity maps are x's last 8 channels
    b, layer, k = 1, 2, 1
    words = batch["word_mask"][b]
    sentence = torch.cat([hidden[layer, b, -1], hidden[layer, b, words].mean(0)])
    q = m.sim_text[layer](sentence).view(2, 4)[k]
    keys = m.sim_image[layer](hidden[layer, b, media[b]]).view(-1, 2, 4)[:, k]  # [64, 4]
    expected = (keys @ q / 2.0).view(1, 1, 8, 8)
    expected = torch.nn.functional.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(x[b, -8 + layer * 2 + k], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="media"):
        m.coarse_logits(maps, hidden, batch["word_mask"], image=batch["sam_pixel_values"])


def test_image_channels_are_sams_pixels_at_map_size(flmm_extras, samples) -> None:
    m = flmm_extras
    batch, maps, hidden, media, x = _unet_input(m, samples)
    # channels: 32 merged maps, 3 x 2 word slots, x and y, then the 3 image channels, then 8 similarity maps
    rgb = x[:, 32 + 6 + 2 : 32 + 6 + 2 + 3]
    size = m.cfg.map_size
    expected = torch.nn.functional.interpolate(batch["sam_pixel_values"], size=(size, size), mode="area")
    torch.testing.assert_close(rgb, expected)
    with pytest.raises(ValueError, match="image"):
        m.coarse_logits(maps, hidden, batch["word_mask"], media)


def test_pixel_refine_starts_as_the_identity_and_sees_the_image(flmm_extras, samples) -> None:
    m = flmm_extras
    batch = _batch(m, samples)
    with torch.no_grad():
        out = m(**batch)
        maps, hidden = m.lmm_features(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                      batch["word_mask"])  # fmt: skip
        sam = m.refine(out.coarse, hidden, batch["word_mask"], batch["sam_pixel_values"])
    torch.testing.assert_close(out.refined, sam)  # the correction's last conv starts at zero
    assert m.pixel_head[0].in_channels == 5  # refined logits, coarse logits, RGB
    torch.manual_seed(1)
    torch.nn.init.normal_(m.pixel_head[-1].weight)
    with torch.no_grad():
        a = m.pixel_correction(sam, out.coarse, batch["sam_pixel_values"])
        b = m.pixel_correction(sam, out.coarse, batch["sam_pixel_values"].flip(-1))
    assert a.shape == sam.shape and not torch.allclose(a, b)


def test_sam_fourier_features_at_sams_scale_and_the_pretrained_tiny_sam_loads(tmp_path) -> None:
    import importlib.util

    from zoo.models.flmm import TINY_SAM, build_sam

    torch.manual_seed(0)
    pe = build_sam(TINY_SAM).shared_image_embedding.positional_embedding
    assert pe.shape == (2, 16) and 0.5 < float(pe.std()) < 1.5  # transformers alone draws std 16 here
    spec = importlib.util.spec_from_file_location("pretrain_tiny_sam", ROOT / "recipes/flmm/pretrain_tiny_sam.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    res = script.pretrain(tmp_path / "sam", steps=2, batch_size=2, log_every=1)
    assert set(res) >= {"bce", "dice", "iou", "cpu_s"} and res["scenes"] == 4
    torch.manual_seed(1)
    model = zoo.create_model("flmm", **{**_args(), "sam": TINY_SAM})
    model.load_sam_weights(str(tmp_path / "sam"))
    from transformers import SamModel

    saved = SamModel.from_pretrained(str(tmp_path / "sam")).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.refiner.state_dict().items())
