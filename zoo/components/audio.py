"""Audio encoders and connectors of Uni-MoE: BEATs (non-speech audio), a Whisper encoder with a Whisper-decoder
aligner (speech), and a BLIP-2 Q-Former connector. Facts: ``shared/reference/audio_video_benchmarks.md`` 1-2.

* ``BEATs`` is written from the paper and the released checkpoint's key names, so ``BEATs(cfg).load_state_dict``
  takes the ``model`` entry of ``BEATs_iter3_plus_AS2M.pt`` strictly (``BEATsConfig.from_checkpoint_cfg`` reads its
  ``cfg`` entry). It takes Kaldi fbank features ``[N, frames, 128]`` (normalised as BEATs does) and returns
  ``[N, 8 * (frames // 16), D]`` patch features; the frozen tower has no padding mask (every item of a batch has the
  same length, as the modality contract stacks them).
* ``WhisperSpeechConnector`` holds a frozen transformers ``WhisperEncoder`` and a ``WhisperDecoder`` used as an
  aligner: learnable query tokens are its ``inputs_embeds`` (the decoder adds its learned positions and keeps its
  causal self-attention, as the released code does) and cross-attend to each 30-s chunk's encoder output; a
  projector maps them to the LM width and the chunks of one item are concatenated.
* ``QFormerConnector`` runs transformers' ``Blip2QFormerModel`` over learnable query tokens cross-attending to
  encoder features (no encoder mask, as Uni-MoE), then a projector.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.components.projector import build_projector

__all__ = [
    "BEATsConfig",
    "BEATs",
    "BEATS_FBANK_MEAN",
    "BEATS_FBANK_STD",
    "WhisperSpeechConfig",
    "WhisperSpeechConnector",
    "QFormerConnectorConfig",
    "QFormerConnector",
    "beats_fbank",
    "fixed_length",
    "whisper_chunks",
]

# BEATs normalises its 128-bin Kaldi fbank with these constants, dividing by *twice* the std (reference 1.1).
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582


# ----------------------------------------------------------------------------------------------------------------
# BEATs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BEATsConfig:
    """BEATs sizes with the released ``BEATs_iter3_plus_AS2M`` values as defaults (dropouts are 0 there).

    ``from_checkpoint_cfg`` takes the checkpoint's ``cfg`` dict and ignores the training-only fields it carries
    (layer drop, gradient decay, dropouts, fine-tuning flags); a frozen tower runs in eval mode.
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    conv_pos: int = 128
    conv_pos_groups: int = 16
    num_buckets: int = 320
    max_distance: int = 800
    deep_norm: bool = True
    gru_rel_pos: bool = True
    mel_bins: int = 128

    @classmethod
    def from_checkpoint_cfg(cls, cfg: dict[str, Any]) -> BEATsConfig:
        known = {f.name for f in fields(cls)}
        if cfg.get("layer_norm_first", False):
            raise ValueError("BEATs checkpoint cfg has layer_norm_first=True; only the post-LN (released) variant "
                             "is implemented")
        if not cfg.get("relative_position_embedding", True):
            raise ValueError("BEATs checkpoint cfg has relative_position_embedding=False; not implemented")
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _SamePad(nn.Module):
    """Drop the last frame of an even-kernel 'same' convolution (BEATs' pos_conv)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :-1]


class _WeightNormConv1d(nn.Module):
    """Grouped Conv1d with weight normalisation over dim 2 stored as ``weight_g [1, 1, k]`` / ``weight_v``, the
    key names of the legacy ``torch.nn.utils.weight_norm`` the checkpoint was saved with."""

    def __init__(self, channels: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.padding, self.groups = kernel // 2, groups
        std = math.sqrt(4.0 / (kernel * channels))
        self.weight_v = nn.Parameter(torch.randn(channels, channels // groups, kernel) * std)
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, w, self.bias, padding=self.padding, groups=self.groups)


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bidirectional buckets: half per sign, exact below a quarter of all buckets, log-spaced up to
    ``max_distance``."""
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    dist = relative.abs()
    max_exact = half // 2
    large = max_exact + (
        torch.log(dist.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class _BEATsAttention(nn.Module):
    """Multi-head self-attention with BEATs' gated relative position bias."""

    def __init__(self, cfg: BEATsConfig, relative_attention_bias: nn.Embedding) -> None:
        super().__init__()
        d, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.heads, self.head_dim = h, d // h
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)
        # One table shared by every layer (the module object is shared, so state_dict lists it under each layer).
        self.relative_attention_bias = relative_attention_bias
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, h, 1, 1))

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        """``x [B, L, D]``, ``position_bias [H, L, L]`` (ungated) -> ``[B, L, D]``."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        bias = position_bias.unsqueeze(0)
        if self.gru_rel_pos:
            # Gates from the unscaled queries: sigmoid of groups-of-4 sums of an 8-way projection -> a, b per query.
            g = torch.sigmoid(self.grep_linear(q).view(B, self.heads, L, 2, 4).sum(-1))
            gate_a, gate_b = g[..., :1], g[..., 1:]
            bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
        logits = (q * self.head_dim**-0.5) @ k.transpose(-1, -2) + bias
        attn = logits.float().softmax(dim=-1).to(v.dtype)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(B, L, -1))


class _BEATsLayer(nn.Module):
    """Post-LN transformer layer with DeepNorm residual scaling."""

    def __init__(self, cfg: BEATsConfig, relative_attention_bias: nn.Embedding) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        self.self_attn = _BEATsAttention(cfg, relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.alpha = (2.0 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, position_bias))
        ffn = self.fc2(F.gelu(self.fc1(x).float()).to(x.dtype))  # GELU in fp32, as BEATs computes it
        return self.final_layer_norm(x * self.alpha + ffn)


class _BEATsEncoder(nn.Module):
    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        self.cfg = cfg
        self.pos_conv = nn.Sequential(_WeightNormConv1d(d, cfg.conv_pos, cfg.conv_pos_groups), _SamePad(), nn.GELU())
        self.layer_norm = nn.LayerNorm(d)
        table = nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads)
        self.layers = nn.ModuleList(_BEATsLayer(cfg, table) for _ in range(cfg.encoder_layers))

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        return self.layers[0].self_attn.relative_attention_bias(buckets).permute(2, 0, 1)  # [H, L, L]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.layer_norm(x)
        bias = self.position_bias(x.shape[1], x.device).to(x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return x


class BEATs(nn.Module):
    """The BEATs audio encoder: 16x16 patches of the fbank -> LayerNorm -> projection -> post-LN transformer.

    Parameter names follow the released checkpoint (``patch_embedding``, ``layer_norm``, ``post_extract_proj``,
    ``encoder.pos_conv.0.weight_{g,v}``, ``encoder.layers.N.self_attn.{q,k,v,out}_proj``, ``grep_linear``,
    ``grep_a``, ``relative_attention_bias``, ``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``).
    """

    def __init__(self, cfg: BEATsConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or BEATsConfig()
        self.cfg = cfg
        p = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=False)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
        self.encoder = _BEATsEncoder(cfg)

    @property
    def out_dim(self) -> int:
        return self.cfg.encoder_embed_dim

    def num_tokens(self, frames: int) -> int:
        """Output positions for ``frames`` fbank frames: (frames // p) * (mel_bins // p), time-major."""
        p = self.cfg.input_patch_size
        return (frames // p) * (self.cfg.mel_bins // p)

    def forward(self, fbank: Tensor) -> Tensor:
        """Normalised fbank ``[N, frames, mel_bins]`` -> features ``[N, num_tokens(frames), D]``."""
        if fbank.ndim != 3 or fbank.shape[-1] != self.cfg.mel_bins:
            raise ValueError(f"BEATs takes fbank [N, frames, {self.cfg.mel_bins}], got {tuple(fbank.shape)}")
        x = self.patch_embedding(fbank.unsqueeze(1))  # [N, C, frames/p, mel/p]
        x = x.flatten(2).transpose(1, 2)  # index t * (mel/p) + f
        x = self.post_extract_proj(self.layer_norm(x))
        return self.encoder(x)


# ----------------------------------------------------------------------------------------------------------------
# Whisper encoder + Whisper-decoder aligner (speech)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WhisperSpeechConfig:
    """Speech path settings.

    Attributes:
        whisper: a transformers ``WhisperConfig`` dict (encoder and decoder sizes; whisper-small in the paper).
        num_query_tokens: learnable queries per 30-s chunk (50 in Uni-MoE).
        projector: projector type from the aligner width to the LM width (``linear`` in the released scripts).
        max_chunks: chunks per item; an item is ``[max_chunks, 80, 100 * chunk_seconds]`` log-Mel, so it always
            takes ``max_chunks * num_query_tokens`` LM positions (the modality contract keeps tokens per item fixed).
        chunk_seconds: the encoder's window: 30 s in Whisper (3000 log-Mel frames, ``max_source_positions`` 1500).
            A smaller encoder may take a shorter window (``whisper.max_source_positions`` = 50 * chunk_seconds),
            so clips of a few seconds are not padded to 30 s of silence that the encoder then attends over.
    """

    whisper: dict[str, Any]
    num_query_tokens: int = 50
    projector: str = "linear"
    max_chunks: int = 1
    chunk_seconds: int = 30


def _whisper_config(d: dict[str, Any]) -> Any:
    from transformers import WhisperConfig

    return WhisperConfig(**{k: v for k, v in d.items() if k != "model_type"})


class WhisperSpeechConnector(nn.Module):
    """Frozen Whisper encoder -> Whisper-decoder aligner over learnable queries -> projector.

    Submodules (named so the official keys map one-to-one): ``encoder`` (transformers ``WhisperEncoder``),
    ``decoder`` (``WhisperDecoder``), ``query_tokens [1, Q, d]``, ``projector``.
    """

    def __init__(self, cfg: WhisperSpeechConfig, lm_hidden_size: int) -> None:
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

        self.cfg = cfg
        wcfg = _whisper_config(cfg.whisper)
        self.encoder = WhisperEncoder(wcfg)
        self.encoder.requires_grad_(False)
        self.decoder = WhisperDecoder(wcfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, wcfg.d_model))
        self.projector = build_projector(cfg.projector, wcfg.d_model, lm_hidden_size)
        self.num_mel_bins = wcfg.num_mel_bins
        # Whisper's two convolutions halve 100 frames/s: the encoder accepts exactly 2 * max_source_positions frames.
        self.frames = 2 * wcfg.max_source_positions
        if self.frames != WHISPER_FRAMES_PER_SECOND * cfg.chunk_seconds:
            raise ValueError(f"speech.chunk_seconds={cfg.chunk_seconds} is {WHISPER_FRAMES_PER_SECOND * cfg.chunk_seconds}"
                             f" log-Mel frames but whisper.max_source_positions={wcfg.max_source_positions} takes "
                             f"{self.frames}; set max_source_positions = {WHISPER_FRAMES_PER_SECOND // 2} * chunk_seconds")

    @property
    def tokens_per_item(self) -> int:
        return self.cfg.max_chunks * self.cfg.num_query_tokens

    def align(self, encoded: Tensor) -> Tensor:
        """Encoder output ``[N, S, d]`` -> aligned queries ``[N, Q, d]`` (before the projector)."""
        queries = self.query_tokens.expand(encoded.shape[0], -1, -1).to(encoded.dtype)
        return self.decoder(inputs_embeds=queries, encoder_hidden_states=encoded, use_cache=False).last_hidden_state

    def forward(self, features: Tensor) -> Tensor:
        """Log-Mel ``[N, 80, T]`` (one chunk per item) or ``[N, C, 80, T]`` -> ``[N, C * Q, D_lm]``
        (``T = 100 * chunk_seconds``: 3000 for Whisper's 30-s window)."""
        if features.ndim == 3:
            features = features.unsqueeze(1)
        if features.ndim != 4 or features.shape[-2:] != (self.num_mel_bins, self.frames):
            raise ValueError(f"speech input must be log-Mel [N, chunks, {self.num_mel_bins}, {self.frames}], got "
                             f"{tuple(features.shape)}")
        N, C = features.shape[:2]
        if C != self.cfg.max_chunks:
            raise ValueError(f"speech input has {C} {self.cfg.chunk_seconds}-s chunks per item; this model takes max_chunks="
                             f"{self.cfg.max_chunks} (pad or cut items to that many chunks)")
        flat = features.reshape(N * C, self.num_mel_bins, self.frames)
        enc_dtype = self.encoder.conv1.weight.dtype
        # Frozen in every stage of the paper (its Whisper is pretrained); a recipe whose small encoder starts random
        # may train it by making its parameters trainable (the tiny recipe's stage 1), and then it gets gradients.
        train_encoder = any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_encoder):
            encoded = self.encoder(flat.to(enc_dtype)).last_hidden_state
        aligned = self.align(encoded.to(self.query_tokens.dtype))
        out = self.projector(aligned)  # [N*C, Q, D_lm]
        return out.reshape(N, C * out.shape[1], out.shape[2])  # chunks of one item concatenated in order


# ----------------------------------------------------------------------------------------------------------------
# Q-Former connector (non-speech audio)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QFormerConnectorConfig:
    """Q-Former connector settings; ``qformer`` is a transformers ``Blip2QFormerConfig`` dict whose
    ``encoder_hidden_size`` must equal the audio encoder's width (Uni-MoE: 12 layers, 12 heads, 768 wide, cross
    attention every 2nd layer)."""

    qformer: dict[str, Any]
    num_query_tokens: int = 50
    projector: str = "linear"


class QFormerConnector(nn.Module):
    """Learnable queries -> ``Blip2QFormerModel`` cross-attending to encoder features -> projector."""

    def __init__(self, cfg: QFormerConnectorConfig, lm_hidden_size: int) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        self.cfg = cfg
        qcfg = Blip2QFormerConfig(**{k: v for k, v in cfg.qformer.items() if k != "model_type"})
        self.qformer = Blip2QFormerModel(qcfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, qcfg.hidden_size))
        self.projector = build_projector(cfg.projector, qcfg.hidden_size, lm_hidden_size)
        self.encoder_hidden_size = qcfg.encoder_hidden_size

    def forward(self, encoded: Tensor) -> Tensor:
        """Encoder features ``[N, S, encoder_hidden_size]`` -> ``[N, Q, D_lm]``."""
        if encoded.shape[-1] != self.encoder_hidden_size:
            raise ValueError(f"Q-Former expects encoder features of width {self.encoder_hidden_size}, got "
                             f"{encoded.shape[-1]}")
        queries = self.query_tokens.expand(encoded.shape[0], -1, -1)
        mask = torch.ones(encoded.shape[:2], dtype=torch.long, device=encoded.device)  # all-ones, as Uni-MoE
        out = self.qformer(query_embeds=queries, encoder_hidden_states=encoded.to(queries.dtype),
                           encoder_attention_mask=mask).last_hidden_state
        return self.projector(out)


# ----------------------------------------------------------------------------------------------------------------
# Front ends (one raw waveform -> the tensor a modality stacks)
# ----------------------------------------------------------------------------------------------------------------

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 30 * SAMPLE_RATE
WHISPER_FRAMES_PER_SECOND = 100  # log-Mel hop of 160 samples at 16 kHz


def _kaldi_mel_banks(num_bins: int, n_fft: int, sample_rate: int, low: float = 20.0) -> Tensor:
    """Kaldi's triangular mel filters ``[num_bins, n_fft // 2 + 1]`` (mel = 1127 ln(1 + f / 700); Nyquist column 0)."""

    def mel(f: Tensor | float) -> Tensor:
        return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)

    high = sample_rate / 2
    mel_low, mel_high = mel(low), mel(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    freqs = mel(torch.arange(n_fft // 2, dtype=torch.float64) * (sample_rate / n_fft))
    b = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    up = (freqs - left) / (center - left)
    down = (right - freqs) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1)).float()


def beats_fbank(waveform: Tensor, num_mel_bins: int = 128) -> Tensor:
    """BEATs' input: Kaldi fbank (25 ms / 10 ms, povey window, pre-emphasis 0.97, no dither, snip edges) of the
    16 kHz waveform scaled to int16 range, normalised as BEATs does. ``[samples]`` -> ``[frames, num_mel_bins]``."""
    x = waveform.double().flatten() * 32768.0
    win, hop, n_fft = 400, 160, 512
    if x.numel() < win:
        raise ValueError(f"BEATs fbank needs at least {win} samples, got {x.numel()}")
    frames = x.unfold(0, win, hop)  # [T, 400]
    frames = frames - frames.mean(dim=1, keepdim=True)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * prev
    frames = frames * torch.hann_window(win, periodic=False, dtype=torch.float64).pow(0.85)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)  # [T, 257]
    mel = power @ _kaldi_mel_banks(num_mel_bins, n_fft, SAMPLE_RATE).double().t()
    fbank = torch.log(mel.clamp(min=torch.finfo(torch.float32).eps)).float()
    return (fbank - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)


def fixed_length(waveform: Tensor, samples: int) -> Tensor:
    """Cut to ``samples``, or pad by repeating the last sample (Uni-MoE's audio loader pads that way)."""
    w = waveform.flatten().float()
    if w.numel() >= samples:
        return w[:samples]
    if w.numel() == 0:
        return torch.zeros(samples)
    return torch.cat([w, w[-1:].expand(samples - w.numel())])


_WHISPER_EXTRACTORS: dict[int, Any] = {}


def whisper_chunks(waveform: Any, max_chunks: int, chunk_seconds: int = 30) -> Tensor:
    """Log-Mel ``[max_chunks, 80, 100 * chunk_seconds]`` of a 16 kHz waveform cut into ``chunk_seconds`` chunks
    (transformers' WhisperFeatureExtractor with that ``chunk_length``, built from its defaults: nothing is
    downloaded; 30 s is Whisper's own window). A clip longer than ``max_chunks`` chunks is an error; a shorter one
    is followed by silent chunks so every item takes the same positions."""
    import numpy as np
    from transformers import WhisperFeatureExtractor

    if chunk_seconds not in _WHISPER_EXTRACTORS:
        _WHISPER_EXTRACTORS[chunk_seconds] = WhisperFeatureExtractor(
            feature_size=80, sampling_rate=SAMPLE_RATE, chunk_length=chunk_seconds)
    chunk = chunk_seconds * SAMPLE_RATE
    w = np.asarray(waveform, dtype=np.float32).reshape(-1)
    n = max(1, -(-w.size // chunk))
    if n > max_chunks:
        raise ValueError(f"speech clip of {w.size / SAMPLE_RATE:.1f} s needs {n} {chunk_seconds}-s chunks; the model "
                         f"takes max_chunks={max_chunks}")
    chunks = [w[i * chunk:(i + 1) * chunk] for i in range(n)]
    chunks += [np.zeros(SAMPLE_RATE, dtype=np.float32)] * (max_chunks - n)
    feats = _WHISPER_EXTRACTORS[chunk_seconds](chunks, sampling_rate=SAMPLE_RATE, return_tensors="np",
                                               padding="max_length")
    return torch.from_numpy(feats["input_features"])
