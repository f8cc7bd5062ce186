"""Seeded video clips of the shapes world: objects move, appear, leave and change colour.

Every clip is a pure function of ``(VideoConfig, split, index)``: frames are rasterised with numpy by testing pixel
centres (``data.shapes.shape_mask``), so the same config gives the same frame bytes on every machine.

Public API::

    from data.video import VideoWorld, VideoConfig
    world = VideoWorld(VideoConfig(image_size=64, num_frames=8, seed=0))
    clip = world.clip(index, split="test")     # streams of "train" / "val" / "test" are seeded apart
    clip.frames        # list of PIL RGB images, num_frames x (image_size x image_size)
    clip.tracks        # list[Track]: per object its colour per frame (None = not visible) and centre per frame
    clip.caption       # "the red circle moves left; a blue square appears; the green star turns cyan."
    clip.qa            # list[QA(question, answer, kind)], kinds in VIDEO_QA_KINDS
    world.questions(index, split)   # the same QA list without painting frames (fast)
    clip.to_record()   # JSON-able dict of everything but the pixels

What happens in a clip:

* Object 0 (the *mover*) is visible in every frame and travels in a straight line, left, right, up or down (uniform),
  ``travel`` x image size over the clip. Its swept box never touches another object.
* Every other object stands still and has one role: ``stays``, ``appears`` (invisible before its event frame),
  ``leaves`` (invisible from its event frame on) or ``turns`` (changes to another palette colour at its event
  frame). At most one object has each of ``appears`` / ``leaves`` / ``turns``, so "which shape appears" has one answer.
* Event frames are distinct (1 .. num_frames-1), so the order of two events is always defined.
* Shapes are distinct within a clip: a shape word names one object.

Questions (answers are single words):
  direction     "Which direction does the red circle move?" -> left / right / up / down
  appear        "Which shape appears during the video?" -> a shape
  leave         "Which shape leaves the video?" -> a shape
  order         "Does the square appear before or after the star leaves?" -> before / after
  color_change  "What color does the triangle turn into?" -> a colour
  count         "How many objects are visible in the first frame?" (or last) -> a digit
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from data.seeding import mix_seed
from data.shapes import COLOR_RGB, COLORS, QA, SHAPES, SPLITS, shape_mask

__all__ = ["VideoConfig", "VideoWorld", "VideoClip", "Track", "DIRECTIONS", "VIDEO_QA_KINDS", "ROLES"]

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
_DIRECTION_VECTOR = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_QA_KINDS: tuple[str, ...] = ("direction", "appear", "leave", "order", "color_change", "count")
ROLES: tuple[str, ...] = ("stays", "appears", "leaves", "turns")
_GREY = 118
_MAX_TRIES = 500


@dataclass(frozen=True, kw_only=True, slots=True)
class VideoConfig:
    """What the clips look like. Every field takes part in the clip's seed."""

    image_size: int = 64
    num_frames: int = 8
    seed: int = 0
    min_objects: int = 2
    max_objects: int = 4
    travel: float = 0.4  # how far the mover goes over the clip, as a fraction of the image size
    radius: float = 0.11  # half-extent of every object as a fraction of the image size (floor 5 px)
    colors: tuple[str, ...] = COLORS
    shapes: tuple[str, ...] = SHAPES

    def __post_init__(self) -> None:
        for name in ("colors", "shapes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not 32 <= self.image_size <= 336:
            raise ValueError(f"VideoConfig.image_size must be in 32..336, got {self.image_size}")
        if not 3 <= self.num_frames <= 64:
            # Events need distinct frames after the first one; with 3 frames a clip holds at most 3 objects.
            raise ValueError(f"VideoConfig.num_frames must be in 3..64, got {self.num_frames}")
        if not 1 <= self.min_objects <= self.max_objects <= min(4, len(self.shapes)):
            raise ValueError(
                "VideoConfig needs 1 <= min_objects <= max_objects <= min(4, number of shapes), got "
                f"{self.min_objects}, {self.max_objects}"
            )
        if not 0.1 <= self.travel <= 0.6:
            raise ValueError(f"VideoConfig.travel must be in 0.1..0.6, got {self.travel}")
        if len(self.colors) < 2:
            raise ValueError("VideoConfig.colors needs at least two colours (an object must be able to turn)")
        unknown = [c for c in self.colors if c not in COLOR_RGB]
        if unknown:
            raise ValueError(f"VideoConfig.colors has unknown colours {unknown}; known: {sorted(COLOR_RGB)}")

    @property
    def radius_px(self) -> float:
        return max(5.0, self.radius * self.image_size)


@dataclass(frozen=True, eq=False, slots=True)
class Track:
    shape: str
    role: str  # "moves" for object 0, else one of ROLES
    colors: tuple[str | None, ...]  # colour per frame; None where the object is not visible
    centers: tuple[tuple[int, int], ...]  # (x, y) pixel per frame
    event_frame: int | None = None  # the frame where it appears / leaves / turns
    direction: str | None = None  # the mover's direction

    @property
    def first_color(self) -> str:
        return next(c for c in self.colors if c is not None)

    def name(self) -> str:
        return f"{self.first_color} {self.shape}"


@dataclass(eq=False, slots=True)
class VideoClip:
    id: str
    split: str
    index: int
    frames: list[Image.Image]
    tracks: list[Track]
    caption: str
    qa: list[QA]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "split": self.split,
            "index": self.index,
            "num_frames": len(self.frames),
            "image_size": list(self.frames[0].size),
            "caption": self.caption,
            "tracks": [
                {"shape": t.shape, "role": t.role, "colors": list(t.colors), "centers": [list(c) for c in t.centers],
                 "event_frame": t.event_frame, "direction": t.direction}
                for t in self.tracks
            ],  # fmt: skip
            "qa": [{"question": q.question, "answer": q.answer, "kind": q.kind} for q in self.qa],
        }


def _config_hash(config: Any) -> int:
    # A stable integer from the config's repr (dataclass reprs list every field in order).
    return int.from_bytes(hashlib.sha256(repr(config).encode()).digest()[:8], "little")


class VideoWorld:
    def __init__(self, config: VideoConfig | None = None, **overrides: Any) -> None:
        self.config = config if config is not None else VideoConfig(**overrides)
        if config is not None and overrides:
            raise ValueError("pass either a VideoConfig or keyword overrides, not both")
        self._seed = _config_hash(self.config)

    def clip(self, index: int, split: str = "train") -> VideoClip:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = np.random.default_rng(mix_seed(self._seed, SPLITS.index(split), index))
        tracks = self._tracks(rng)
        frames = [self._paint(tracks, t) for t in range(self.config.num_frames)]
        return VideoClip(
            id=f"video_{split}_{index:06d}", split=split, index=index, frames=frames, tracks=tracks,
            caption=_caption(tracks), qa=self._questions(rng, tracks),
        )  # fmt: skip

    def questions(self, index: int, split: str = "train") -> list[QA]:
        """``clip(index, split).qa`` without painting the frames (painting draws no random numbers)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = np.random.default_rng(mix_seed(self._seed, SPLITS.index(split), index))
        tracks = self._tracks(rng)
        return self._questions(rng, tracks)

    def clips(self, split: str, n: int, start: int = 0) -> list[VideoClip]:
        return list(self.iter_clips(split, n, start))

    def iter_clips(self, split: str, n: int | None = None, start: int = 0) -> Iterator[VideoClip]:
        index = start
        while n is None or index < start + n:
            yield self.clip(index, split)
            index += 1

    # ------------------------------------------------------------------------------------------------ layout

    def _tracks(self, rng: np.random.Generator) -> list[Track]:
        cfg = self.config
        s, r, t_count = cfg.image_size, cfg.radius_px, cfg.num_frames
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        # Every object but the mover draws a distinct event frame from 1 .. num_frames-1, so a clip holds at most
        # num_frames objects (only 3-frame clips with 4 objects hit this; the draw above is unchanged).
        n = min(n, t_count)
        shapes = [str(x) for x in rng.choice(cfg.shapes, size=n, replace=False)]
        colors = [str(x) for x in rng.choice(cfg.colors, size=n)]
        direction = str(rng.choice(DIRECTIONS))
        dx, dy = _DIRECTION_VECTOR[direction]
        distance = cfg.travel * s
        lo, hi = r + 1, s - r - 2
        # The mover's start leaves room for the whole path inside the image.
        x0 = rng.uniform(lo - min(dx, 0) * distance, hi - max(dx, 0) * distance)
        y0 = rng.uniform(lo - min(dy, 0) * distance, hi - max(dy, 0) * distance)
        path = [(round(x0 + dx * distance * t / (t_count - 1)), round(y0 + dy * distance * t / (t_count - 1)))
                for t in range(t_count)]  # fmt: skip
        boxes = [_swept_box(path, r)]
        tracks = [Track(shape=shapes[0], role="moves", colors=(colors[0],) * t_count, centers=tuple(path),
                        direction=direction)]  # fmt: skip
        # Each of appears / leaves / turns goes to at most one static object; the rest stay.
        roles = [str(x) for x in rng.permutation(["appears", "leaves", "turns", "stays"])][: n - 1]
        event_frames = [int(f) for f in rng.choice(np.arange(1, t_count), size=n - 1, replace=False)]
        for k in range(1, n):
            center = self._free_spot(rng, boxes)
            if center is None:
                break  # the frame is full: fewer objects, still a valid clip
            boxes.append(_swept_box([center], r))
            role, frame = roles[k - 1], event_frames[k - 1]
            if role == "appears":
                per_frame = tuple(colors[k] if t >= frame else None for t in range(t_count))
            elif role == "leaves":
                per_frame = tuple(colors[k] if t < frame else None for t in range(t_count))
            elif role == "turns":
                new = str(rng.choice([c for c in cfg.colors if c != colors[k]]))
                per_frame = tuple(colors[k] if t < frame else new for t in range(t_count))
            else:
                per_frame, frame = (colors[k],) * t_count, None
            tracks.append(Track(shape=shapes[k], role=role, colors=per_frame, centers=(center,) * t_count,
                                event_frame=frame))  # fmt: skip
        return tracks

    def _free_spot(self, rng: np.random.Generator, boxes: Sequence[tuple[float, ...]]) -> tuple[int, int] | None:
        s, r = self.config.image_size, self.config.radius_px
        gap = 2.0
        for _ in range(_MAX_TRIES):
            x, y = (int(v) for v in rng.integers(int(r) + 1, int(s - r) - 1, size=2))
            bx = (x - r - gap, y - r - gap, x + r + gap, y + r + gap)
            if all(bx[2] < b[0] or b[2] < bx[0] or bx[3] < b[1] or b[3] < bx[1] for b in boxes):
                return x, y
        return None

    def _paint(self, tracks: Sequence[Track], t: int) -> Image.Image:
        s = self.config.image_size
        canvas = np.full((s, s, 3), _GREY, dtype=np.uint8)
        for track in tracks:
            color = track.colors[t]
            if color is not None:
                canvas[shape_mask(track.shape, track.centers[t], self.config.radius_px, s)] = COLOR_RGB[color]
        return Image.fromarray(canvas, mode="RGB")

    # ------------------------------------------------------------------------------------------------ language

    def _questions(self, rng: np.random.Generator, tracks: Sequence[Track]) -> list[QA]:
        mover = tracks[0]
        qa = [QA(f"Which direction does the {mover.name()} move?", str(mover.direction), "direction")]
        by_role = {t.role: t for t in tracks[1:]}
        if "appears" in by_role:
            qa.append(QA("Which shape appears during the video?", by_role["appears"].shape, "appear"))
        if "leaves" in by_role:
            qa.append(QA("Which shape leaves the video?", by_role["leaves"].shape, "leave"))
        if "appears" in by_role and "leaves" in by_role:
            a, b = by_role["appears"], by_role["leaves"]
            answer = "before" if a.event_frame < b.event_frame else "after"
            qa.append(QA(f"Does the {a.shape} appear before or after the {b.shape} leaves?", answer, "order"))
        if "turns" in by_role:
            turns = by_role["turns"]
            qa.append(QA(f"What color does the {turns.shape} turn into?", str(turns.colors[-1]), "color_change"))
        which = str(rng.choice(["first", "last"]))
        t = 0 if which == "first" else -1
        visible = sum(track.colors[t] is not None for track in tracks)
        qa.append(QA(f"How many objects are visible in the {which} frame?", str(visible), "count"))
        return qa


def _swept_box(path: Sequence[tuple[int, int]], r: float) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in path], [p[1] for p in path]
    return min(xs) - r, min(ys) - r, max(xs) + r, max(ys) + r


def _caption(tracks: Sequence[Track]) -> str:
    mover = tracks[0]
    parts = [(0, f"the {mover.name()} moves {mover.direction}")]
    for t in tracks[1:]:
        if t.role == "appears":
            parts.append((t.event_frame, f"a {t.name()} appears"))
        elif t.role == "leaves":
            parts.append((t.event_frame, f"the {t.name()} leaves"))
        elif t.role == "turns":
            parts.append((t.event_frame, f"the {t.name()} turns {t.colors[-1]}"))
        else:
            parts.append((0, f"a {t.name()} stays still"))
    parts.sort(key=lambda p: p[0])
    return "; ".join(p[1] for p in parts) + "."
