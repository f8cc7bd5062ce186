"""Pictures of media for a person: a video as an animated GIF or a strip of frames, an audio clip as a spectrogram.

    write_gif(frames, "clip.gif", fps=4)            # frames: PIL images of one size
    write_strip(frames, "clip.png", scale=2)         # frames side by side, frame numbers underneath
    write_spectrogram(waveform, "clip.png")         # waveform + the Whisper log-Mel features a model sees

The spectrogram is the 80-bin log-Mel of transformers' ``WhisperFeatureExtractor`` (``data.audio.whisper_features``),
drawn with matplotlib, so what is shown is what an audio model is given. Files are written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.audio import SAMPLE_RATE, whisper_features

__all__ = ["write_gif", "write_strip", "write_spectrogram"]


def _atomic(path: Path, payload: bytes) -> Path:
    from zoo.registry import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))
    return path


def _check_frames(frames: Sequence[Image.Image]) -> list[Image.Image]:
    frames = [f.convert("RGB") for f in frames]
    if not frames:
        raise ValueError("no frames to show")
    if len({f.size for f in frames}) != 1:
        raise ValueError(f"frames differ in size: {sorted({f.size for f in frames})}")
    return frames


def write_gif(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float = 4.0, scale: int = 2) -> Path:
    """An endlessly looping GIF, each frame enlarged ``scale`` times (nearest neighbour keeps the pixels sharp)."""
    frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in _check_frames(frames)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return _atomic(Path(path), buf.getvalue())


def write_strip(frames: Sequence[Image.Image], path: str | os.PathLike, scale: int = 2) -> Path:
    """Frames side by side with a 2-px gap, each with its index underneath, as a PNG."""
    frames = _check_frames(frames)
    w, h = frames[0].width * scale, frames[0].height * scale
    gap, label = 2, 12
    sheet = Image.new("RGB", (len(frames) * (w + gap) - gap, h + label), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for t, frame in enumerate(frames):
        x = t * (w + gap)
        sheet.paste(frame.resize((w, h), Image.NEAREST), (x, 0))
        draw.text((x + 2, h), str(t), fill=(0, 0, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return _atomic(Path(path), buf.getvalue())


def write_spectrogram(waveform: np.ndarray, path: str | os.PathLike, title: str = "") -> Path:
    """The waveform above its Whisper log-Mel spectrogram (80 bins, 10 ms frames), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim != 1 or not len(wave):
        raise ValueError(f"expected a non-empty mono waveform, got shape {wave.shape}")
    mel = whisper_features([wave], pad_to_30s=False)[0]
    seconds = len(wave) / SAMPLE_RATE
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    top.plot(np.arange(len(wave)) / SAMPLE_RATE, wave, linewidth=0.4)
    top.set_ylabel("amplitude")
    if title:
        top.set_title(title, fontsize=9)
    image = bottom.imshow(mel, origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[0]), cmap="magma")
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("Whisper log-Mel bin")
    fig.colorbar(image, ax=[top, bottom], shrink=0.6, label="scaled log power")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return _atomic(Path(path), buf.getvalue())
