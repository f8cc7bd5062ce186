"""Seeded non-speech audio of the shapes world: every (colour, shape) has a sound; a clip plays a scene's sounds.

Every clip is a pure function of ``(AudioConfig, split, index)`` (numpy only), 16 kHz mono float32 in [-1, 1].

Sound signatures, built from simple signals so that each part is audible and learnable:

* **shape -> waveform, envelope and rhythm**: circle = one smooth sine note; square = two short square-wave beats;
  triangle = three plucked triangle-wave beats (fast decay); star = a sawtooth with vibrato; cross = four clicks of
  a narrow pulse wave; diamond = a sine with a frequency sweep up.
* **colour -> pitch**: red 220 Hz, green 277, blue 349, yellow 440, purple 554, cyan 698, orange 880, white 1109
  (four semitones apart).

A clip plays the sounds of its objects one after another in a seeded order (``sound_seconds`` each, ``gap_seconds``
of silence between them), then adds white noise at ``snr_db`` relative to the mixed signal's power. Shapes are
distinct within a clip, so a shape word names one sound.

Questions (single-word answers):
  order   "Does the red circle sound come before or after the blue square?" -> before / after
  first   "Which shape makes the first sound?" -> a shape (clips of two or more sounds)
  exist   "Is there a green star sound?" -> yes / no (half each; a "no" names a pair absent from the clip)
  count   "How many sounds are there?" -> a digit

Features: :func:`whisper_features` runs transformers' ``WhisperFeatureExtractor`` (80 log-Mel bins, 25 ms / 10 ms),
the front end of Whisper encoders (Uni-MoE's speech tower); this module never builds a filterbank itself.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from data.seeding import mix_seed
from data.shapes import COLORS, QA, SHAPES, SPLITS

__all__ = [
    "SAMPLE_RATE",
    "AudioConfig",
    "AudioWorld",
    "AudioClip",
    "SoundEvent",
    "AUDIO_QA_KINDS",
    "COLOR_PITCH_HZ",
    "render_sound",
    "whisper_features",
    "pooled_features",
]

SAMPLE_RATE = 16_000
AUDIO_QA_KINDS: tuple[str, ...] = ("order", "first", "exist", "count")
COLOR_PITCH_HZ: dict[str, float] = {
    name: 220.0 * 2 ** (4 * k / 12)
    for k, name in enumerate(("red", "green", "blue", "yellow", "purple", "cyan", "orange", "white"))
}


@dataclass(frozen=True, kw_only=True, slots=True)
class AudioConfig:
    """What the clips sound like. Every field takes part in the clip's seed."""

    seed: int = 0
    min_sounds: int = 1
    max_sounds: int = 3
    sound_seconds: float = 0.5
    gap_seconds: float = 0.15
    snr_db: float = 10.0  # signal-to-noise ratio of the added white noise
    pitch_jitter: float = 0.02  # relative random detune per sound (so no two clips are bit-identical copies)
    colors: tuple[str, ...] = COLORS
    shapes: tuple[str, ...] = SHAPES

    def __post_init__(self) -> None:
        for name in ("colors", "shapes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [c for c in self.colors if c not in COLOR_PITCH_HZ]
        if unknown:
            raise ValueError(f"AudioConfig.colors has unknown colours {unknown}; known: {sorted(COLOR_PITCH_HZ)}")
        unknown = [s for s in self.shapes if s not in _SIGNATURES]
        if unknown:
            raise ValueError(f"AudioConfig.shapes has unknown shapes {unknown}; known: {sorted(_SIGNATURES)}")
        if not 1 <= self.min_sounds <= self.max_sounds <= len(self.shapes):
            raise ValueError(
                f"AudioConfig needs 1 <= min_sounds <= max_sounds <= number of shapes, got {self.min_sounds}, "
                f"{self.max_sounds}"
            )
        if not 0.1 <= self.sound_seconds <= 5.0:
            raise ValueError(f"AudioConfig.sound_seconds must be in 0.1..5, got {self.sound_seconds}")
        if self.gap_seconds < 0:
            raise ValueError(f"AudioConfig.gap_seconds must be >= 0, got {self.gap_seconds}")


@dataclass(frozen=True, slots=True)
class SoundEvent:
    color: str
    shape: str
    start: float  # seconds
    end: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(eq=False, slots=True)
class AudioClip:
    id: str
    split: str
    index: int
    waveform: np.ndarray  # float32, (samples,), 16 kHz mono
    events: list[SoundEvent]
    caption: str
    qa: list[QA]
    sample_rate: int = SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return len(self.waveform) / self.sample_rate

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "split": self.split,
            "index": self.index,
            "sample_rate": self.sample_rate,
            "seconds": round(self.seconds, 4),
            "caption": self.caption,
            "events": [{"color": e.color, "shape": e.shape, "start": e.start, "end": e.end} for e in self.events],
            "qa": [{"question": q.question, "answer": q.answer, "kind": q.kind} for q in self.qa],
        }


# ---------------------------------------------------------------------------------------------------- signals


def _wave(kind: str, phase: np.ndarray) -> np.ndarray:
    """A periodic waveform of unit amplitude; ``phase`` is in cycles."""
    frac = phase % 1.0
    if kind == "sine":
        return np.sin(2 * np.pi * phase)
    if kind == "square":
        return np.where(frac < 0.5, 1.0, -1.0)
    if kind == "triangle":
        return 4.0 * np.abs(frac - 0.5) - 1.0
    if kind == "sawtooth":
        return 2.0 * frac - 1.0
    if kind == "pulse":
        return np.where(frac < 0.12, 1.0, -0.14)
    raise ValueError(f"unknown waveform {kind!r}")


@dataclass(frozen=True, slots=True)
class _Signature:
    waveform: str
    beats: int  # notes per sound (the rhythm)
    duty: float  # share of each beat that sounds
    attack: float  # seconds
    decay: float  # exponential decay time constant in seconds (inf = sustained)
    vibrato: float = 0.0  # relative depth of a 6 Hz vibrato
    sweep: float = 0.0  # relative rise of the frequency over one note


_SIGNATURES: dict[str, _Signature] = {
    "circle": _Signature("sine", beats=1, duty=0.95, attack=0.06, decay=math.inf),
    "square": _Signature("square", beats=2, duty=0.6, attack=0.005, decay=math.inf),
    "triangle": _Signature("triangle", beats=3, duty=0.9, attack=0.002, decay=0.04),
    "star": _Signature("sawtooth", beats=1, duty=0.95, attack=0.02, decay=math.inf, vibrato=0.03),
    "cross": _Signature("pulse", beats=4, duty=0.35, attack=0.002, decay=0.03),
    "diamond": _Signature("sine", beats=1, duty=0.95, attack=0.02, decay=math.inf, sweep=0.5),
}


def render_sound(color: str, shape: str, seconds: float, detune: float = 0.0, sample_rate: int = SAMPLE_RATE
                 ) -> np.ndarray:  # fmt: skip
    """The clean sound of one (colour, shape), float64 with peak amplitude 1."""
    if color not in COLOR_PITCH_HZ or shape not in _SIGNATURES:
        raise ValueError(f"no sound for {color!r} {shape!r}; colours {sorted(COLOR_PITCH_HZ)}, shapes "
                         f"{sorted(_SIGNATURES)}")  # fmt: skip
    sig = _SIGNATURES[shape]
    f0 = COLOR_PITCH_HZ[color] * (1.0 + detune)
    n = int(round(seconds * sample_rate))
    out = np.zeros(n)
    beat = n // sig.beats
    on = int(beat * sig.duty)
    t = np.arange(on) / sample_rate
    freq = f0 * (1.0 + sig.vibrato * np.sin(2 * np.pi * 6.0 * t) + sig.sweep * t / max(t[-1], 1e-9))
    phase = np.cumsum(freq) / sample_rate
    envelope = np.minimum(1.0, t / sig.attack) * (np.exp(-t / sig.decay) if math.isfinite(sig.decay) else 1.0)
    release = min(on, int(0.01 * sample_rate))  # 10 ms fade-out so notes never click at their end
    envelope[on - release:] *= np.linspace(1.0, 0.0, release)
    note = _wave(sig.waveform, phase) * envelope
    for b in range(sig.beats):
        out[b * beat: b * beat + on] = note
    return out / max(np.abs(out).max(), 1e-9)


# ---------------------------------------------------------------------------------------------------- the world


def _config_hash(config: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(config).encode()).digest()[:8], "little")


class AudioWorld:
    def __init__(self, config: AudioConfig | None = None, **overrides: Any) -> None:
        if config is not None and overrides:
            raise ValueError("pass either an AudioConfig or keyword overrides, not both")
        self.config = config if config is not None else AudioConfig(**overrides)
        self._seed = _config_hash(self.config)

    @property
    def class_names(self) -> list[str]:
        return [f"{c} {s}" for c in self.config.colors for s in self.config.shapes]

    def clip(self, index: int, split: str = "train") -> AudioClip:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        cfg = self.config
        rng = np.random.default_rng(mix_seed(self._seed, SPLITS.index(split), index))
        n = int(rng.integers(cfg.min_sounds, cfg.max_sounds + 1))
        shapes = [str(x) for x in rng.choice(cfg.shapes, size=n, replace=False)]
        colors = [str(x) for x in rng.choice(cfg.colors, size=n)]
        sound_n, gap_n = int(round(cfg.sound_seconds * SAMPLE_RATE)), int(round(cfg.gap_seconds * SAMPLE_RATE))
        lead = gap_n // 2
        signal = np.zeros(lead + n * sound_n + (n - 1) * gap_n + lead)
        events = []
        for k, (color, shape) in enumerate(zip(colors, shapes)):
            start = lead + k * (sound_n + gap_n)
            gain = rng.uniform(0.5, 0.9)
            detune = rng.uniform(-cfg.pitch_jitter, cfg.pitch_jitter)
            signal[start: start + sound_n] = gain * render_sound(color, shape, cfg.sound_seconds, detune)
            events.append(SoundEvent(color, shape, start / SAMPLE_RATE, (start + sound_n) / SAMPLE_RATE))
        power = float(np.mean(signal**2))
        noise = rng.standard_normal(len(signal)) * math.sqrt(power / 10 ** (cfg.snr_db / 10))
        wave = signal + noise
        wave = (wave / max(1.0, np.abs(wave).max() / 0.99)).astype(np.float32)
        return AudioClip(
            id=f"audio_{split}_{index:06d}", split=split, index=index, waveform=wave, events=events,
            caption=_caption(events), qa=self._questions(rng, events),
        )  # fmt: skip

    def clips(self, split: str, n: int, start: int = 0) -> list[AudioClip]:
        return list(self.iter_clips(split, n, start))

    def iter_clips(self, split: str, n: int | None = None, start: int = 0) -> Iterator[AudioClip]:
        index = start
        while n is None or index < start + n:
            yield self.clip(index, split)
            index += 1

    def _questions(self, rng: np.random.Generator, events: Sequence[SoundEvent]) -> list[QA]:
        qa = []
        if len(events) >= 2:
            i, j = sorted(int(x) for x in rng.choice(len(events), size=2, replace=False))
            # The answer is a word the question does not contain, so the question text alone gives no hint.
            a, b = (events[i], events[j]) if rng.random() < 0.5 else (events[j], events[i])
            answer = "before" if a.start < b.start else "after"
            qa.append(QA(f"Does the {a.name} sound come before or after the {b.name}?", answer, "order"))
            qa.append(QA("Which shape makes the first sound?", events[0].shape, "first"))
        present = {e.name for e in events}
        if rng.random() < 0.5:
            name = str(rng.choice(sorted(present)))
            qa.append(QA(f"Is there a {name} sound?", "yes", "exist"))
        else:
            absent = [c for c in self.class_names if c not in present]
            qa.append(QA(f"Is there a {rng.choice(absent)} sound?", "no", "exist"))
        qa.append(QA("How many sounds are there?", str(len(events)), "count"))
        return qa


def _caption(events: Sequence[SoundEvent]) -> str:
    names = [f"a {e.name}" for e in events]
    return ("the sound of " + ", then ".join(names) + ".") if names else "silence."


# ---------------------------------------------------------------------------------------------------- features


def whisper_features(waveforms: Sequence[np.ndarray], pad_to_30s: bool = True) -> np.ndarray:
    """Whisper log-Mel features ``[N, 80, frames]`` of 16 kHz waveforms via transformers' WhisperFeatureExtractor.

    ``pad_to_30s=True`` is what a Whisper encoder expects (3000 frames per 30-s chunk; longer input is truncated);
    ``False`` pads only to the longest clip of the call, which is what a probe of short clips wants.
    """
    from transformers import WhisperFeatureExtractor

    extractor = _whisper_extractor(WhisperFeatureExtractor)
    out = extractor(
        [np.asarray(w, dtype=np.float32) for w in waveforms], sampling_rate=SAMPLE_RATE, return_tensors="np",
        padding="max_length" if pad_to_30s else "longest",
    )  # fmt: skip
    return out["input_features"]


_EXTRACTOR: list[Any] = []


def _whisper_extractor(cls: type) -> Any:
    # Built from its defaults (80 bins, 16 kHz, n_fft 400, hop 160): nothing is downloaded. Cached: it builds a mel
    # matrix on construction.
    if not _EXTRACTOR:
        _EXTRACTOR.append(cls(feature_size=80, sampling_rate=SAMPLE_RATE))
    return _EXTRACTOR[0]


def pooled_features(waveforms: Sequence[np.ndarray]) -> np.ndarray:
    """A fixed-size vector per clip: mean and standard deviation over time of each Whisper log-Mel bin ``[N, 160]``.

    Clips are featurised in groups of equal length (one extractor call per group, which is ten times faster than
    one call per clip), so no padding added for batching ever enters a clip's statistics.
    """
    out = np.zeros((len(waveforms), 160), dtype=np.float32)
    by_length: dict[int, list[int]] = {}
    for i, w in enumerate(waveforms):
        by_length.setdefault(len(w), []).append(i)
    for indices in by_length.values():
        feats = whisper_features([waveforms[i] for i in indices], pad_to_30s=False)  # [n, 80, frames]
        out[indices] = np.concatenate([feats.mean(axis=2), feats.std(axis=2)], axis=1)
    return out
