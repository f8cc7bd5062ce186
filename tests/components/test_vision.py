"""Vision towers give LLaVA's penultimate-layer patch features for each backend."""

from __future__ import annotations

import pytest
import torch

from zoo.components import VisionTowerConfig, build_projector, build_vision_tower
from zoo.components.vision import OpenClipVisionTower, TimmVisionTower

CLIP_VISION = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
SIGLIP_VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def _pixels(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_hf_clip_tower_is_penultimate_patch_tokens() -> None:
    torch.manual_seed(0)
    tower = build_vision_tower(VisionTowerConfig(kind="hf", config=CLIP_VISION)).eval()
    px = _pixels()
    with torch.no_grad():
        feats = tower.forward_features(px)
        ref = tower.model(pixel_values=px, output_hidden_states=True).hidden_states
    assert len(ref) == 4 and tower.num_patches == 16 and tower.out_dim == 32
    torch.testing.assert_close(feats, ref[-2][:, 1:])
    assert tower.data_cfg["image_size"] == 32 and tower.data_cfg["mean"][0] == pytest.approx(0.48145466)

    cls = build_vision_tower(VisionTowerConfig(kind="hf", config=CLIP_VISION, select_feature="cls_patch"))
    cls.load_state_dict(tower.state_dict())
    with torch.no_grad():
        assert cls.eval().forward_features(px).shape == (2, 17, 32) and cls.num_patches == 17


def test_siglip_first_token_quirk_drops_one_real_patch() -> None:
    torch.manual_seed(0)
    plain = build_vision_tower(VisionTowerConfig(kind="hf", config=SIGLIP_VISION)).eval()
    quirk = build_vision_tower(
        VisionTowerConfig(kind="hf", config=SIGLIP_VISION, drop_first_token=True)
    ).eval()
    quirk.load_state_dict(plain.state_dict())
    px = _pixels()
    with torch.no_grad():
        a, b = plain.forward_features(px), quirk.forward_features(px)
    assert plain.num_patches == 16 and quirk.num_patches == 15  # (729 -> 728 at full size)
    assert a.shape == (2, 16, 32) and b.shape == (2, 15, 32)
    torch.testing.assert_close(b, a[:, 1:])
    assert plain.data_cfg["mean"] == (0.5, 0.5, 0.5)


def test_open_clip_tower_feeds_the_last_block() -> None:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=3, heads=4, mlp_ratio=2.0, output_dim=16
    ).eval()
    tower = OpenClipVisionTower(VisionTowerConfig(kind="open_clip", select_feature="cls_patch"), visual)
    px = _pixels()
    with torch.no_grad():
        tokens = tower.forward_features(px)  # prefix + patches after block 1 (of 0..2)
        x = visual.transformer.resblocks[-1](tokens)
        x = visual.ln_post(x)
        pooled = x[:, 0] @ visual.proj
        ref = visual(px)
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-5)
    patch = OpenClipVisionTower(VisionTowerConfig(kind="open_clip"), visual)
    assert patch.num_patches == 16 and patch.out_dim == 32
    with torch.no_grad():
        torch.testing.assert_close(patch.forward_features(px), tokens[:, 1:])


def test_timm_tower_feeds_the_last_block() -> None:
    torch.manual_seed(0)
    cfg = VisionTowerConfig(
        kind="timm",
        model_name="vit_tiny_patch16_224",
        config=dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3),
        select_feature="cls_patch",
    )
    tower = build_vision_tower(cfg).eval()
    assert isinstance(tower, TimmVisionTower) and tower.num_patches == 17 and tower.out_dim == 48
    px = _pixels()
    with torch.no_grad():
        tokens = tower.forward_features(px)
        ref = tower.model.forward_features(px)
        x = tower.model.norm(tower.model.blocks[-1](tokens))
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)


def test_projectors_and_bad_configs() -> None:
    mlp = build_projector("mlp2x_gelu", 8, 16)
    assert [n for n, _ in mlp.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert build_projector("linear", 8, 16)(torch.zeros(1, 3, 8)).shape == (1, 3, 16)
    with pytest.raises(ValueError, match="projector type"):
        build_projector("qformer", 8, 16)
    with pytest.raises(ValueError, match="vision tower kind"):
        VisionTowerConfig(kind="clip")
    with pytest.raises(ValueError, match="layer -9 is out of range"):
        build_vision_tower(
            VisionTowerConfig(
                kind="timm",
                model_name="vit_tiny_patch16_224",
                select_layer=-9,
                config=dict(img_size=32, patch_size=8, depth=3),
            )
        )
    tower = build_vision_tower(VisionTowerConfig(kind="hf", config=CLIP_VISION))
    with pytest.raises(ValueError, match=r"pixels \[B, 3, H, W\]"):
        tower.forward_features(torch.zeros(3, 32, 32))


def test_zoo_clip_tower_is_built_by_the_family_from_the_registered_tiny_clip() -> None:
    from zoo.registry import create_model

    with pytest.raises(ValueError, match="the model family builds it"):
        build_vision_tower(VisionTowerConfig(kind="zoo", model_name="clip_vit_tiny"))
    torch.manual_seed(0)
    # The family (here MoE-LLaVA) resolves the registered name and hands the tower in.
    llava = create_model("moe_llava_tiny", vision=dict(kind="zoo", model_name="clip_vit_tiny"))
    tower = llava.vision_tower.eval()
    assert tower.num_patches == 64 and tower.out_dim == 128 and tower.image_size == 64
    clip = create_model("clip_vit_tiny").eval()
    assert tower.data_cfg["mean"] == tuple(clip.visual.preprocess_cfg["mean"])
    tower.visual.load_state_dict(clip.visual.state_dict())
    px = _pixels(2, 64)
    with torch.no_grad():
        feats = tower.forward_features(px)
        cls_tower = OpenClipVisionTower(
            VisionTowerConfig(kind="open_clip", select_feature="cls_patch"), clip.visual
        )
        tokens = cls_tower.forward_features(px)
        x = clip.visual.ln_post(clip.visual.transformer.resblocks[-1](tokens))
        ref = clip.encode_image(px)
    torch.testing.assert_close(feats, tokens[:, 1:])
    torch.testing.assert_close(x[:, 0] @ clip.visual.proj, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hf", "open_clip", "timm"])
def test_forward_intermediates_use_hf_hidden_state_numbering(kind: str) -> None:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    if kind == "hf":
        tower = build_vision_tower(VisionTowerConfig(kind="hf", config=CLIP_VISION))
    elif kind == "open_clip":
        visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=3, heads=4, mlp_ratio=2.0)
        tower = OpenClipVisionTower(VisionTowerConfig(kind="open_clip"), visual)
    else:
        tower = build_vision_tower(
            VisionTowerConfig(
                kind="timm",
                model_name="vit_tiny_patch16_224",
                config=dict(img_size=32, patch_size=8, depth=3),
            )
        )
    px = _pixels()
    with torch.no_grad():
        every = tower.eval().forward_intermediates(px)
        picked = tower.forward_intermediates(px, [-2, 3, 1])
        feats = tower.forward_features(px)
    assert len(every) == 3
    torch.testing.assert_close(picked[0], every[1])  # -2 = penultimate = output of block 2 of 3
    torch.testing.assert_close(picked[1], every[2])
    torch.testing.assert_close(picked[2], every[0])
    torch.testing.assert_close(feats, every[1][:, tower.num_prefix_tokens :])
    with pytest.raises(ValueError, match="out of range"):
        tower.forward_intermediates(px, [4])
