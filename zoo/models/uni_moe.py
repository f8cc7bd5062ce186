"""Uni-MoE (Li et al., 2024, arXiv 2405.11273): one causal LM with sparse MoE layers reading images, video, speech
and non-speech audio through modality-specific encoders and connectors. Facts: ``shared/reference/
moe_llava_unimoe.md`` part B and ``audio_video_benchmarks.md``.

* image: vision tower (penultimate-layer patches) -> ``mlp2x_gelu`` projector, as MoE-LLaVA (this class extends
  ``zoo.models.moe_llava.MoELLaVA``, which owns the image path, prompts, embedding and ``generate``);
* video: every frame through the same tower and projector, then the mean over frames (the paper's pooling), so a
  video takes as many positions as an image;
* speech: frozen Whisper encoder -> Whisper-decoder aligner over learnable queries -> projector, 30-s chunks
  concatenated (``zoo.components.audio.WhisperSpeechConnector``);
* audio (non-speech): BEATs -> Q-Former connector over learnable queries -> projector.

MoE layers come from ``zoo.moe``: Mixtral-style routing (softmax over all, top-k renormalised, which equals the
official softmax over the k chosen logits; dropless; no auxiliary loss, as v1) or the DeepSpeed top-2 variant of
the 8-expert model (capacity optional, balance loss from the first choice), on all layers or every other layer.
In the LoRA stage each expert is its own frozen FFN plus its own LoRA (rank 8, alpha 16, dropout 0.05) and the
attention projections get LoRA from ``zoo.components.lora`` (our own LoRA code; peft is not used); routers train
fully. ``merge_lora`` folds all LoRA into the weights for inference.

Modalities (name: placeholder, id): ``image``: ``<image>`` -200, ``audio``: ``<audio>`` -300 through the Whisper path
(Uni-MoE's speech models read every voice file, speech or not, with Whisper), ``video``: ``<video>`` -400, as the
official code; these names are the media keys of ``generate`` and of the eval tasks. The BEATs path is ``sound``:
``<sound>`` -500 so that one model may hold both audio paths; the official audio model (BEATs only) names it
``audio`` / ``<audio>`` / -300 (``AudioSettings.name``, ``placeholder``, ``token_id``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from zoo.components.audio import (
    SAMPLE_RATE,
    BEATs,
    BEATsConfig,
    QFormerConnector,
    QFormerConnectorConfig,
    WhisperSpeechConfig,
    WhisperSpeechConnector,
    beats_fbank,
    fixed_length,
    whisper_chunks,
)
from zoo.components.lora import add_lora, merge_lora
from zoo.components.modality import Modality
from zoo.components.position_code import grid_position_code
from zoo.models.moe_llava import CLIP_L_336, TINY_VISION, MoELLaVA, MoELLaVAConfig
from zoo.moe import MoE, MoEConfig, moe_layer_indices
from zoo.moe.layer import ExpertLoRAExperts, Experts
from zoo.moe.settings import LayerSettingsDict
from zoo.moe.upcycle import dense_ffn_spec
from zoo.registry import register_model

__all__ = [
    "UniMoESettings",
    "LoRASettings",
    "AudioSettings",
    "UniMoEConfig",
    "UniMoE",
    "MODEL_SIZES",
    "IMAGE_TOKEN_ID",
    "SPEECH_TOKEN_ID",
    "VIDEO_TOKEN_ID",
    "SOUND_TOKEN_ID",
]

IMAGE_TOKEN_ID, SPEECH_TOKEN_ID, VIDEO_TOKEN_ID, SOUND_TOKEN_ID = -200, -300, -400, -500


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class UniMoESettings(LayerSettingsDict):
    """The MoE layers of the LM.

    Attributes:
        num_experts, top_k: 4 and 2 in v1; 8 and 2 in the 8-expert model.
        layers: "dense" (every layer: the v1 speech model), "sparse" (even layers: the interval / audio models) or
            a list of indices.
        router: "mixtral" (dropless, renormalised top-k, no aux loss) or "deepspeed_top2" (the 8-expert model:
            DeepSpeed top-2 gating, optional capacity, balance loss coefficient ``aux_loss_coef``).
        capacity_factor, eval_capacity_factor, min_capacity: deepspeed_top2 only; None capacity is dropless (the
            released 8e runs with drop_tokens=False).
        aux_loss_coef: balance-loss coefficient (deepspeed_top2 only).
        second_choice_noise: DeepSpeed's Gumbel noise on the second choice in training (top2_2nd_expert_sampling).
        expert_lora_rank: 0: experts are plain FFNs that train fully (stage 2); > 0: every expert keeps its frozen
            FFN and trains its own LoRA of this rank (stage 3).
        expert_lora_alpha, expert_lora_dropout: LoRA scale numerator and input dropout of the expert LoRA.
    """

    num_experts: int = 4
    top_k: int = 2
    layers: str | tuple[int, ...] = "dense"
    router: str = "mixtral"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 0
    aux_loss_coef: float = 0.0
    second_choice_noise: bool = False
    expert_lora_rank: int = 8
    expert_lora_alpha: float = 16.0
    expert_lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.router not in ("mixtral", "deepspeed_top2"):
            raise ValueError(f"uni_moe.router={self.router!r} is unknown; use 'mixtral' or 'deepspeed_top2'")
        if self.router == "mixtral" and (self.capacity_factor is not None or self.aux_loss_coef):
            raise ValueError("uni_moe.router='mixtral' is dropless without an aux loss; capacity_factor and "
                             "aux_loss_coef need router='deepspeed_top2'")
        if self.router == "deepspeed_top2" and self.top_k != 2:
            raise ValueError(f"uni_moe.router='deepspeed_top2' routes to 2 experts, got top_k={self.top_k}")

    def moe_config(self, hidden: int, expert_hidden: int, expert_type: str, activation: str) -> MoEConfig:
        ds = self.router == "deepspeed_top2"
        return MoEConfig(
            hidden_size=hidden, expert_hidden_size=expert_hidden, num_experts=self.num_experts, top_k=self.top_k,
            expert_type=expert_type, activation=activation, normalize_top_k=True,  # type: ignore[arg-type]
            capacity_factor=self.capacity_factor if ds else None,
            eval_capacity_factor=self.eval_capacity_factor if ds else None, min_capacity=self.min_capacity,
            balance_loss="top1" if ds and self.aux_loss_coef else None, balance_loss_coef=self.aux_loss_coef,
            second_choice_noise=ds and self.second_choice_noise,
            lora_rank=self.expert_lora_rank, lora_alpha=self.expert_lora_alpha, lora_shared_base=False,
            lora_dropout=self.expert_lora_dropout if self.expert_lora_rank else 0.0,
        )


@dataclass(frozen=True, kw_only=True)
class LoRASettings:
    """LoRA on the LM's attention projections (stage 3): PEFT's r=8, alpha=16, dropout=0.05 in the paper."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | LoRASettings) -> LoRASettings:
        if isinstance(d, LoRASettings):
            return d
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class AudioSettings:
    """The non-speech audio path: BEATs (``beats``: a ``BEATsConfig`` dict) -> Q-Former (``qformer``: a
    ``QFormerConnectorConfig`` dict). ``seconds`` fixes each item's length (30 s per chunk in Uni-MoE: 2998 fbank
    frames); ``name`` is its media key, ``placeholder`` / ``token_id`` name it in prompts."""

    beats: dict[str, Any] = field(default_factory=dict)
    qformer: dict[str, Any] = field(default_factory=dict)
    seconds: float = 30.0
    name: str = "sound"
    placeholder: str = "<sound>"
    token_id: int = SOUND_TOKEN_ID


@dataclass(frozen=True, kw_only=True)
class UniMoEConfig(MoELLaVAConfig):
    """``MoELLaVAConfig`` (vision, lm, projector, template, tokenizer, image_token_id ...) plus:

    Attributes:
        video: read ``<video>`` items (frames through the image path, mean over time).
        video_frames: frames per video item (8 in Uni-MoE's samples).
        video_pooling: "mean": the paper's mean over frames (a video takes ``num_image_tokens`` positions and frame
            order is lost); "frames": not in the paper: every frame's patch grid average-pooled by
            ``video_frame_pool`` and the frames kept in order (``video_frames * num_image_tokens /
            video_frame_pool**2`` positions), for questions about what happens when.
        video_frame_pool: the spatial pooling factor of ``video_pooling: frames``.
        video_time_code: with ``video_pooling: frames``, the mean norm of a fixed sine-cosine code of the frame index
            added to every token of that frame (``zoo.components.position_code``; 0: off, as in the paper). With
            ``image_pos_code`` each video token then says where and when it is, so one attention head that finds an
            object in two frames reads how it moved.
        speech: a ``WhisperSpeechConfig`` dict, or None for no speech path.
        audio: an ``AudioSettings`` dict, or None for no BEATs path.
        uni_moe: ``UniMoESettings`` dict, or None for the dense model (stages 1 and 2).
        lora: ``LoRASettings`` dict for the attention projections, or None.
        video_token_id, speech_token_id: placeholder ids (official -400 / -300).
    """

    template: str = "vicuna_v1"
    image_token_id: int | None = IMAGE_TOKEN_ID
    pad_to_square: bool = False
    video: bool = True
    video_frames: int = 8
    video_pooling: str = "mean"
    video_frame_pool: int = 2
    video_time_code: float = 0.0
    speech: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    uni_moe: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    video_token_id: int = VIDEO_TOKEN_ID
    speech_token_id: int = SPEECH_TOKEN_ID


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class UniMoE(MoELLaVA):
    """Vision tower + projector (image, video), speech and audio connectors, and a causal LM with MoE layers.

    Submodules beyond ``MoELLaVA``'s: ``speech`` (``WhisperSpeechConnector``), ``audio_encoder`` (``BEATs``) and
    ``audio_connector`` (``QFormerConnector``). Forward inputs by modality: ``pixel_values [N, 3, H, W]``,
    ``video_values [N, F, 3, H, W]``, ``speech_features [N, chunks, 80, 100 * chunk_seconds]``, ``audio_fbank [N, frames, 128]``.
    """

    architecture = "uni_moe"

    def __init__(self, cfg: UniMoEConfig, architecture: str = "uni_moe") -> None:
        if cfg.moe is not None:
            raise ValueError("Uni-MoE describes its MoE layers with `uni_moe`, not `moe` (MoE-LLaVA's settings)")
        super().__init__(cfg, architecture=architecture)
        self.cfg: UniMoEConfig = cfg
        d_lm = self.llm.hidden_size
        if cfg.video_pooling not in ("mean", "frames"):
            raise ValueError(f"video_pooling={cfg.video_pooling!r} is unknown; use 'mean' (the paper) or 'frames'")
        time_code = None
        if cfg.video_time_code:
            if cfg.video_pooling != "frames":
                raise ValueError("video_time_code needs video_pooling: frames (the mean over frames has no time)")
            time_code = grid_position_code((cfg.video_frames,), d_lm, cfg.video_time_code)
        # Rebuilt from the config, not stored: the checkpoint keeps the official key layout.
        self.register_buffer("video_time_code", time_code, persistent=False)
        if cfg.video:
            self.add_modality(Modality(
                name="video", placeholder="<video>", token_id=cfg.video_token_id,
                tokens_per_item=self._video_tokens(), input_key="video_values", prepare=self._video_to_tensor,
                encode=self.encode_videos))
        self.speech: WhisperSpeechConnector | None = None
        if cfg.speech is not None:
            self.speech = WhisperSpeechConnector(WhisperSpeechConfig(**cfg.speech), d_lm)
            self.add_modality(Modality(
                name="audio", placeholder="<audio>", token_id=cfg.speech_token_id,
                tokens_per_item=self.speech.tokens_per_item, input_key="speech_features",
                prepare=self._speech_to_tensor, encode=self.speech))
        self.audio_encoder: BEATs | None = None
        self.audio_connector: QFormerConnector | None = None
        if cfg.audio is not None:
            audio = AudioSettings(**cfg.audio)
            self.audio_encoder = BEATs(BEATsConfig(**audio.beats))
            self.audio_encoder.requires_grad_(False)
            self.audio_connector = QFormerConnector(QFormerConnectorConfig(**audio.qformer), d_lm)
            self.add_modality(Modality(
                name=audio.name, placeholder=audio.placeholder, token_id=audio.token_id,
                tokens_per_item=self.audio_connector.cfg.num_query_tokens, input_key="audio_fbank",
                prepare=self._audio_to_tensor, encode=self.encode_audio))
        if cfg.uni_moe is not None:
            self._build_moe(UniMoESettings.from_dict(cfg.uni_moe))
        self.lora_modules: list[str] = []
        if cfg.lora is not None:
            self._add_attention_lora(LoRASettings.from_dict(cfg.lora))

    # -- building ------------------------------------------------------------------------------------------------
    def _build_moe(self, settings: UniMoESettings, expert_ffns: list[list[nn.Module]] | None = None) -> None:
        """MoE in the chosen layers; expert e of layer i starts from ``expert_ffns[e][i]`` (the stage-2 FFN of
        modality e) or, without them, from a copy of the layer's own FFN."""
        layers = self.llm.layers
        self.moe_layers = moe_layer_indices(len(layers), settings.layers if isinstance(settings.layers, str)
                                            else list(settings.layers))
        for i in self.moe_layers:
            mlp = layers[i].mlp
            if isinstance(mlp, MoE):
                raise ValueError(f"decoder layer {i} already has an MoE layer")
            spec = dense_ffn_spec(mlp, where=f"Uni-MoE layer {i}")
            moe = MoE(settings.moe_config(spec["d"], spec["h"], spec["expert_type"], spec["activation"]),
                      name=f"layers.{i}.mlp")
            ref = next(mlp.parameters())
            moe = moe.to(device=ref.device, dtype=ref.dtype)
            sources = [mlp] * settings.num_experts if expert_ffns is None else [ffns[i] for ffns in expert_ffns]
            if not ref.is_meta:
                _copy_expert_ffns(moe, sources, where=f"Uni-MoE layer {i}")
            layers[i].mlp = moe

    def _add_attention_lora(self, lora: LoRASettings) -> None:
        attn = [layer.self_attn for layer in self.llm.layers]
        self.lora_modules = add_lora(nn.ModuleList(attn), lora.targets, lora.rank, lora.alpha, lora.dropout)
        if not self.lora_modules:
            raise ValueError(f"LoRA targets {list(lora.targets)} match no nn.Linear in the LM's attention modules")

    def enable_moe(self, moe: UniMoESettings | dict[str, Any] | None = None,
                   expert_ffns: list[list[nn.Module]] | None = None) -> list[int]:  # type: ignore[override]
        """Turn the dense model into the MoE model in place (Uni-MoE stage 2 -> 3).

        ``expert_ffns[e]`` is the list of decoder-layer MLPs of the model fine-tuned on modality e (stage 2), so
        experts start specialised; None copies the layer's own FFN into every expert. Updates ``cfg``.
        """
        if self.cfg.uni_moe is not None:
            raise ValueError("model already has MoE layers")
        settings = UniMoESettings.from_dict(moe or {})
        if expert_ffns is not None and len(expert_ffns) != settings.num_experts:
            raise ValueError(f"expert_ffns has {len(expert_ffns)} entries for {settings.num_experts} experts")
        self._build_moe(settings, expert_ffns)
        self.cfg = replace(self.cfg, uni_moe=settings.to_dict())
        return self.moe_layers

    def enable_lora(self, lora: LoRASettings | dict[str, Any] | None = None) -> list[str]:
        """Add LoRA to the attention projections in place (stage 3); updates ``cfg``."""
        if self.cfg.lora is not None:
            raise ValueError("model already has attention LoRA")
        settings = LoRASettings.from_dict(lora or {})
        self._add_attention_lora(settings)
        d = asdict(settings)
        d["targets"] = list(settings.targets)
        self.cfg = replace(self.cfg, lora=d)
        return self.lora_modules

    def merge_lora(self) -> None:
        """Fold attention and expert LoRA into the weights (inference); outputs are unchanged up to rounding."""
        merge_lora(self.llm)
        self.lora_modules = []
        for _, m in self.moe_layer_modules():
            if isinstance(m.experts, ExpertLoRAExperts):
                m.merge_lora()
        moe = self.cfg.uni_moe
        if moe is not None:
            moe = {**moe, "expert_lora_rank": 0, "expert_lora_dropout": 0.0}
        self.cfg = replace(self.cfg, lora=None, uni_moe=moe)

    def moe_layer_modules(self) -> list[tuple[int, MoE]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.llm.layers) if isinstance(layer.mlp, MoE)]

    def num_parameters(self) -> dict[str, int]:
        n = super().num_parameters()
        connectors = sum(p.numel() for m in (self.speech, self.audio_encoder, self.audio_connector) if m is not None
                         for p in m.parameters())
        n["audio"] = connectors
        n["llm_total"] -= connectors
        n["llm_active"] -= connectors
        return n

    # -- encoders ------------------------------------------------------------------------------------------------
    def _video_tokens(self) -> int:
        if self.cfg.video_pooling == "mean":
            return self.num_image_tokens
        side, k = math.isqrt(self.num_image_tokens), self.cfg.video_frame_pool
        if side * side != self.num_image_tokens or side % k:
            raise ValueError(f"video_pooling='frames' needs a square patch grid divisible by video_frame_pool={k}; "
                             f"this tower gives {self.num_image_tokens} patches")
        return self.cfg.video_frames * (side // k) ** 2

    def encode_videos(self, video_values: torch.Tensor) -> torch.Tensor:
        """``[N, F, 3, H, W]`` -> ``[N, tokens, D_lm]``: every frame encoded and projected, then (``mean``, the
        paper: Uni-MoE pools after the projector) the mean over frames, or (``frames``) each frame's patch grid
        average-pooled, frames in order."""
        if video_values.ndim != 5:
            raise ValueError(f"video_values must be [N, frames, 3, H, W], got {tuple(video_values.shape)}")
        N, Fr = video_values.shape[:2]
        per_frame = self.encode_images(video_values.flatten(0, 1))  # [N*F, T, D]
        if self.cfg.video_pooling == "mean":
            return per_frame.view(N, Fr, *per_frame.shape[1:]).mean(dim=1)
        side = math.isqrt(per_frame.shape[1])
        grid = per_frame.transpose(1, 2).reshape(N * Fr, -1, side, side)
        pooled = torch.nn.functional.avg_pool2d(grid, self.cfg.video_frame_pool)  # [N*F, D, s, s]
        tokens = pooled.flatten(2).transpose(1, 2).reshape(N, Fr, -1, per_frame.shape[-1])
        if self.video_time_code is not None:
            tokens = tokens + self.video_time_code.to(tokens.dtype)[:Fr, None, :]
        return tokens.reshape(N, -1, per_frame.shape[-1])

    def encode_audio(self, audio_fbank: torch.Tensor) -> torch.Tensor:
        """BEATs fbank ``[N, frames, 128]`` -> ``[N, num_query_tokens, D_lm]``."""
        assert self.audio_encoder is not None and self.audio_connector is not None
        with torch.no_grad():  # BEATs is frozen in every stage
            feats = self.audio_encoder(audio_fbank.to(self.audio_encoder.post_extract_proj.weight.dtype))
        return self.audio_connector(feats)

    def _video_to_tensor(self, frames: Any) -> torch.Tensor:
        frames = list(frames)
        if len(frames) != self.cfg.video_frames:
            raise ValueError(f"a video item has {len(frames)} frames; this model takes video_frames="
                             f"{self.cfg.video_frames}")
        return torch.stack([self._image_to_tensor(f) for f in frames])

    def _media_per_prompt(self, images: Any, prompts: list[str], media: dict[str, Any]) -> list[dict[str, list[Any]]]:
        """As ``MoELLaVA``'s, except that a video item is itself a list of frames: a per-prompt ``video`` entry that
        is a list of frames (as the eval runner passes one video) is one video; a list of lists is several."""
        if media.get("video") is not None:
            def one_or_many(entry: Any) -> Any:
                if isinstance(entry, list | tuple) and entry and not isinstance(entry[0], list | tuple):
                    return [entry]
                return entry

            media = {**media, "video": [one_or_many(e) for e in media["video"]]}
        return super()._media_per_prompt(images, prompts, media)

    def _speech_to_tensor(self, waveform: Any) -> torch.Tensor:
        assert self.speech is not None
        return whisper_chunks(waveform, self.speech.cfg.max_chunks, self.speech.cfg.chunk_seconds)

    def _audio_to_tensor(self, waveform: Any) -> torch.Tensor:
        seconds = AudioSettings(**(self.cfg.audio or {})).seconds
        w = fixed_length(torch.as_tensor(waveform, dtype=torch.float32), int(seconds * SAMPLE_RATE))
        return beats_fbank(w)

    # -- routing statistics --------------------------------------------------------------------------------------
    @torch.no_grad()
    def routing_by_modality(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                            ) -> dict[str, torch.Tensor]:
        """After a forward on ``input_ids``: per modality ("text" and each declared one), the share of its tokens'
        top-k choices that went to each expert, ``[num_moe_layers, num_experts]`` (rows sum to 1). Padding is
        left out."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        masks = {m.name: (input_ids == m.token_id) & valid for m in self.modalities.values()}
        media = torch.zeros_like(valid)
        for mk in masks.values():
            media |= mk
        masks = {"text": valid & ~media, **masks}
        out: dict[str, torch.Tensor] = {}
        layers = self.moe_layer_modules()
        if not layers:
            raise ValueError("this model has no MoE layers")
        for name, mk in masks.items():
            rows = []
            for _, m in layers:
                stats = m.last_stats
                if stats is None or stats.top_k_indices.shape[0] != input_ids.numel():
                    raise ValueError("routing_by_modality needs the last forward to have run on these input_ids")
                chosen = stats.top_k_indices[mk.reshape(-1)].reshape(-1)
                counts = torch.bincount(chosen, minlength=m.cfg.routed_experts).float()
                rows.append(counts / counts.sum().clamp(min=1))
            out[name] = torch.stack(rows)
        return out


@torch.no_grad()
def _copy_expert_ffns(moe: MoE, ffns: list[nn.Module], where: str) -> None:
    """Write dense FFN ``ffns[e]`` into expert e of ``moe`` (plain experts, or the frozen base of LoRA experts)."""
    ex = moe.experts
    base = ex.base if isinstance(ex, ExpertLoRAExperts) else ex
    if not isinstance(base, Experts):
        raise TypeError(f"{where}: experts of type {type(ex).__name__} cannot take per-expert FFNs")
    h = base.hidden
    for e, ffn in enumerate(ffns):
        w = dense_ffn_spec(ffn, where=f"{where} expert {e}")["weights"]
        if base.expert_type == "swiglu":
            base.gate_up_proj[e, :h].copy_(w["gate"])
            base.gate_up_proj[e, h:].copy_(w["up"])
            base.down_proj[e].copy_(w["down"])
        else:
            base.fc1_weight[e].copy_(w["fc1_w"])
            base.fc1_bias[e].copy_(w["fc1_b"])
            base.fc2_weight[e].copy_(w["fc2_w"])
            base.fc2_bias[e].copy_(w["fc2_b"])


# ----------------------------------------------------------------------------------------------------------------
# Size table
# ----------------------------------------------------------------------------------------------------------------

# LLaMA-architecture 7B (Vicuna-7B-v1.5 shape; the release never names its base: reference B1) and whisper-small.
LLAMA_7B = dict(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
)
WHISPER_SMALL = dict(
    model_type="whisper", vocab_size=51865, num_mel_bins=80, d_model=768, encoder_layers=12, decoder_layers=12,
    encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
    max_source_positions=1500, max_target_positions=448, scale_embedding=False,
)
# Uni-MoE's local Blip2Config for the audio Q-Former (reference 2.5): 12 layers, cross-attention every 2nd.
QFORMER_UNIMOE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    layer_norm_eps=1e-12, cross_attention_frequency=2, encoder_hidden_size=768, max_position_embeddings=512,
    vocab_size=30522,
)

SPEECH_PAPER = dict(whisper=WHISPER_SMALL, num_query_tokens=50, projector="linear", max_chunks=1)
AUDIO_PAPER = dict(beats=BEATsConfig().to_dict(), qformer=dict(qformer=QFORMER_UNIMOE, num_query_tokens=50,
                                                                 projector="linear"))
STAGE3_LORA = dict(rank=8, alpha=16.0, dropout=0.05, targets=["q_proj", "k_proj", "v_proj", "o_proj"])

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "speech_4e": dict(speech=SPEECH_PAPER, uni_moe=UniMoESettings(layers="dense").to_dict()),
    "speech_4e_interval": dict(speech=SPEECH_PAPER, uni_moe=UniMoESettings(layers="sparse").to_dict()),
    "audio_4e": dict(audio=AUDIO_PAPER, uni_moe=UniMoESettings(layers="sparse").to_dict()),
    "speech_8e": dict(speech=SPEECH_PAPER, uni_moe=UniMoESettings(
        num_experts=8, router="deepspeed_top2", aux_loss_coef=0.01, layers="dense").to_dict()),
}

TINY_LM = dict(
    model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=512, rope_theta=300.0,
    tie_word_embeddings=False, initializer_range=0.1,
)
TINY_WHISPER = dict(
    vocab_size=8, num_mel_bins=80, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=400,
    max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
)
# An 8-s window (800 log-Mel frames, max_source_positions 400): the synthetic worlds' clips last at most 7.5 s, and
# padding them to Whisper's 30 s made the encoder attend over ~4x more silence than sound.
# 16 queries: a spoken question of the synthetic world has up to 10 words.
TINY_SPEECH = dict(whisper=TINY_WHISPER, num_query_tokens=16, projector="linear", max_chunks=1, chunk_seconds=8)


# ----------------------------------------------------------------------------------------------------------------
# Registered architectures
# ----------------------------------------------------------------------------------------------------------------


def _build(architecture: str, defaults: dict[str, Any], **model_args: Any) -> UniMoE:
    return UniMoE(UniMoEConfig(**{**defaults, **model_args}), architecture=architecture)


def _full(size: str) -> dict[str, Any]:
    return dict(vision=dict(kind="hf", config=CLIP_L_336), lm=LLAMA_7B, lora=STAGE3_LORA, **MODEL_SIZES[size])


@register_model
def uni_moe_tiny(**model_args: Any) -> UniMoE:
    """Tiny CLIP tower + 4-layer LLaMA-style LM + tiny Whisper speech path, 4 LoRA experts top-2 on every layer,
    over the synthetic world's word-level vocabulary (the CPU recipe)."""
    if "tokenizer" not in model_args:
        from zoo.tokenizers import build_tokenizer, tokenizer_to_json

        model_args["tokenizer"] = {"kind": "word_level", "json": tokenizer_to_json(build_tokenizer())}
    defaults = dict(vision=TINY_VISION, lm=TINY_LM, template="phi", video_frames=4, speech=TINY_SPEECH,
                    uni_moe=UniMoESettings().to_dict(), lora=STAGE3_LORA)
    return _build("uni_moe_tiny", defaults, **model_args)


@register_model
def uni_moe_speech_4e(**model_args: Any) -> UniMoE:
    """Uni-MoE v1 speech: CLIP-L/336 + whisper-small aligner + LLaMA-7B with 4 LoRA experts top-2 on all layers."""
    return _build("uni_moe_speech_4e", _full("speech_4e"), **model_args)


@register_model
def uni_moe_speech_4e_interval(**model_args: Any) -> UniMoE:
    """Uni-MoE v1 speech "interval" / v1.5: as uni_moe_speech_4e with MoE on even layers only."""
    return _build("uni_moe_speech_4e_interval", _full("speech_4e_interval"), **model_args)


@register_model
def uni_moe_audio_4e(**model_args: Any) -> UniMoE:
    """Uni-MoE v1 audio: CLIP-L/336 + BEATs + Q-Former + LLaMA-7B, 4 LoRA experts top-2 on even layers."""
    return _build("uni_moe_audio_4e", {**_full("audio_4e"), "video": True}, **model_args)


@register_model
def uni_moe_speech_8e(**model_args: Any) -> UniMoE:
    """Uni-MoE 8-expert: as uni_moe_speech_4e with 8 LoRA experts and DeepSpeed top-2 gating with balance loss."""
    return _build("uni_moe_speech_8e", _full("speech_8e"), **model_args)


@register_model
def uni_moe_custom(**model_args: Any) -> UniMoE:
    """Any combination given fully by ``model_args`` (what ``zoo convert`` writes for official checkpoints)."""
    return _build("uni_moe_custom", {}, **model_args)
