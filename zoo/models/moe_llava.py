"""MoE-LLaVA (Lin et al., 2024, arXiv 2401.15947): a vision tower, an MLP projector and a causal LM whose FFNs on
every other decoder layer are upcycled into top-2 mixtures of experts.

Image placeholders in ``input_ids`` (the data pipeline expands each ``<image>`` to ``num_image_tokens`` copies of
``image_token_id``, as transformers' Llava does) are replaced by the projected penultimate-layer patch features of
the vision tower. Images are the model's one declared ``zoo.components.modality.Modality``; a family built on it
declares more (``add_modality``) and they go through the same prompt encoding, embedding and masks. The LM is any
transformers causal LM, run layer by layer by ``zoo.components.CausalLMWrapper``.
MoE layers come from ``zoo.moe`` (DeepSpeed-style top-2 gating with capacity 1.5 train / 2.0 eval and the top-1
balance loss summed over layers with coefficient 0.01), replacing the ``mlp`` of the chosen decoder layers.

Differences from the official code (see ``zoo.convert.moe_llava`` for loading its checkpoints):
* DeepSpeed adds Gumbel noise to the second expert choice in train *and* eval; we use a deterministic top-2 at eval
  (``second_choice_noise`` enables the noise in training only).
* The image placeholder is an id in the tokenizer (``<image>``) or any id given by ``image_token_id`` (official
  checkpoints use -200); positions are masked before the embedding lookup, so out-of-vocab ids are fine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.components.feature_cache import FrozenFeatureCache
from zoo.components.generation import MultimodalGenerationMixin
from zoo.components.lm import CausalLMWrapper, LayerHook, build_causal_lm
from zoo.components.modality import (
    Modality,
    check_distinct,
    count_placeholders,
    expand_placeholders,
    fill_media,
)
from zoo.components.modality import media_mask as modality_media_mask
from zoo.components.position_code import grid_position_code
from zoo.components.projector import build_projector
from zoo.components.vision import VisionTowerConfig, build_vision_tower, image_to_tensor
from zoo.conversation import IMAGE_PLACEHOLDER, get_template
from zoo.moe import MoE, MoESettings, collect_aux_loss, upcycle_causal_lm
from zoo.registry import register_model

__all__ = [
    "MoESettings",
    "MoELLaVAConfig",
    "MoELLaVA",
    "build_tokenizer_from_spec",
    "tokenizer_spec",
    "MODEL_SIZES",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MoELLaVAConfig:
    """Everything needed to rebuild the model; ``model_args`` of a checkpoint is ``asdict`` of this (JSON).

    Attributes:
        vision: a ``VisionTowerConfig`` dict.
        lm: a transformers causal-LM config dict with ``model_type``.
        projector: ``mlp2x_gelu`` (MoE-LLaVA) or ``linear``.
        template: conversation template name used by ``generate``.
        tokenizer: ``tokenizer_spec`` dict (None: forward works on ids, ``generate`` needs a tokenizer).
        image_token_id: the placeholder id in ``input_ids`` (None: the tokenizer's ``<image>``).
        moe: ``MoESettings`` dict, or None for the dense (stage I/II) model.
        attn_implementation: transformers attention backend of the LM.
        pad_to_square: LLaVA's ``image_aspect_ratio="pad"`` in ``generate``'s image transform.
        image_pos_embed: add a learned embedding per image-token position to the projected features (not in
            MoE-LLaVA; off for every official layout). A small LM trained from scratch reads rows from the token
            order but not columns; this gives every image token its own learned position vector in the LM's space.
        image_newline: LLaVA-NeXT's ``image_newline``: a learned embedding appended after each row of patch tokens
            (an image then takes ``rows x (cols + 1)`` positions; off for every official MoE-LLaVA layout). The
            raster order alone tells rows apart (8 tokens apart) but not columns; a row marker gives every token a
            nearby anchor whose distance is its column.
        image_pos_code: the mean norm of a fixed 2-D sine-cosine code of each image token's grid position added to
            the projected features (``zoo.components.position_code``; 0: off, as in every official layout). Unlike
            ``image_pos_embed`` it is loud from step 0 and never drifts: the tiny LM answers left / right only once
            the position is in the token at a scale comparable to the features (recipes/moe_llava/README.md).
        image_pos_code_dims: how many of the LM's dimensions (the first ones) the code occupies (0: all). Over the
            whole width a code of every grid place spans as many directions as there are places (63 of 128 for an
            8x8 grid), which the features then share; a few dimensions hold the place as well and leave the rest
            to what the object is.
    """

    vision: dict[str, Any]
    lm: dict[str, Any]
    projector: str = "mlp2x_gelu"
    template: str = "phi"
    tokenizer: dict[str, Any] | None = None
    image_token_id: int | None = None
    moe: dict[str, Any] | None = None
    attn_implementation: str = "sdpa"
    pad_to_square: bool = True
    image_pos_embed: bool = False
    image_newline: bool = False
    image_pos_code: float = 0.0
    image_pos_code_dims: int = 0


def _registered_visual(vision: dict[str, Any]) -> nn.Module | None:
    """For a ``kind: zoo`` tower, the open_clip ``.visual`` of the registered mmzoo model it names (else None)."""
    cfg = VisionTowerConfig.from_dict(vision)
    if cfg.kind != "zoo":
        return None
    if not cfg.model_name:
        raise ValueError("zoo vision tower needs model_name (a registered mmzoo CLIP architecture)")
    from zoo.registry import create_model

    visual = getattr(create_model(cfg.model_name, **cfg.config), "visual", None)
    if visual is None:
        raise TypeError(f"mmzoo model {cfg.model_name!r} has no open_clip `.visual` image tower")
    return visual


def tokenizer_spec(tok: Any) -> dict[str, Any]:
    """A JSON-able description of a fast tokenizer that ``build_tokenizer_from_spec`` turns back into it."""
    specials = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    extra = [t for t in getattr(tok, "additional_special_tokens", []) or []]
    return {
        "kind": "hf_json",
        "json": tok.backend_tokenizer.to_str(),
        "special_tokens": specials,
        "additional_special_tokens": extra,
    }


def build_tokenizer_from_spec(spec: dict[str, Any]) -> Any:
    """``{"kind": "word_level", "json": ...}`` (zoo.tokenizers) or ``{"kind": "hf_json", "json": ..., ...}``."""
    kind = spec.get("kind")
    if kind == "word_level":
        from zoo.tokenizers import tokenizer_from_json

        return tokenizer_from_json(spec["json"])
    if kind == "hf_json":
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        specials = dict(spec.get("special_tokens", {}))
        specials.pop("additional_special_tokens", None)
        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(spec["json"]),
            additional_special_tokens=list(spec.get("additional_special_tokens", [])),
            **specials,
        )
    raise ValueError(f"tokenizer spec kind {kind!r} unknown; use 'word_level' or 'hf_json'")


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class MoELLaVA(MultimodalGenerationMixin, nn.Module):
    """Vision tower -> projector -> causal LM (dense or with MoE layers).

    Submodules: ``vision_tower`` (a ``zoo.components.VisionTower``), ``mm_projector`` (nn.Sequential),
    ``llm`` (``CausalLMWrapper``; the transformers model is ``llm.lm``). ``generate`` / ``generate_ids`` and
    ``last_generation_stats`` come from ``zoo.components.generation.MultimodalGenerationMixin``.
    """

    architecture = "moe_llava"

    def __init__(self, cfg: MoELLaVAConfig, architecture: str = "moe_llava") -> None:
        super().__init__()
        self.cfg = cfg
        self.architecture = architecture
        self.vision_tower = build_vision_tower(cfg.vision, visual=_registered_visual(cfg.vision))
        self.tokenizer = build_tokenizer_from_spec(cfg.tokenizer) if cfg.tokenizer is not None else None
        lm_cfg = dict(cfg.lm)
        if "vocab_size" not in lm_cfg and self.tokenizer is not None:
            lm_cfg["vocab_size"] = len(self.tokenizer)
        lm = build_causal_lm(lm_cfg, attn_implementation=cfg.attn_implementation)
        self.llm = CausalLMWrapper(lm)
        self.mm_projector = build_projector(cfg.projector, self.vision_tower.out_dim, self.llm.hidden_size)
        # Zero-initialised, so switching it on leaves a trained model's outputs unchanged until it trains.
        self.image_pos_embed = (
            nn.Parameter(torch.zeros(self.vision_tower.num_patches, self.llm.hidden_size))
            if cfg.image_pos_embed
            else None
        )
        # Computed from the config, so not saved: checkpoints keep the official key layout.
        code = None
        if cfg.image_pos_code:
            side = self._grid_side()
            width = self.llm.hidden_size
            dims = cfg.image_pos_code_dims or width
            if not 4 <= dims <= width:
                raise ValueError(f"image_pos_code_dims must be 0 (all) or 4..{width} (the LM's width), got {dims}")
            code = torch.zeros(side * side, width)
            code[:, :dims] = grid_position_code((side, side), dims, cfg.image_pos_code)
        self.register_buffer("image_pos_code", code, persistent=False)
        # LLaVA-NeXT initialises it as randn / sqrt(width) (the scale of a token embedding); a square grid only.
        self.image_newline = None
        if cfg.image_newline:
            self._grid_side()
            self.image_newline = nn.Parameter(torch.randn(self.llm.hidden_size) / self.llm.hidden_size**0.5)
        self.template = get_template(cfg.template)
        # The media this model reads, in the order their features are filled (see zoo.components.modality). A
        # model with neither an image id nor a tokenizer to find one runs on text only.
        self.modalities: dict[str, Modality] = {}
        image_id = self._resolve_image_token_id()
        if image_id is not None:
            self.add_modality(
                Modality(
                    name="image",
                    placeholder=IMAGE_PLACEHOLDER,
                    token_id=image_id,
                    tokens_per_item=self.num_image_tokens,
                    input_key="pixel_values",
                    prepare=self._image_to_tensor,
                    encode=self.encode_images,
                )
            )
        self.moe_layers: list[int] = []
        if cfg.moe is not None:
            self._upcycle(MoESettings.from_dict(cfg.moe))
        self.tower_cache: FrozenFeatureCache | None = None

    # -- config / bookkeeping ------------------------------------------------------------------------------------
    @property
    def model_args(self) -> dict[str, Any]:
        """The JSON ``model_args`` that rebuild this model through the registry."""
        d = asdict(self.cfg)
        d["lm"] = dict(self.cfg.lm)
        d["lm"].setdefault("vocab_size", self.llm.config.vocab_size)
        return d

    @property
    def num_image_tokens(self) -> int:
        """Positions one image takes: the tower's patch tokens, plus one row marker per row with ``image_newline``."""
        n = self.vision_tower.num_patches
        return n + self._grid_side() if self.cfg.image_newline else n

    def _grid_side(self) -> int:
        n = self.vision_tower.num_patches
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"image_newline needs a square grid of patch tokens (no CLS token); the tower gives {n}")
        return side

    def _resolve_image_token_id(self) -> int | None:
        if self.cfg.image_token_id is not None:
            return self.cfg.image_token_id
        if self.tokenizer is None:
            return None
        tid = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        return None if tid is None or tid == self.tokenizer.unk_token_id else tid

    @property
    def image_token_id(self) -> int:
        if "image" not in self.modalities:
            raise self._no_image_modality()
        return self.modalities["image"].token_id

    def _no_image_modality(self) -> ValueError:
        if self.tokenizer is None:
            return ValueError("model has neither image_token_id nor a tokenizer with an <image> token")
        return ValueError(f"tokenizer has no {IMAGE_PLACEHOLDER} token; set image_token_id in the model config")

    def add_modality(self, modality: Modality) -> None:
        """Declare a modality (a family adding video, audio or speech registers its encoder as a submodule first).

        Its placeholder is expanded by ``build_generation_inputs``, its positions are filled by
        ``embed_multimodal`` after those of the modalities declared before it, and ``media_mask`` covers it.
        """
        check_distinct([*self.modalities.values(), modality])
        self.modalities[modality.name] = modality

    @property
    def data_cfg(self) -> dict[str, Any]:
        return {**self.vision_tower.data_cfg, "pad_to_square": self.cfg.pad_to_square}

    def _upcycle(self, moe: MoESettings) -> None:
        self.moe_layers = upcycle_causal_lm(
            self.llm.lm,
            num_experts=moe.num_experts,
            top_k=moe.top_k,
            layers=moe.layers if isinstance(moe.layers, str) else list(moe.layers),
            capacity_factor=moe.capacity_factor,
            eval_capacity_factor=moe.eval_capacity_factor,
            min_capacity=moe.min_capacity,
            balance_loss="top1",
            balance_loss_coef=moe.aux_loss_coef,
            second_choice_noise=moe.second_choice_noise,
        )

    def enable_moe(self, moe: MoESettings | dict[str, Any] | None = None) -> list[int]:
        """Upcycle the dense model in place (MoE-LLaVA stage III): experts start as copies of each layer's FFN.

        Updates ``cfg`` so that ``model_args`` describes the MoE model. Returns the converted layer indices.
        """
        if self.cfg.moe is not None:
            raise ValueError("model already has MoE layers")
        settings = MoESettings.from_dict(moe or {})
        self._upcycle(settings)
        self.cfg = MoELLaVAConfig(**{**asdict(self.cfg), "moe": settings.to_dict()})
        return self.moe_layers

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each LM decoder layer in backward (transformers' per-layer checkpointing; our loop keeps it)."""
        self.llm.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def num_parameters(self) -> dict[str, int]:
        """Total and activated parameter counts (activated: each MoE layer counts only top-k of its experts)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for m in self.llm.modules():
            if isinstance(m, MoE):
                per_all = sum(p.numel() for p in m.experts.parameters())
                e, k = m.cfg.routed_experts, m.cfg.routed_top_k
                inactive += per_all * (e - k) // e
        vision = sum(p.numel() for p in self.vision_tower.parameters())
        proj = sum(p.numel() for p in self.mm_projector.parameters())
        return {
            "total": total,
            "active": total - inactive,
            "vision": vision,
            "projector": proj,
            "llm_total": total - vision - proj,
            "llm_active": total - vision - proj - inactive,
        }

    def cache_tower_features(self, enabled: bool = True, max_items: int | None = None) -> None:
        """Compute the tower's features once per distinct image and reuse them (``zoo.components.feature_cache``).

        Used only while no tower parameter requires grad: a frozen tower's output is a function of the pixels, and
        LLaVA's stages I-III show each image many times. Off again with ``enabled=False``; the cache is dropped then.
        Loading other weights into the tower while it is on would serve stale features: switch it off first.
        """
        self.tower_cache = FrozenFeatureCache(max_items) if enabled else None

    # -- forward -------------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> projected features ``[N, num_image_tokens, D_lm]``."""
        tower_frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        pixels = pixel_values.to(self._tower_dtype())
        if self.tower_cache is not None and tower_frozen:
            feats = self.tower_cache(self.vision_tower.forward_features, pixels)
        else:
            tower_trains = not tower_frozen and self.training
            with torch.set_grad_enabled(tower_trains and torch.is_grad_enabled()):
                feats = self.vision_tower.forward_features(pixels)
        out = self.mm_projector(feats.to(self.mm_projector[0].weight.dtype))
        if self.image_pos_embed is not None:
            out = out + self.image_pos_embed.to(out.dtype)
        if self.image_pos_code is not None:
            out = out + self.image_pos_code.to(out.dtype)
        if self.image_newline is not None:
            n, side = out.shape[0], self._grid_side()
            rows = out.reshape(n, side, side, out.shape[-1])
            marker = self.image_newline.to(out.dtype).expand(n, side, 1, out.shape[-1])
            out = torch.cat([rows, marker], dim=2).reshape(n, side * (side + 1), out.shape[-1])
        return out

    def _tower_dtype(self) -> torch.dtype:
        p = next(self.vision_tower.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def preprocess(self, image: Any) -> torch.Tensor:
        """The model's own image transform (PIL -> normalised ``[3, S, S]``: the tower's size, mean and std, padded
        to a square when ``pad_to_square``), the one ``generate`` applies; stack its outputs for ``pixel_values``."""
        return self._image_to_tensor(image)

    def _image_to_tensor(self, image: Any) -> torch.Tensor:
        if not hasattr(image, "convert"):
            raise TypeError(f"image is a {type(image).__name__}, expected a PIL.Image")
        dc = self.data_cfg
        return image_to_tensor(image, dc["image_size"], dc["mean"], dc["std"], dc["pad_to_square"])

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: positions whose embeddings are image features."""
        return input_ids == self.image_token_id

    def media_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: positions whose embeddings are media features (of any declared modality)."""
        return modality_media_mask(input_ids, self.modalities.values())

    def embed_multimodal(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **media: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with every modality's positions filled by its encoded items, in order.

        ``pixel_values`` are the stacked images; ``media`` the stacked items of the other declared modalities, by
        their ``input_key`` (None or absent: none in this batch).
        """
        if pixel_values is not None and "image" not in self.modalities:
            raise self._no_image_modality()
        inputs = {"pixel_values": pixel_values, **media}
        return fill_media(self.llm.embed, input_ids, list(self.modalities.values()), inputs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        hooks: Sequence[LayerHook] = (),
        layer_kwargs: dict[str, Any] | None = None,
        **media: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
        """Returns ``(loss, logits, aux)``; loss = next-token CE over labels != -100 + summed MoE aux loss.

        ``hooks`` run after every decoder layer and ``layer_kwargs`` reach every layer's attention function (see
        ``zoo.components.CausalLMWrapper``); ``media_mask(input_ids)`` tells which positions hold media features.
        ``media``: stacked items of declared modalities other than images, by ``input_key``.
        """
        embeds = self.embed_multimodal(input_ids, pixel_values, **media)
        out = self.llm(
            inputs_embeds=embeds, attention_mask=attention_mask, hooks=hooks, layer_kwargs=layer_kwargs
        )
        logits = out.logits
        aux: dict[str, torch.Tensor] = {}
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            lm_loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            moe_loss = collect_aux_loss(self.llm).to(lm_loss.dtype)
            loss = lm_loss + moe_loss
            aux = {"lm_loss": lm_loss.detach(), "moe_aux_loss": moe_loss.detach()}
        stats = [m.last_stats for m in self.llm.modules() if isinstance(m, MoE) and m.last_stats is not None]
        if stats:
            aux["moe_drop_rate"] = torch.tensor(sum(s.drop_rate for s in stats) / len(stats))
        return loss, logits, aux

    # -- generation ----------------------------------------------------------------------------------------------
    def _encode_prompt(self, text: str) -> list[int]:
        """Token ids of ``text`` with every placeholder of a declared modality expanded to its token count."""
        ids, _ = expand_placeholders(
            text,
            list(self.modalities.values()),
            lambda piece: self.tokenizer(piece, add_special_tokens=False).input_ids,
        )
        return ids

    def build_generation_inputs(
        self,
        images: Sequence[Any] | None,
        prompts: list[str],
        apply_template: bool = True,
        media: dict[str, Sequence[Any]] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Left-padded ``input_ids`` / ``attention_mask`` and each modality's stacked items for ``generate``.

        ``images`` and every list of ``media`` (keyed by modality name: ``{"audio": [...]}``) hold one entry per
        prompt: an item, a list of items, or None. A prompt without placeholders of a modality gets one per item in
        front of it (LLaVA puts the image before the question), in the order the modalities were declared. The
        result has ``input_ids``, ``attention_mask`` and, per declared modality, its ``input_key`` (``pixel_values``)
        holding ``[N_items, ...]`` or None when the batch has none of it.
        """
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer (model_args.tokenizer is None); cannot generate from text"
            )
        per_prompt = self._media_per_prompt(images, prompts, media or {})
        specs = list(self.modalities.values())
        rows: list[list[int]] = []
        for i, (items, prompt) in enumerate(zip(per_prompt, prompts)):
            counts = count_placeholders(prompt, specs)
            lead = ""
            for m in specs:
                given = len(items[m.name])
                if counts[m.name] == 0 and given:
                    lead += (m.placeholder + "\n") * given
                elif counts[m.name] != given:
                    raise ValueError(
                        f"prompt {i} has {counts[m.name]} {m.placeholder} placeholder(s) but {given} {m.name}(s) "
                        f"were given; pass one {m.name} per placeholder (prompt: {prompt[:80]!r})"
                    )
            text = lead + prompt
            rows.append(self._encode_prompt(self.template.prompt(text) if apply_template else text))
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else 0
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for b, r in enumerate(rows):
            if r:
                ids[b, n - len(r) :] = torch.tensor(r)
                mask[b, n - len(r) :] = 1
        out: dict[str, torch.Tensor | None] = {"input_ids": ids, "attention_mask": mask}
        for m in specs:
            tensors = []
            for i, items in enumerate(per_prompt):
                for item in items[m.name]:
                    try:
                        tensors.append(m.prepare(item))
                    except TypeError as e:
                        raise TypeError(f"{m.name} for prompt {i}: {e}") from None
            out[m.input_key] = torch.stack(tensors) if tensors else None
        return out

    def _media_per_prompt(
        self, images: Sequence[Any] | None, prompts: list[str], media: dict[str, Sequence[Any]]
    ) -> list[dict[str, list[Any]]]:
        """Per prompt, the items of every declared modality (entries may be an item, a list of items, or None)."""
        by_name: dict[str, Sequence[Any]] = dict(media)
        if images is not None:
            if "image" in by_name and any(x is not None for x in images):
                raise ValueError("images given both as the images argument and as media['image']; pass them once")
            if len(images) != len(prompts):
                raise ValueError(
                    f"generate got {len(images)} image entries for {len(prompts)} prompts; pass one "
                    "(PIL image, list of images, or None) per prompt"
                )
            by_name.setdefault("image", images)
        unknown = sorted(set(by_name) - set(self.modalities))
        if unknown == ["image"] and any(x is not None for x in by_name["image"]):
            raise self._no_image_modality()
        if unknown and any(x is not None for name in unknown for x in by_name[name]):
            raise ValueError(f"this model has no modality {unknown}; it reads {list(self.modalities)}")
        per_prompt: list[dict[str, list[Any]]] = [{name: [] for name in self.modalities} for _ in prompts]
        for name in self.modalities:
            entries = by_name.get(name)
            if entries is None:
                continue
            if len(entries) != len(prompts):
                raise ValueError(
                    f"generate got {len(entries)} {name} entries for {len(prompts)} prompts; pass one per prompt"
                )
            for row, entry in zip(per_prompt, entries):
                row[name] = [] if entry is None else list(entry) if isinstance(entry, list | tuple) else [entry]
        return per_prompt


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint filter (official MoE-LLaVA and transformers Llava state dicts -> ours)
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MoELLaVA) -> dict[str, torch.Tensor]:
    """Map an official MoE-LLaVA state dict to this model's keys (see ``zoo.convert.moe_llava``)."""
    # lazy: breaks the import cycle zoo.models.moe_llava <-> zoo.convert.moe_llava
    from zoo.convert.moe_llava import official_to_zoo_state_dict

    return official_to_zoo_state_dict(state_dict, model)


# ----------------------------------------------------------------------------------------------------------------
# Size table
# ----------------------------------------------------------------------------------------------------------------

# transformers CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336) and SigLIP so400m/14-384 vision configs.
CLIP_L_336 = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
SIGLIP_SO400M_384 = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)

# LLM backbones (standard HF configs). Qwen-1.8B (Qwen v1) is expressed with transformers' Qwen2 architecture, which
# has the same computation (qkv bias, SwiGLU, RMSNorm, rotary); zoo.convert maps its `transformer.h.*` keys.
PHI2 = dict(
    model_type="phi",
    vocab_size=51200,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    partial_rotary_factor=0.4,
    hidden_act="gelu_new",
    max_position_embeddings=2048,
    layer_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
STABLELM2_1_6B = dict(
    model_type="stablelm",
    vocab_size=100352,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=24,
    num_attention_heads=32,
    num_key_value_heads=32,
    partial_rotary_factor=0.25,
    hidden_act="silu",
    max_position_embeddings=4096,
    layer_norm_eps=1e-5,
    use_qkv_bias=True,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
QWEN_1_8B = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "phi2": dict(lm=PHI2, template="phi"),
    "stablelm": dict(lm=STABLELM2_1_6B, template="stablelm"),
    "qwen": dict(lm=QWEN_1_8B, template="qwen"),
}

# Paper (README model zoo) sizes: LLM parameters in billions, total (all experts) and activated (top-2).
PAPER_PARAMS_B = {"stablelm": (2.9, 2.0), "qwen": (3.1, 2.2), "phi2": (5.3, 3.6)}

TINY_LM = dict(
    model_type="phi",
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    partial_rotary_factor=0.5,
    rope_theta=300.0,  # sequences of ~150 tokens with 8-token image rows, not 2048; see the recipe README
    hidden_act="gelu_pytorch_tanh",
    max_position_embeddings=512,
    tie_word_embeddings=False,
    initializer_range=0.1,  # 0.02 is sized for widths in the thousands; at 128 it trains slower (recipe README)
)
TINY_VISION = dict(kind="zoo", model_name="clip_vit_tiny4")  # the tower of recipes/moe_llava/shapes_tiny.yaml


# ----------------------------------------------------------------------------------------------------------------
# Registered architectures
# ----------------------------------------------------------------------------------------------------------------


def _build(architecture: str, defaults: dict[str, Any], **model_args: Any) -> MoELLaVA:
    args = {**defaults, **model_args}
    if isinstance(args.get("vision"), VisionTowerConfig):
        args["vision"] = args["vision"].to_dict()
    return MoELLaVA(MoELLaVAConfig(**args), architecture=architecture)


def _full(size: str, vision: dict[str, Any], **model_args: Any) -> dict[str, Any]:
    return dict(vision=vision, moe=MoESettings().to_dict(), **MODEL_SIZES[size], **model_args)


@register_model
def moe_llava_tiny(**model_args: Any) -> MoELLaVA:
    """Tiny CLIP tower + 4-layer Phi-like LM over the synthetic world's word-level vocabulary (CPU recipe)."""
    if "tokenizer" not in model_args:
        from zoo.tokenizers import build_tokenizer, tokenizer_to_json

        model_args["tokenizer"] = {"kind": "word_level", "json": tokenizer_to_json(build_tokenizer())}
    return _build("moe_llava_tiny", dict(vision=TINY_VISION, lm=TINY_LM, template="phi"), **model_args)


@register_model
def moe_llava_phi2_4e(**model_args: Any) -> MoELLaVA:
    """MoE-LLaVA-2.7Bx4-Top2: CLIP-L/336 + Phi-2 with 16 MoE layers."""
    vision = dict(kind="hf", config=CLIP_L_336)
    return _build("moe_llava_phi2_4e", _full("phi2", vision), **model_args)


@register_model
def moe_llava_phi2_4e_384(**model_args: Any) -> MoELLaVA:
    """MoE-LLaVA-2.7Bx4-Top2-384: SigLIP-so400m/14-384 (with the first-token quirk) + Phi-2."""
    vision = dict(kind="hf", config=SIGLIP_SO400M_384, drop_first_token=True)
    return _build("moe_llava_phi2_4e_384", _full("phi2", vision), **model_args)


@register_model
def moe_llava_stablelm_4e(**model_args: Any) -> MoELLaVA:
    """MoE-LLaVA-1.6Bx4-Top2: CLIP-L/336 + StableLM-2-1.6B with 12 MoE layers."""
    vision = dict(kind="hf", config=CLIP_L_336)
    return _build("moe_llava_stablelm_4e", _full("stablelm", vision), **model_args)


@register_model
def moe_llava_stablelm_4e_384(**model_args: Any) -> MoELLaVA:
    """MoE-LLaVA-1.6Bx4-Top2-384: SigLIP-so400m/14-384 (with the first-token quirk) + StableLM-2-1.6B."""
    vision = dict(kind="hf", config=SIGLIP_SO400M_384, drop_first_token=True)
    return _build("moe_llava_stablelm_4e_384", _full("stablelm", vision), **model_args)


@register_model
def moe_llava_qwen_4e(**model_args: Any) -> MoELLaVA:
    """MoE-LLaVA-1.8Bx4-Top2: CLIP-L/336 + Qwen-1.8B with 12 MoE layers."""
    vision = dict(kind="hf", config=CLIP_L_336)
    return _build("moe_llava_qwen_4e", _full("qwen", vision), **model_args)


@register_model
def moe_llava_custom(**model_args: Any) -> MoELLaVA:
    """Any combination given fully by ``model_args`` (what ``zoo convert`` writes for official checkpoints)."""
    return _build("moe_llava_custom", {}, **model_args)
