"""Spoken questions and instructions in a real (espeak-ng) voice, assembled from shipped word clips.

``data/assets/speech/words/<word>.wav`` holds one 16 kHz 16-bit mono clip per word of ``words.txt``, rendered once
by ``data/assets/speech/render_words.py`` (the exact espeak-ng command and voice are in its docstring and in
``manifest.txt``). A sentence is its words' clips joined with short pauses, so nothing needs espeak-ng at run time
and the same text always gives the same samples.

    from data.speech import speak, SPOKEN_INSTRUCTIONS
    wave = speak("What color is the large circle?")   # float32, 16 kHz mono
    speak("How many circles?", pause_seconds=0.1)

Digits are read as words ("3" -> "three"); punctuation is dropped; a word outside the list raises
:class:`UnknownWordError` naming it (add it to ``words.txt`` and re-render).
"""

from __future__ import annotations

import re
import wave
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from data.audio import SAMPLE_RATE

__all__ = ["speak", "words", "UnknownWordError", "read_wav", "write_wav", "SPOKEN_INSTRUCTIONS", "WORDS_DIR"]

WORDS_DIR = Path(__file__).parent / "assets" / "speech" / "words"
_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Instructions a user might say instead of type, with the task they ask for.
SPOKEN_INSTRUCTIONS: dict[str, str] = {
    "Describe the image briefly.": "caption",
    "What do you see in the picture?": "caption",
    "Describe what happens in the video.": "video_caption",
    "Listen and answer the question with a single word.": "answer",
}


class UnknownWordError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def read_wav(path: str | Path | BinaryIO, expect_rate: int | None = SAMPLE_RATE) -> np.ndarray:
    """A 16-bit PCM WAV file (a path or an open binary file) as float32 in [-1, 1] (channels averaged to mono).

    Raises ValueError naming the file when it is not a readable PCM WAV or its sample rate is not ``expect_rate``.
    """
    if isinstance(path, str | Path):
        path = Path(path)
        source: Any = str(path)
    else:
        source, path = path, "<in-memory WAV>"
    try:
        with wave.open(source, "rb") as f:
            rate, channels, width, n = f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()
            raw = f.readframes(n)
    except (wave.Error, EOFError) as err:
        raise ValueError(f"{path}: not a readable PCM WAV file ({err})") from err
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples; expected 16-bit PCM")
    if expect_rate is not None and rate != expect_rate:
        raise ValueError(f"{path}: sample rate {rate} Hz; expected {expect_rate} Hz (resample it first)")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if len(x) != n * channels:
        raise ValueError(f"{path}: truncated ({len(x)} samples, header says {n * channels})")
    return x.reshape(n, channels).mean(axis=1) if channels > 1 else x


def write_wav(path: str | Path | None, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit mono PCM WAV bytes of a float waveform in [-1, 1]; written to ``path`` unless it is None."""
    import io

    pcm = np.clip(np.rint(np.asarray(waveform, dtype=np.float64) * 32767), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    payload = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(payload)
    return payload


@lru_cache(maxsize=1)
def words() -> dict[str, np.ndarray]:
    """Every shipped word clip by word."""
    if not WORDS_DIR.is_dir():
        raise FileNotFoundError(f"{WORDS_DIR}: the shipped speech clips are missing (reinstall mmzoo)")
    return {p.stem: read_wav(p) for p in sorted(WORDS_DIR.glob("*.wav"))}


def _tokens(text: str) -> list[str]:
    out = []
    for token in re.findall(r"[a-z0-9]+", text.lower()):
        out += [_DIGITS[int(d)] for d in token] if token.isdigit() else [token]
    return out


def speak(text: str, pause_seconds: float = 0.08, edge_seconds: float = 0.1) -> np.ndarray:
    """``text`` read aloud: word clips joined by ``pause_seconds`` of silence, ``edge_seconds`` at both ends."""
    clips = words()
    tokens = _tokens(text)
    if not tokens:
        raise ValueError(f"nothing to say in {text!r}")
    missing = sorted({t for t in tokens if t not in clips})
    if missing:
        raise UnknownWordError(
            f"cannot speak {text!r}: no clip for {missing}; add them to data/assets/speech/words.txt and run "
            "data/assets/speech/render_words.py"
        )
    pause = np.zeros(int(round(pause_seconds * SAMPLE_RATE)), dtype=np.float32)
    edge = np.zeros(int(round(edge_seconds * SAMPLE_RATE)), dtype=np.float32)
    parts = [edge]
    for k, token in enumerate(tokens):
        parts += ([pause] if k else []) + [clips[token]]
    return np.concatenate([*parts, edge])
