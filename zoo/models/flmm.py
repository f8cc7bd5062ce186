"""F-LMM (Wu et al., CVPR 2025, arXiv 2406.05821): grounding a *frozen* LLaVA-like model.

The referring expression is appended to an instruction as if it were the assistant's answer (teacher forcing, one
forward pass). The frozen LMM's post-softmax attention from the expression's words to the image tokens, for every
layer and every head, is averaged over the words (``merge="mean"``; ``"max"`` also), stacked into ``L x H`` channel
maps on the image-token grid, each map divided by its own mean (F-LMM: sum) and bilinearly up-sampled to
``map_size``; a small
U-Net (GroupNorm(1), bilinear-resize + conv up-sampling) turns them into coarse mask logits. A SAM-style refiner
(transformers' ``SamModel``) sharpens them from three prompts: the coarse logits as its dense mask prompt, the box of
the binarised coarse mask (the whole image when empty) and one text token per word (the words' hidden states of
all layers, mixed by learned softmax weights, through ``Linear(d_LLM -> d_SAM)``), appended after the box corners.

The LMM is never changed: its parameters have ``requires_grad=False``, it stays in eval mode whatever ``train()``
says, and it runs under ``no_grad``, so its answers (``generate``) are exactly the base model's. Attention is read
through ``zoo.components.attention`` (the ``zoo_capture`` function + ``AttentionCapture``), whose outputs equal
sdpa's bit for bit.

This is a model (``zoo/models``) rather than a ``zoo.methods`` method: a method acts on a model for one call and
owns no weights, while F-LMM owns trainable modules (mask head, refiner), is trained by a stage and is saved and
loaded as a checkpoint (``config.json`` names the base LMM's architecture and arguments; ``model.safetensors`` holds
the base weights too, so ``zoo.load(dir)`` rebuilds the whole grounded model).

Differences from the official code, and why:
* Images are padded to a square (LLaVA's ``pad`` preprocessing, centred) and both masks are predicted in that square
  frame, then cropped back; F-LMM pads the LMM input the same way but feeds SAM a longest-side resize.
* Word tokens of different expressions in a batch are padded to one length with SAM's own ``not_a_point_embed``
  (what SAM pads point prompts with), so a batch runs in one decoder call; F-LMM decodes one target at a time.
* For the synthetic world no SAM weights exist, so the tiny config's SAM image encoder is trained too (the recipe
  says so); with real SAM weights (``load_sam_weights``) the recipe freezes it, as the paper does. A fresh SAM's
  Fourier features are drawn at SAM's own scale, not transformers' (``build_sam``).
* Optional, off by default, on in the tiny recipe: coordinate channels, per-word map slots and a FiLM conditioning
  of the U-Net on the expression's frozen hidden states, and a pixel-level correction of the refined logits from the
  image (``pixel_refine``); off in it: learned expression-to-image-token similarity maps and the image as U-Net
  channels (``FLMMConfig``). They read only frozen-LMM outputs and the image, so the LMM and its answers stay
  untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoo.checkpoint import load_state_dict_strict
from zoo.components.attention import CAPTURE_ATTENTION, AttentionCapture, media_key_positions, use_attention
from zoo.registry import create_model, register_model

__all__ = [
    "FLMMConfig",
    "FLMM",
    "UNetMaskHead",
    "TINY_SAM",
    "dice_loss",
    "grounding_loss",
    "square_frame",
    "build_sam",
]

# A SAM small enough for 64 px scenes on a CPU: 64 px input, 4 px patches (a 16 x 16 embedding grid, 64 x 64 masks),
# width 32 (the decoder's upscaler needs a multiple of 8; ``num_pos_feats`` = width / 2).
TINY_SAM: dict[str, Any] = {
    "vision_config": {
        "hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 64, "patch_size": 4, "window_size": 0, "global_attn_indexes": [0, 1], "mlp_dim": 64,
        "num_pos_feats": 16,
    },
    "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 4, "mask_input_channels": 8},
    "mask_decoder_config": {
        "hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "iou_head_depth": 2, "iou_head_hidden_dim": 32,
    },
}  # fmt: skip
SAM_MEAN = (0.485, 0.456, 0.406)
SAM_STD = (0.229, 0.224, 0.225)
PAPER_INSTRUCTION = "Please give me a description of the image."


@dataclass(frozen=True, kw_only=True)
class FLMMConfig:
    """Everything that rebuilds an F-LMM; ``model_args`` of its checkpoint is ``asdict`` of this.

    Attributes:
        base_architecture: the registered LLaVA-like architecture that is grounded (kept frozen).
        base_args: its ``model_args`` (e.g. those of ``moe_llava_tiny.shapes``'s config.json).
        sam: ``transformers.SamConfig`` keyword arguments (``TINY_SAM``, or ViT-L's for full scale).
        instruction: the user turn before the forced answer (the paper's: ``PAPER_INSTRUCTION``).
        merge: how the words' attention maps are combined: ``mean`` (the paper) or ``max``.
        map_size: side the attention maps are up-sampled to before the U-Net (the paper: 64).
        unet_channels: the U-Net's first-level width (doubles per level; the paper's MMSeg UNet: 64).
        unet_depth: down-samplings in the U-Net (the paper: 3).
        use_mask_prompt / use_box_prompt / use_text_prompt: the refiner's three prompts (all on in the paper).
        coord_channels: append the pixel's x and y (-1..1) to the U-Net's input (CoordConv), so "the object on the
            left" can be told from where a blob is; off in the paper.
        word_slots: besides the word-merged maps, the maps of each of the expression's first ``word_slots`` words
            apart (each word's ``L x H`` maps reduced by one shared 1x1 conv to ``word_slot_channels``), so the
            U-Net sees which word looked where ("circle" vs "blue square" in a relation); 0 (the paper) = off.
        text_film: width of a FiLM conditioning of every U-Net block on the expression (the frozen LMM's hidden
            states of the last word and the mean over words, of every layer); 0 (the paper) = off.
        image_channels: append the image itself (SAM's normalised RGB input, area-resized to ``map_size``) to the
            U-Net's input, so the coarse mask can follow the object's edges and colour instead of the blob of the
            8 x 8 token grid; off in the paper (there only the refiner sees pixels).
        pixel_refine: width of a last, pixel-level correction of the refined logits (three 3x3 convs at the
            refiner's mask size over the refined logits, the up-sampled coarse logits and SAM's normalised RGB input,
            added to the refined logits; the last conv starts at zero, so an untrained one is the identity), so mask
            edges can follow the object's pixels instead of SAM's 4 x 4 up-sampling blocks; 0 (the paper) = off.
        sim_maps / sim_dim: per layer, ``sim_maps`` learned similarity maps between the expression (its last word's
            and its words' mean hidden state) and every image token's hidden state, each a dot product of two
            learned ``sim_dim``-wide projections, as extra U-Net channels; 0 (the paper) = off.
    """

    base_architecture: str
    base_args: dict[str, Any]
    sam: dict[str, Any] = field(default_factory=lambda: dict(TINY_SAM))
    instruction: str = PAPER_INSTRUCTION
    merge: Literal["mean", "max"] = "mean"
    map_size: int = 64
    unet_channels: int = 32
    unet_depth: int = 3
    use_mask_prompt: bool = True
    use_box_prompt: bool = True
    use_text_prompt: bool = True
    coord_channels: bool = False
    word_slots: int = 0
    word_slot_channels: int = 4
    text_film: int = 0
    image_channels: bool = False
    pixel_refine: int = 0
    sim_maps: int = 0
    sim_dim: int = 16


# ----------------------------------------------------------------------------------------------------------------
# Mask head
# ----------------------------------------------------------------------------------------------------------------


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(1, cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(1, cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class _InterpConv(nn.Module):
    """Bilinear x2 up-sampling then a 3x3 conv (MMSeg's ``InterpConv``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(1, cout), nn.ReLU(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


class UNetMaskHead(nn.Module):
    """``[B, C_in, H, W]`` attention maps -> ``[B, 1, H, W]`` mask logits: a U-Net with ``depth`` down-samplings,
    two 3x3 convs per level, GroupNorm(1) and InterpConv up-sampling; input zero-padded to a multiple of
    ``2**depth`` and cropped back. With ``cond_dim`` > 0, ``forward(x, cond)`` scales and shifts every block's
    output by ``(1 + gamma, beta)`` computed from ``cond`` ``[B, cond_dim]`` (FiLM); the projections start at zero,
    so an untrained FiLM is the identity."""

    def __init__(self, in_channels: int, channels: int = 32, depth: int = 3, cond_dim: int = 0) -> None:
        super().__init__()
        widths = [channels * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.encoder = nn.ModuleList(
            [_conv_block(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth + 1)]
        )
        self.up = nn.ModuleList([_InterpConv(widths[i + 1], widths[i]) for i in reversed(range(depth))])
        self.decoder = nn.ModuleList([_conv_block(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], 1, 1)
        block_widths = widths + [widths[i] for i in reversed(range(depth))]
        self.film = nn.ModuleList([nn.Linear(cond_dim, 2 * w) for w in block_widths]) if cond_dim else None
        if self.film is not None:
            for lin in self.film:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def _film(self, k: int, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.film is None or cond is None:
            return x
        gamma, beta = self.film[k](cond)[:, :, None, None].chunk(2, 1)
        return x * (1 + gamma) + beta

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        mult = 2**self.depth
        x = F.pad(x, (0, -w % mult, 0, -h % mult))
        skips = []
        for i, block in enumerate(self.encoder):
            x = self._film(i, block(x if i == 0 else F.max_pool2d(x, 2)), cond)
            skips.append(x)
        for j, (up, block, skip) in enumerate(zip(self.up, self.decoder, reversed(skips[:-1]))):
            x = self._film(len(self.encoder) + j, block(torch.cat([skip, up(x)], 1)), cond)
        return self.head(x)[..., :h, :w]


# ----------------------------------------------------------------------------------------------------------------
# Losses (BCE + Dice on the coarse and the refined mask, as F-LMM)
# ----------------------------------------------------------------------------------------------------------------


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """F-LMM's "naive" Dice on sigmoid probabilities, per mask, averaged: ``1 - (2 sum(pg) + eps) / (sum p + sum g + eps)``."""
    p = logits.sigmoid().flatten(1)
    g = target.flatten(1)
    return (1 - (2 * (p * g).sum(1) + eps) / (p.sum(1) + g.sum(1) + eps)).mean()


def grounding_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE averaged over pixels, Dice averaged over masks) of ``[B, 1, h, w]`` logits against soft targets."""
    target = F.interpolate(target, size=logits.shape[-2:], mode="area") if target.shape[-2:] != logits.shape[-2:] else target
    return F.binary_cross_entropy_with_logits(logits, target), dice_loss(logits, target)


# ----------------------------------------------------------------------------------------------------------------
# Geometry: the square frame both masks are predicted in
# ----------------------------------------------------------------------------------------------------------------


def square_frame(width: int, height: int) -> tuple[int, int, int]:
    """``(side, left, top)``: an image pasted centred on a ``side x side`` canvas, as LLaVA's ``pad`` does."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def _to_square(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    side, left, top = square_frame(w, h)
    out = np.zeros((side, side), dtype=np.float32)
    out[top : top + h, left : left + w] = mask
    return out


def _sam_pixels(image: Any, size: int) -> torch.Tensor:
    """PIL image -> ``[3, size, size]``: padded to a square with zeros after ImageNet normalisation (SAM pads with
    zeros after normalising), resized to SAM's input."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    h, w = x.shape[-2:]
    side, left, top = square_frame(w, h)
    x = F.pad(x, (left, side - w - left, top, side - h - top))
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def build_sam(sam_kwargs: dict[str, Any]) -> Any:
    """A freshly initialised transformers ``SamModel`` from ``SamConfig`` keyword arguments, with SAM's own scale for
    its random Fourier features.

    transformers draws them (boxes, points and the image grid are all encoded with them) with std hidden_size / 2,
    16 for ``TINY_SAM``; SAM's own draw uses 1. At 16 the frequencies are far above what a 16 x 16 grid resolves, so a
    SAM trained from scratch cannot tell where a box or an image token is (measured: ``recipes/flmm/README.md``).
    Real SAM weights (``FLMM.load_sam_weights``) overwrite the draw.
    """
    from transformers import SamConfig, SamModel

    sam = SamModel(SamConfig(**sam_kwargs))
    nn.init.normal_(sam.shared_image_embedding.positional_embedding, std=1.0)
    return sam


@dataclass
class GroundingOutput:
    """Mask logits in the square frame: ``coarse`` ``[B, 1, map_size, map_size]``, ``refined`` ``[B, 1, m, m]``."""

    coarse: torch.Tensor
    refined: torch.Tensor


class FLMM(nn.Module):
    """A frozen LLaVA-like ``lmm`` + ``mask_head`` (U-Net) + ``refiner`` (``SamModel``) + ``layer_weights`` +
    ``text_proj``. ``prepare(images, expressions, masks=None)`` builds a batch, ``forward(**batch)`` returns
    ``GroundingOutput``, ``ground(images, expressions)`` returns probability maps at each image's size."""

    architecture = "flmm"

    def __init__(self, cfg: FLMMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lmm = create_model(cfg.base_architecture, **cfg.base_args)
        for p in self.lmm.parameters():
            p.requires_grad_(False)
        self.lmm.eval()
        llm_cfg = self.lmm.llm.config
        self.num_layers, self.num_heads = llm_cfg.num_hidden_layers, llm_cfg.num_attention_heads
        maps = self.num_layers * self.num_heads
        in_channels = (maps + 2 * cfg.coord_channels + 3 * cfg.image_channels + cfg.word_slots * cfg.word_slot_channels
                       + self.num_layers * cfg.sim_maps)  # fmt: skip
        self.mask_head = UNetMaskHead(in_channels, cfg.unet_channels, cfg.unet_depth, cfg.text_film)
        if cfg.word_slots:
            self.word_reduce = nn.Conv2d(maps, cfg.word_slot_channels, 1)
        if cfg.sim_maps:
            d, width = self.lmm.llm.hidden_size, cfg.sim_maps * cfg.sim_dim
            self.sim_text = nn.ModuleList([nn.Linear(2 * d, width) for _ in range(self.num_layers)])
            self.sim_image = nn.ModuleList([nn.Linear(d, width) for _ in range(self.num_layers)])
        if cfg.text_film:
            self.text_cond = nn.Sequential(nn.Linear(2 * self.num_layers * self.lmm.llm.hidden_size, cfg.text_film),
                                           nn.GELU())  # fmt: skip
        self.refiner = build_sam(cfg.sam)
        d_sam = self.refiner.config.prompt_encoder_config.hidden_size
        self.layer_weights = nn.Parameter(torch.ones(self.num_layers))
        self.text_proj = nn.Linear(self.lmm.llm.hidden_size, d_sam)
        if cfg.pixel_refine:
            w = cfg.pixel_refine
            self.pixel_head = nn.Sequential(nn.Conv2d(5, w, 3, padding=1), nn.ReLU(True), nn.Conv2d(w, w, 3, padding=1),
                                            nn.ReLU(True), nn.Conv2d(w, 1, 3, padding=1))  # fmt: skip
            nn.init.zeros_(self.pixel_head[-1].weight)
            nn.init.zeros_(self.pixel_head[-1].bias)

    @property
    def model_args(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def train(self, mode: bool = True) -> FLMM:
        """The LMM stays in eval mode (it is frozen: no dropout, eval-time MoE capacity), the heads follow ``mode``."""
        super().train(mode)
        self.lmm.eval()
        return self

    @property
    def sam_image_size(self) -> int:
        return int(self.refiner.config.vision_config.image_size)

    # -- inputs --------------------------------------------------------------------------------------------------

    def prepare(
        self, images: Sequence[Any], expressions: Sequence[str], masks: Sequence[np.ndarray] | None = None
    ) -> dict[str, Any]:
        """One batch: left-padded ids of ``instruction`` + forced ``expression``, the LMM's and SAM's pixels, the
        ``[B, T]`` word mask of the expression's tokens, image sizes and, when ``masks`` are given, the ground
        truth in the square frame (``[B, 1, side, side]`` float)."""
        if len(images) != len(expressions):
            raise ValueError(f"{len(images)} images for {len(expressions)} expressions; pass one image per expression")
        tok = self.lmm.tokenizer
        head = self.lmm.build_generation_inputs(list(images), [self.cfg.instruction] * len(images))
        prefix = head["input_ids"][0][head["attention_mask"][0].bool()].tolist()
        rows = []
        for i, text in enumerate(expressions):
            words = tok(text, add_special_tokens=False).input_ids
            if not words:
                raise ValueError(f"expression {i} ({text!r}) has no tokens")
            rows.append((prefix + words, len(words)))
        n = max(len(r) for r, _ in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), n), dtype=torch.long)
        words = torch.zeros((len(rows), n), dtype=torch.bool)
        for b, (r, k) in enumerate(rows):
            ids[b, n - len(r) :] = torch.tensor(r)
            attn[b, n - len(r) :] = 1
            words[b, n - k :] = True
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": attn,
            "pixel_values": head["pixel_values"],
            "word_mask": words,
            "sam_pixel_values": torch.stack([_sam_pixels(im, self.sam_image_size) for im in images]),
            "sizes": torch.tensor([[im.size[1], im.size[0]] for im in images]),
        }
        if masks is not None:
            squares = [_to_square(np.asarray(m, dtype=np.float32)) for m in masks]
            side = max(s.shape[0] for s in squares)
            batch["target"] = torch.stack(
                [F.interpolate(torch.from_numpy(s)[None, None], size=(side, side), mode="area")[0] for s in squares]
            )
        return batch

    # -- frozen LMM features ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def lmm_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, word_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, L*H * (1 + word_slots), g, g]`` attention maps, ``[L, B, T, D]`` hidden states of every layer).

        The maps: the ``L x H`` word-merged ones, then (``word_slots`` > 0) the ``L x H`` maps of each of the first
        ``word_slots`` words of the expression, zeros where an expression is shorter."""
        media = self.lmm.media_mask(input_ids)
        capture = AttentionCapture(layers=range(self.num_layers), keys=media_key_positions(media), queries="all")
        hidden: list[torch.Tensor] = []

        def keep_hidden(i: int, state: Any) -> None:
            hidden.append(state.hidden)

        with use_attention(self.lmm, CAPTURE_ATTENTION):
            self.lmm(input_ids, attention_mask, pixel_values, hooks=[keep_hidden],
                     layer_kwargs={"attention_capture": capture})  # fmt: skip
        w = word_mask[:, None, :, None]
        counts = word_mask.sum(1)
        T = word_mask.shape[1]
        per_layer, per_slot = [], []
        for layer in range(self.num_layers):
            # [B, H, T, K]; rows of left padding attend to nothing (NaN), so select with where, never multiply
            maps = capture.maps[layer][0].float()
            if self.cfg.merge == "mean":
                merged = torch.where(w, maps, 0.0).sum(2) / w.sum(2).clamp_min(1)
            else:
                merged = maps.masked_fill(~w, float("-inf")).amax(2)
            per_layer.append(merged)
            slots = []
            for j in range(self.cfg.word_slots):
                # word j of each expression sits at T - count + j (rows are left-padded); absent words give zeros
                pos = (T - counts + j).clamp(0, T - 1)
                picked = maps[torch.arange(maps.shape[0]), :, pos]  # [B, H, K]
                slots.append(torch.where((j < counts)[:, None, None], picked, 0.0))
            per_slot.append(slots)
        # [B, L*H, K], then (word_slots > 0) the L*H maps of word 0, of word 1, ...
        stacked = torch.cat(per_layer + [torch.cat([s[j] for s in per_slot], 1) for j in range(self.cfg.word_slots)], 1)
        grid = math.isqrt(stacked.shape[-1])
        if grid * grid != stacked.shape[-1]:
            raise ValueError(f"{stacked.shape[-1]} image tokens are not a square grid")
        return stacked.view(*stacked.shape[:2], grid, grid), torch.stack(hidden).float()

    # -- heads -----------------------------------------------------------------------------------------------------

    def coarse_logits(self, maps: torch.Tensor, hidden: torch.Tensor | None = None,
                      word_mask: torch.Tensor | None = None, media: torch.Tensor | None = None,
                      image: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Each channel map divided by its own mean, up-sampled to ``map_size``, then the U-Net (with the word slots
        reduced, the coordinate channels and the FiLM conditioning when configured; these need ``hidden`` and
        ``word_mask``; the similarity maps also ``media``, the ``[B, T]`` image-token positions; the image channels
        ``image``, SAM's ``[B, 3, s, s]`` pixels)."""
        need = self.cfg.text_film or self.cfg.sim_maps
        if need and (hidden is None or word_mask is None):
            raise ValueError("text_film and sim_maps need the hidden states and the word mask")
        if need:
            last = hidden[:, :, -1]  # [L, B, D]: rows are left-padded, so the last word is the last position
            w = word_mask[None, :, :, None]
            sentence = torch.cat([last, torch.where(w, hidden, 0.0).sum(2) / w.sum(2).clamp_min(1)], -1)  # [L, B, 2D]
        grid = maps.shape[-1]
        # F-LMM divides each map by its sum; dividing by its mean (the same up to the constant g*g) keeps the values
        # near 1, beside coordinate and similarity channels of that size (GroupNorm(1) would drown maps of ~1/g^2)
        maps = maps / maps.mean((-2, -1), keepdim=True).clamp_min(1e-12)
        size = self.cfg.map_size
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        n = self.num_layers * self.num_heads
        parts = [maps[:, :n]]
        if self.cfg.word_slots:
            b = maps.shape[0]
            words = maps[:, n:].reshape(b * self.cfg.word_slots, n, size, size)
            parts.append(self.word_reduce(words).reshape(b, -1, size, size))
        if self.cfg.coord_channels:
            ramp = torch.linspace(-1.0, 1.0, size, device=maps.device)
            parts += [ramp.view(1, 1, 1, size).expand(maps.shape[0], 1, size, size),
                      ramp.view(1, 1, size, 1).expand(maps.shape[0], 1, size, size)]  # fmt: skip
        if self.cfg.image_channels:
            if image is None:
                raise ValueError("image_channels needs the image (SAM's pixel values)")
            parts.append(F.interpolate(image.float(), size=(size, size), mode="area"))
        if self.cfg.sim_maps:
            if media is None:
                raise ValueError("sim_maps needs the image-token positions (media)")
            b, m, r = maps.shape[0], self.cfg.sim_maps, self.cfg.sim_dim
            image = hidden[:, media].view(self.num_layers, b, -1, hidden.shape[-1])  # [L, B, K, D]
            sims = []
            for layer in range(self.num_layers):
                q = self.sim_text[layer](sentence[layer]).view(b, m, 1, r)
                k = self.sim_image[layer](image[layer]).view(b, -1, m, r).transpose(1, 2)  # [B, m, K, r]
                sims.append((q * k).sum(-1) / math.sqrt(r))  # [B, m, K]
            sim = torch.cat(sims, 1).view(b, -1, grid, grid)
            parts.append(F.interpolate(sim, size=(size, size), mode="bilinear", align_corners=False))
        cond = None
        if self.cfg.text_film:
            cond = self.text_cond(sentence.permute(1, 0, 2).flatten(1))
        return self.mask_head(torch.cat(parts, 1), cond)

    def _text_tokens(self, hidden: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """``[B, 1, N, D_sam]``: one token per word (layers mixed by softmax weights), padded with SAM's
        ``not_a_point_embed``; words sit at the end of each (left-padded) row."""
        mixed = torch.einsum("l,lbtd->btd", self.layer_weights.softmax(0), hidden)
        tokens = self.text_proj(mixed)
        counts = word_mask.sum(1)
        n = int(counts.max())
        T = word_mask.shape[1]
        pos = torch.arange(T - n, T, device=tokens.device)
        out = tokens[:, pos]  # the last n positions of every row
        valid = torch.arange(n, device=tokens.device)[None, :] >= (n - counts)[:, None]
        pad = self.refiner.prompt_encoder.not_a_point_embed.weight.to(out.dtype)
        out = torch.where(valid[..., None], out, pad.expand_as(out))
        return out[:, None]

    def _box(self, coarse: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 4]`` xyxy (exclusive max) of the binarised coarse mask in SAM's input frame; empty -> whole image."""
        s = self.sam_image_size
        fg = F.interpolate(coarse.detach(), size=(s, s), mode="bilinear", align_corners=False)[:, 0] > 0
        boxes = []
        for m in fg:
            ys, xs = torch.nonzero(m, as_tuple=True)
            if ys.numel() == 0:
                boxes.append(torch.tensor([0.0, 0.0, s, s]))
            else:
                boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float().cpu())
        return torch.stack(boxes)[:, None].to(coarse.device)

    def refine(self, coarse: torch.Tensor, hidden: torch.Tensor, word_mask: torch.Tensor,
               sam_pixel_values: torch.Tensor) -> torch.Tensor:  # fmt: skip
        sam = self.refiner
        image_embeddings = sam.vision_encoder(sam_pixel_values)[0]
        low = sam.config.prompt_encoder_config.image_size // sam.config.prompt_encoder_config.patch_size * 4
        mask_prompt = (
            F.interpolate(coarse, size=(low, low), mode="bilinear", align_corners=False)
            if self.cfg.use_mask_prompt else None
        )  # fmt: skip
        box = self._box(coarse) if self.cfg.use_box_prompt else None
        sparse, dense = sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=box, input_masks=mask_prompt)
        if mask_prompt is None:
            dense = dense.expand(coarse.shape[0], -1, -1, -1)
        parts = [] if sparse is None else [sparse]
        if self.cfg.use_text_prompt:
            parts.append(self._text_tokens(hidden, word_mask))
        sparse = torch.cat(parts, 2) if parts else None
        pos = sam.get_image_wide_positional_embeddings().repeat(coarse.shape[0], 1, 1, 1)
        masks = sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=pos,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )[0]
        return masks[:, 0, :1]  # [B, 1, low, low]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        word_mask: torch.Tensor,
        sam_pixel_values: torch.Tensor,
        **_: Any,
    ) -> GroundingOutput:
        maps, hidden = self.lmm_features(input_ids, attention_mask, pixel_values, word_mask)
        media = self.lmm.media_mask(input_ids) if self.cfg.sim_maps else None
        coarse = self.coarse_logits(maps, hidden, word_mask, media, sam_pixel_values)
        refined = self.refine(coarse, hidden, word_mask, sam_pixel_values)
        if self.cfg.pixel_refine:
            refined = refined + self.pixel_correction(refined, coarse, sam_pixel_values)
        return GroundingOutput(coarse=coarse, refined=refined)

    def pixel_correction(self, refined: torch.Tensor, coarse: torch.Tensor, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_refine``'s additive correction of the ``[B, 1, m, m]`` refined logits, from them, the coarse
        logits and SAM's RGB input, both resized to ``m``."""
        m = refined.shape[-1]
        up = F.interpolate(coarse, size=(m, m), mode="bilinear", align_corners=False)
        rgb = F.interpolate(sam_pixel_values.float(), size=(m, m), mode="area")
        return self.pixel_head(torch.cat([refined, up, rgb], 1))

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """F-LMM's loss: BCE + Dice on the coarse and on the refined mask (weights 1), summed."""
        out = self(**batch)
        target = batch["target"]
        bce_c, dice_c = grounding_loss(out.coarse, target)
        bce_r, dice_r = grounding_loss(out.refined, target)
        total = bce_c + dice_c + bce_r + dice_r
        logs = {"bce_coarse": bce_c.detach(), "dice_coarse": dice_c.detach(), "bce_refined": bce_r.detach(),
                "dice_refined": dice_r.detach()}  # fmt: skip
        return total, logs

    # -- inference -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def ground(
        self, images: Sequence[Any], expressions: Sequence[str], stage: Literal["refined", "coarse"] = "refined"
    ) -> list[np.ndarray]:
        """Foreground probabilities ``[H, W]`` (float32, at each image's own size) for each (image, expression)."""
        batch = self.prepare(images, expressions)
        device = next(self.mask_head.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = self(**batch)
        logits = out.refined if stage == "refined" else out.coarse
        probs = []
        for b, (h, w) in enumerate(batch["sizes"].tolist()):
            side, left, top = square_frame(w, h)
            p = F.interpolate(logits[b : b + 1].float(), size=(side, side), mode="bilinear", align_corners=False)
            probs.append(p[0, 0, top : top + h, left : left + w].sigmoid().cpu().numpy())
        return probs

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The frozen LMM's own ``generate``: F-LMM leaves its answers exactly as they were."""
        return self.lmm.generate(*args, **kwargs)

    def load_sam_weights(self, path: str) -> None:
        """Load a transformers ``SamModel`` directory (e.g. a converted ``sam_vit_l``) into the refiner, strictly."""
        from transformers import SamModel

        sam = SamModel.from_pretrained(path, local_files_only=True)
        load_state_dict_strict(self.refiner, sam.state_dict(), path, "the refiner of this F-LMM (same SAM config)")

    def num_parameters(self) -> dict[str, int]:
        """Total and activated counts (the LMM's own activated count: top-k of its experts), and the split."""
        total = sum(p.numel() for p in self.parameters())
        lmm = sum(p.numel() for p in self.lmm.parameters())
        counts = getattr(self.lmm, "num_parameters", None)
        lmm_active = counts()["active"] if callable(counts) else lmm
        return {"total": total, "active": total - lmm + lmm_active, "lmm": lmm, "grounding": total - lmm}


@register_model(family="flmm")
def flmm(**model_args: Any) -> FLMM:
    """F-LMM on any registered LLaVA-like architecture: ``base_architecture`` + ``base_args`` (see ``FLMMConfig``)."""
    return FLMM(FLMMConfig(**model_args))
