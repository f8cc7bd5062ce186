"""Render the shipped word clips with espeak-ng (run once by a maintainer; nothing needs espeak-ng at run time).

    apt-get install -y espeak-ng          # Debian 12: eSpeak NG 1.51
    python data/assets/speech/render_words.py

For each word of ``words.txt`` it runs exactly::

    espeak-ng -v en-us -s 150 -p 50 -a 100 -w <tmp>.wav <word>

(voice ``en-us``, 150 words per minute, pitch 50, amplitude 100; espeak-ng writes 22050 Hz 16-bit mono), trims the
leading and trailing silence (samples below 1% of full scale), resamples 22050 -> 16000 Hz with scipy's polyphase
filter (``resample_poly(x, 320, 441)``), and writes ``words/<word>.wav`` as 16 kHz 16-bit mono PCM.
``manifest.txt`` records the espeak-ng version and the command.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

HERE = Path(__file__).resolve().parent
VOICE_ARGS = ["-v", "en-us", "-s", "150", "-p", "50", "-a", "100"]
SAMPLE_RATE = 16_000
SILENCE = 0.01  # of full scale


def read_words(path: Path = HERE / "words.txt") -> list[str]:
    words = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [w for w in words if w]


def render(word: str, tmp: Path) -> np.ndarray:
    subprocess.run(["espeak-ng", *VOICE_ARGS, "-w", str(tmp), word], check=True)
    with wave.open(str(tmp), "rb") as f:
        if f.getnchannels() != 1 or f.getsampwidth() != 2:
            raise RuntimeError(f"espeak-ng wrote {f.getnchannels()} channels x {f.getsampwidth()} bytes for {word!r}")
        rate = f.getframerate()
        x = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.float64) / 32768.0
    loud = np.flatnonzero(np.abs(x) > SILENCE)
    x = x[loud[0]: loud[-1] + 1]
    if rate != 22050:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz; this script resamples from 22050 Hz")
    return resample_poly(x, 320, 441)


def write_wav(path: Path, x: np.ndarray) -> None:
    pcm = np.clip(np.rint(x * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(pcm.tobytes())


def main() -> None:
    out = HERE / "words"
    out.mkdir(exist_ok=True)
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    words = read_words()
    with tempfile.TemporaryDirectory() as tmp:
        for word in words:
            write_wav(out / f"{word}.wav", render(word, Path(tmp) / "word.wav"))
    (HERE / "manifest.txt").write_text(
        f"{version}\ncommand: espeak-ng {' '.join(VOICE_ARGS)} -w <word>.wav <word>\n"
        f"post: trim |x| <= {SILENCE}, resample_poly 320/441 (22050 -> 16000 Hz), 16-bit mono PCM WAV\n"
        f"words: {len(words)}\n"
    )
    print(f"wrote {len(words)} clips to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
