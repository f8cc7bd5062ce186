"""Video, audio and speech of the synthetic world: determinism, invariants, and that the tasks need the media."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from data.audio import COLOR_PITCH_HZ, SAMPLE_RATE, AudioConfig, AudioWorld, render_sound, whisper_features
from data.av_baselines import (
    audio_linear_probe,
    frame_difference_direction,
    motion_baseline,
    text_only_baseline,
)
from data.speech import WORDS_DIR, UnknownWordError, read_wav, speak, words
from data.video import VideoConfig, VideoWorld


def _video_digest(world: VideoWorld, n: int) -> str:
    h = hashlib.sha256()
    for clip in world.iter_clips("test", n):
        for frame in clip.frames:
            h.update(frame.tobytes())
        h.update(repr(clip.to_record()).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ video


def test_video_same_seed_same_bytes():
    assert _video_digest(VideoWorld(seed=3), 4) == _video_digest(VideoWorld(seed=3), 4)
    assert _video_digest(VideoWorld(seed=3), 4) != _video_digest(VideoWorld(seed=4), 4)
    clip = VideoWorld(image_size=48, num_frames=5).clip(0, "val")
    assert len(clip.frames) == 5 and clip.frames[0].size == (48, 48)


@pytest.mark.parametrize("num_frames", [8, 3])
def test_video_events_match_questions_and_frames(num_frames):
    # 3 frames (the fewest VideoConfig takes) leave 2 event frames: a clip then holds at most 3 objects.
    world = VideoWorld(VideoConfig(seed=1, num_frames=num_frames))
    clips = world.clips("train", 30 if num_frames == 8 else 60)
    assert max(len(c.tracks) for c in clips) == min(4, num_frames)
    for clip in clips:
        assert len(clip.frames) == num_frames
        mover = clip.tracks[0]
        assert all(c is not None for c in mover.colors)  # the mover is always visible
        roles = [t.role for t in clip.tracks[1:]]
        assert len(roles) == len(set(roles))  # at most one object per role
        assert len({t.shape for t in clip.tracks}) == len(clip.tracks)  # a shape word names one object
        frames = [t.event_frame for t in clip.tracks[1:] if t.event_frame is not None]
        assert len(frames) == len(set(frames)) and all(1 <= f < len(clip.frames) for f in frames)
        answers = {q.kind: q.answer for q in clip.qa}
        assert answers["direction"] == mover.direction
        dx = mover.centers[-1][0] - mover.centers[0][0]
        dy = mover.centers[-1][1] - mover.centers[0][1]
        assert {"left": dx < 0, "right": dx > 0, "up": dy < 0, "down": dy > 0}[mover.direction]
        for t in clip.tracks[1:]:
            if t.role == "appears":
                assert answers["appear"] == t.shape and t.colors[0] is None and t.colors[-1] is not None
            if t.role == "turns":
                assert answers["color_change"] == t.colors[-1] != t.colors[0]
        count_q = next(q for q in clip.qa if q.kind == "count")
        frame = clip.frames[0] if "first" in count_q.question else clip.frames[-1]
        # Objects never touch, so the painted colours give the count (a turned object keeps one colour per frame).
        px = np.asarray(frame).reshape(-1, 3)
        assert len({tuple(p) for p in px} - {(118, 118, 118)}) <= int(count_q.answer)


def test_frame_difference_baseline_answers_motion():
    assert motion_baseline(VideoConfig(seed=0), 120) >= 95.0
    clip = VideoWorld().clip(0, "test")
    assert frame_difference_direction(clip.frames[::-1]) != clip.tracks[0].direction  # reversed: it notices


def test_text_only_baseline_is_at_chance_on_video():
    world = VideoWorld(VideoConfig(seed=0))
    assert world.questions(7, "test") == world.clip(7, "test").qa
    train = [q for i in range(400) for q in world.questions(i, "train")]
    test = [q for i in range(300) for q in world.questions(i, "test")]
    overall = text_only_baseline(train, test)[-1]
    assert overall.kind == "all" and overall.n > 700
    assert abs(overall.text_only - overall.chance) <= 5.0


# ------------------------------------------------------------------------------------------------------ audio


def test_audio_same_seed_same_bytes_and_format():
    a, b = AudioWorld(seed=2).clip(5, "test"), AudioWorld(seed=2).clip(5, "test")
    assert a.waveform.tobytes() == b.waveform.tobytes() and a.to_record() == b.to_record()
    assert AudioWorld(seed=3).clip(5, "test").waveform.tobytes() != a.waveform.tobytes()
    assert a.waveform.dtype == np.float32 and np.abs(a.waveform).max() <= 1.0 and a.sample_rate == SAMPLE_RATE
    n = len(a.events)
    cfg = AudioConfig()
    assert a.seconds == pytest.approx(n * cfg.sound_seconds + (n - 1) * cfg.gap_seconds + cfg.gap_seconds, abs=1e-3)


def test_sound_signature_pitch_and_snr():
    x = render_sound("yellow", "circle", 0.5)  # a sine at the colour's pitch
    spectrum = np.abs(np.fft.rfft(x))
    assert np.argmax(spectrum) * SAMPLE_RATE / len(x) == pytest.approx(COLOR_PITCH_HZ["yellow"], abs=2.0)
    # The noise is added at the configured SNR: a clip at high SNR is the clean signal up to tiny noise.
    clean = AudioWorld(snr_db=60.0, pitch_jitter=0.0).clip(0, "train")
    noisy = AudioWorld(snr_db=0.0, pitch_jitter=0.0).clip(0, "train")
    silent = slice(0, int(0.05 * SAMPLE_RATE))  # the lead-in before the first sound holds only noise
    assert np.abs(clean.waveform[silent]).max() < 1e-2 < np.abs(noisy.waveform[silent]).max()


def test_whisper_features_shape():
    clip = AudioWorld().clip(0, "test")
    full = whisper_features([clip.waveform])
    short = whisper_features([clip.waveform], pad_to_30s=False)
    assert full.shape == (1, 80, 3000) and short.shape == (1, 80, len(clip.waveform) // 160)


def test_linear_probe_separates_sound_kinds():
    config = AudioConfig(min_sounds=1, max_sounds=1, colors=("red", "blue", "yellow"))
    assert audio_linear_probe(config, n_train=90, n_test=60) >= 95.0


def test_text_only_baseline_is_at_chance_on_audio():
    world = AudioWorld()
    train = [q for c in world.iter_clips("train", 500) for q in c.qa]
    test = [q for c in world.iter_clips("test", 300) for q in c.qa]
    overall = text_only_baseline(train, test)[-1]
    assert abs(overall.text_only - overall.chance) <= 5.0


# ------------------------------------------------------------------------------------------------------ speech


def test_shipped_speech_clips():
    listed = [w.split("#")[0].strip() for w in (WORDS_DIR.parent / "words.txt").read_text().splitlines()]
    listed = [w for w in listed if w]
    assert sorted(words()) == sorted(listed)
    total = sum(p.stat().st_size for p in WORDS_DIR.glob("*.wav"))
    assert total < 3_000_000  # a few MB at most
    assert "espeak-ng -v en-us" in (WORDS_DIR.parent / "manifest.txt").read_text()
    assert (WORDS_DIR.parent / "render_words.py").is_file()
    read_wav(WORDS_DIR / "circle.wav")  # 16 kHz 16-bit mono, or it raises


def test_speak_is_deterministic_and_complete():
    a = speak("How many circles are there? 3")
    assert np.array_equal(a, speak("how many circles are there three"))
    assert a.dtype == np.float32 and len(a) > SAMPLE_RATE
    with pytest.raises(UnknownWordError, match=r"no clip for \['banana'\]"):
        speak("Is there a banana?")
    # Every question of every world can be spoken.
    from data.shapes import ShapesWorld

    texts = [q.question for s in ShapesWorld().scenes("test", 40) for q in s.vqa]
    texts += [q.question for c in VideoWorld().clips("test", 40) for q in c.qa]
    texts += [q.question for c in AudioWorld().clips("test", 40) for q in c.qa]
    vocab = set(words())
    missing = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())} - vocab
    assert not missing


def test_read_wav_rejects_wrong_rate(tmp_path):
    from data.speech import write_wav

    write_wav(tmp_path / "a.wav", np.zeros(100), sample_rate=8000)
    with pytest.raises(ValueError, match=r"a.wav: sample rate 8000 Hz; expected 16000 Hz"):
        read_wav(tmp_path / "a.wav")
    (tmp_path / "b.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match=r"b.wav: not a readable PCM WAV file"):
        read_wav(tmp_path / "b.wav")
