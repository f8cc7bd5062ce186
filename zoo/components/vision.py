"""Vision towers: thin adapters over open_clip, transformers and timm ViTs with one interface.

Every tower exposes ``forward_features(pixels) -> [B, N, C]`` (the patch features an LLaVA-style model feeds its
projector), ``out_dim`` (C), ``num_patches`` (N) and ``data_cfg`` (mean, std, image size for the transform).

Features follow LLaVA: the hidden states after layer ``select_layer`` (``-2`` = the penultimate layer, before any
final norm), with ``select_feature="patch"`` dropping the class/prefix tokens or ``"cls_patch"`` keeping them.
``drop_first_token=True`` reproduces MoE-LLaVA's SigLIP quirk: its tower code drops index 0 although SigLIP has no
class token, so SigLIP-so400m/14 at 384 px gives 728 instead of 729 tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.components.vision_config import VisionTowerConfig

__all__ = [
    "VisionTowerConfig",
    "VisionTower",
    "HFVisionTower",
    "OpenClipVisionTower",
    "TimmVisionTower",
    "build_vision_tower",
    "image_to_tensor",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# Class/prefix tokens in front of the patch tokens and the normalisation each HF vision model type was trained with.
_HF_PREFIX_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}
_HF_DEFAULT_NORM = {
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip_vision_model": (HALF, HALF),
}


class VisionTower(nn.Module):
    """Base: subclasses provide ``_hidden_states(pixels, layers)`` and the size attributes.

    Layers are numbered as transformers' ``hidden_states``: 0 = embeddings, ``s`` = output of block ``s - 1``,
    negative from the end (-1 = last block, -2 = penultimate).
    """

    num_prefix_tokens: int
    grid_tokens: int  # patch tokens per image
    width: int
    image_size: int
    num_blocks: int

    def __init__(self, cfg: VisionTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def _hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        raise TypeError(f"{type(self).__name__} must implement _hidden_states")

    def _block_index(self, layer: int) -> int:
        """Block whose output is ``hidden_states[layer]`` (blocks only: the embeddings are not a block)."""
        idx = self.num_blocks + layer if layer < 0 else layer - 1
        if not 0 <= idx < self.num_blocks:
            raise ValueError(
                f"layer {layer} is out of range for a {type(self).__name__} with {self.num_blocks} blocks "
                f"(use -{self.num_blocks}..-1 or 1..{self.num_blocks})"
            )
        return idx

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"vision tower expects pixels [B, 3, H, W], got {tuple(pixels.shape)}")

    def forward_intermediates(
        self, pixels: torch.Tensor, layers: list[int] | None = None
    ) -> list[torch.Tensor]:
        """Hidden states ``[B, prefix + patches, C]`` after each of ``layers`` (default: every block)."""
        self._check_pixels(pixels)
        layers = list(range(1, self.num_blocks + 1)) if layers is None else list(layers)
        return self._hidden_states(pixels, layers)

    @property
    def out_dim(self) -> int:
        return self.width

    @property
    def num_patches(self) -> int:
        n = self.grid_tokens + (self.num_prefix_tokens if self.cfg.select_feature == "cls_patch" else 0)
        return n - (1 if self.cfg.drop_first_token else 0)

    @property
    def data_cfg(self) -> dict[str, Any]:
        mean, std = self._default_norm()
        return {
            "mean": tuple(self.cfg.mean or mean),
            "std": tuple(self.cfg.std or std),
            "image_size": self.image_size,
        }

    def _default_norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixels)
        h = self._hidden_states(pixels, [self.cfg.select_layer])[0]
        if self.cfg.select_feature == "patch":
            h = h[:, self.num_prefix_tokens :]
        if self.cfg.drop_first_token:
            h = h[:, 1:]
        return h

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_features(pixels)


class HFVisionTower(VisionTower):
    """transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` (via ``output_hidden_states=True``)."""

    def __init__(self, cfg: VisionTowerConfig, model: nn.Module | None = None) -> None:
        super().__init__(cfg)
        from transformers import AutoConfig, AutoModel

        if model is None:
            conf = dict(cfg.config)
            model_type = conf.pop("model_type", None)
            if model_type not in _HF_PREFIX_TOKENS:
                raise ValueError(
                    f"hf vision tower config needs model_type in {sorted(_HF_PREFIX_TOKENS)}, got {model_type!r}"
                )
            model = AutoModel.from_config(
                AutoConfig.for_model(model_type, **conf), attn_implementation="sdpa"
            )
        self.model = model
        c = model.config
        self.model_type = c.model_type
        self.num_prefix_tokens = _HF_PREFIX_TOKENS[c.model_type]
        self.grid_tokens = (c.image_size // c.patch_size) ** 2
        self.width = c.hidden_size
        self.image_size = c.image_size
        self.num_blocks = c.num_hidden_layers
        self._block_index(cfg.select_layer)  # validate early

    def _default_norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return _HF_DEFAULT_NORM[self.model_type]

    def _hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        for layer in layers:
            if layer != 0:
                self._block_index(layer)
        hs = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return [hs[layer] for layer in layers]


class OpenClipVisionTower(VisionTower):
    """An open_clip ``VisionTransformer`` (``model.visual``), via its ``forward_intermediates``."""

    def __init__(self, cfg: VisionTowerConfig, visual: nn.Module | None = None) -> None:
        super().__init__(cfg)
        if visual is None:
            visual = _build_open_clip_visual(cfg)
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise TypeError(f"{type(visual).__name__} is not an open_clip VisionTransformer")
        self.visual = visual
        self.num_prefix_tokens = 1  # open_clip ViTs always carry one class token
        grid = visual.grid_size
        self.grid_tokens = int(grid[0] * grid[1])
        self.width = visual.transformer.width
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.num_blocks = len(visual.transformer.resblocks)
        self._block_index(cfg.select_layer)  # validate early

    def _default_norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        pre = getattr(self.visual, "preprocess_cfg", None) or {}
        mean = pre.get("mean", getattr(self.visual, "image_mean", None)) or OPENAI_CLIP_MEAN
        std = pre.get("std", getattr(self.visual, "image_std", None)) or OPENAI_CLIP_STD
        return tuple(mean), tuple(std)

    def _hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        blocks = [self._block_index(layer) for layer in layers]
        out = self.visual.forward_intermediates(
            pixels,
            indices=sorted(set(blocks)),
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        by_block = {
            b: torch.cat([p, x], dim=1)
            for b, p, x in zip(
                sorted(set(blocks)), out["image_intermediates_prefix"], out["image_intermediates"]
            )
        }
        return [by_block[b] for b in blocks]


class TimmVisionTower(VisionTower):
    """A timm ViT (``VisionTransformer`` family), via its ``forward_intermediates``."""

    def __init__(self, cfg: VisionTowerConfig, model: nn.Module | None = None) -> None:
        super().__init__(cfg)
        import timm

        if model is None:
            if not cfg.model_name:
                raise ValueError("timm vision tower needs model_name (a timm ViT architecture)")
            model = timm.create_model(cfg.model_name, pretrained=False, num_classes=0, **cfg.config)
        self.model = model
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.grid_tokens = int(model.patch_embed.num_patches)
        self.width = int(model.embed_dim)
        self.image_size = int(model.patch_embed.img_size[0])
        self.num_blocks = len(model.blocks)
        self._block_index(cfg.select_layer)  # validate early

    def _default_norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        pc = getattr(self.model, "pretrained_cfg", None) or {}
        return tuple(pc.get("mean", HALF)), tuple(pc.get("std", HALF))

    def _hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        blocks = [self._block_index(layer) for layer in layers]
        uniq = sorted(set(blocks))
        out = self.model.forward_intermediates(
            pixels,
            indices=uniq,
            return_prefix_tokens=True,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        by_block = {b: x if p is None else torch.cat([p, x], dim=1) for b, (x, p) in zip(uniq, out)}
        return [by_block[b] for b in blocks]


def _build_open_clip_visual(cfg: VisionTowerConfig) -> nn.Module:
    import open_clip

    if not cfg.model_name:
        raise ValueError(
            "open_clip vision tower needs model_name (an open_clip config name such as 'ViT-B-32')"
        )
    model = open_clip.create_model(cfg.model_name, pretrained=None, **cfg.config)
    return model.visual


def _hf(cfg: VisionTowerConfig, visual: nn.Module | None) -> VisionTower:
    return HFVisionTower(cfg)


def _open_clip(cfg: VisionTowerConfig, visual: nn.Module | None) -> VisionTower:
    return OpenClipVisionTower(cfg, visual)


def _timm(cfg: VisionTowerConfig, visual: nn.Module | None) -> VisionTower:
    return TimmVisionTower(cfg)


def _zoo(cfg: VisionTowerConfig, visual: nn.Module | None) -> VisionTower:
    if visual is None:
        raise ValueError(
            f"vision tower kind 'zoo' ({cfg.model_name!r}) is a registered mmzoo model: the model family builds it "
            "and passes its open_clip `.visual` as build_vision_tower(cfg, visual=...)"
        )
    return OpenClipVisionTower(cfg, visual)


_BUILDERS = {"hf": _hf, "open_clip": _open_clip, "timm": _timm, "zoo": _zoo}


def build_vision_tower(cfg: VisionTowerConfig | dict[str, Any], visual: nn.Module | None = None) -> VisionTower:
    """The tower ``cfg`` describes. ``visual``: an already built open_clip image tower, required for kind ``zoo``
    (components never call the registry; the family resolves ``model_name`` and passes the tower in) and optional
    for ``open_clip`` (instead of ``open_clip.create_model``)."""
    cfg = VisionTowerConfig.from_dict(cfg)
    tower = _BUILDERS[cfg.kind](cfg, visual)
    if tower.num_patches <= 0:
        raise ValueError(f"vision tower {cfg} yields no patch tokens")
    return tower


def image_to_tensor(
    img: Any,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pad_to_square: bool = True,
) -> torch.Tensor:
    """PIL image -> normalised ``[3, S, S]`` float tensor, as LLaVA's ``image_aspect_ratio="pad"`` preprocessing:
    pad to a square filled with the mean colour, then a bicubic resize to the tower's size."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if pad_to_square and w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), tuple(int(round(m * 255)) for m in mean))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x.permute(2, 0, 1).float() / 255.0 - m) / s
