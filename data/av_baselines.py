"""Baselines that show the video and audio tasks are learnable from the signals and not from the question text.

* :func:`frame_difference_direction`: the mover's direction from frame differences alone (no learning).
* :func:`audio_linear_probe`: logistic regression on pooled Whisper log-Mel features of single-sound clips,
  predicting the sound's (colour, shape).
* :func:`text_only_baseline`: a bag-of-words (and word pairs) naive Bayes classifier trained on the questions of the train split, scored on the
  test split, next to *chance*: always answering the train split's most frequent answer of the question's kind.

``python -m data.av_baselines`` prints all three with the sizes used (the numbers quoted in the README/report).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.audio import AudioConfig, AudioWorld, pooled_features
from data.shapes import QA
from data.video import VideoConfig, VideoWorld

__all__ = ["frame_difference_direction", "motion_baseline", "audio_linear_probe", "text_only_baseline", "KindScore"]


def _foreground(frame: Image.Image) -> np.ndarray:
    # Objects are the only pixels that differ from the background, which is the corner pixel's colour.
    px = np.asarray(frame)
    return np.any(px != px[0, 0], axis=2)


def frame_difference_direction(frames: Sequence[Image.Image]) -> str:
    """left / right / up / down from consecutive frame differences.

    Between two frames a moving object gains pixels at its leading edge and loses as many at its trailing edge;
    the gained pixels' centroid minus the lost pixels' centroid points where it goes. A step where an object appears
    or leaves (gains or loses a whole object, so the two counts differ by more than 2x) is ignored.
    """
    shift = np.zeros(2)
    masks = [_foreground(f) for f in frames]
    for before, after in zip(masks, masks[1:]):
        gained, lost = after & ~before, before & ~after
        n_gained, n_lost = int(gained.sum()), int(lost.sum())
        if n_gained == 0 or n_lost == 0 or max(n_gained, n_lost) > 2 * min(n_gained, n_lost):
            continue
        ys_g, xs_g = np.nonzero(gained)
        ys_l, xs_l = np.nonzero(lost)
        shift += (xs_g.mean() - xs_l.mean(), ys_g.mean() - ys_l.mean())
    dx, dy = shift
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def motion_baseline(config: VideoConfig, n: int, split: str = "test") -> float:
    """Accuracy (%) of :func:`frame_difference_direction` on the direction questions of ``n`` clips."""
    world = VideoWorld(config)
    hits = 0
    for clip in world.iter_clips(split, n):
        qa = next(q for q in clip.qa if q.kind == "direction")
        hits += frame_difference_direction(clip.frames) == qa.answer
    return 100.0 * hits / n


def audio_linear_probe(config: AudioConfig, n_train: int, n_test: int) -> float:
    """Test accuracy (%) of a linear probe on pooled Whisper features of single-sound clips: which colour x shape."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if config.min_sounds != 1 or config.max_sounds != 1:
        raise ValueError("audio_linear_probe needs single-sound clips (min_sounds = max_sounds = 1)")
    world = AudioWorld(config)
    train, test = world.clips("train", n_train), world.clips("test", n_test)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    probe.fit(pooled_features([c.waveform for c in train]), [c.events[0].name for c in train])
    return 100.0 * probe.score(pooled_features([c.waveform for c in test]), [c.events[0].name for c in test])


@dataclass(frozen=True)
class KindScore:
    kind: str
    n: int
    text_only: float  # accuracy (%) of the question-text classifier
    chance: float  # accuracy (%) of always giving the train split's most frequent answer of this kind


def text_only_baseline(train: Sequence[QA], test: Sequence[QA]) -> list[KindScore]:
    """Per question kind and overall ("all"): naive Bayes on the question's words and word pairs, text alone."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.pipeline import make_pipeline

    out, total_text, total_chance, total = [], 0.0, 0.0, 0
    for kind in sorted({q.kind for q in test}):
        tr = [q for q in train if q.kind == kind]
        te = [q for q in test if q.kind == kind]
        majority = Counter(q.answer for q in tr).most_common(1)[0][0]
        chance_hits = sum(q.answer == majority for q in te)
        if len({q.answer for q in tr}) > 1:
            model = make_pipeline(CountVectorizer(token_pattern=r"[a-z]+", ngram_range=(1, 2)), MultinomialNB())
            model.fit([q.question.lower() for q in tr], [q.answer for q in tr])
            text_hits = int(sum(p == q.answer for p, q in zip(model.predict([q.question.lower() for q in te]), te)))
        else:
            text_hits = chance_hits
        out.append(KindScore(kind, len(te), 100.0 * text_hits / len(te), 100.0 * chance_hits / len(te)))
        total_text, total_chance, total = total_text + text_hits, total_chance + chance_hits, total + len(te)
    out.append(KindScore("all", total, 100.0 * total_text / total, 100.0 * total_chance / total))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="train clips for the text-only baseline / probe")
    parser.add_argument("--test", type=int, default=1000, help="test clips for every baseline")
    args = parser.parse_args(argv)
    video = VideoWorld(VideoConfig())
    audio = AudioWorld(AudioConfig())
    print(f"frame-difference motion baseline, {args.test} test clips: "
          f"{motion_baseline(VideoConfig(), args.test):.1f}%")  # fmt: skip
    probe = audio_linear_probe(AudioConfig(min_sounds=1, max_sounds=1), args.train, args.test)
    print(f"audio linear probe (colour x shape, {len(audio.class_names)} classes), {args.train} train / "
          f"{args.test} test clips: {probe:.1f}%")  # fmt: skip
    for name, questions in (("video", video.questions), ("audio", lambda i, s: audio.clip(i, s).qa)):
        train = [q for i in range(args.train) for q in questions(i, "train")]
        test = [q for i in range(args.test) for q in questions(i, "test")]
        print(f"text-only baseline, {name} questions ({args.train} train / {args.test} test clips):")
        for s in text_only_baseline(train, test):
            print(f"  {s.kind:13s} n={s.n:5d} text-only {s.text_only:5.1f}%  chance {s.chance:5.1f}%  "
                  f"diff {s.text_only - s.chance:+.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
