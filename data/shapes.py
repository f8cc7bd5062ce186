"""The seeded synthetic world: scenes of coloured shapes with masks, captions, questions and probes.

Every scene is a pure function of ``(WorldConfig, split, index)``: the same config gives the same image bytes on
every machine (shapes are rasterised with numpy by testing pixel centres, so there is no anti-aliasing and no
dependence on a font or drawing backend).

Public API::

    from data.shapes import ShapesWorld, WorldConfig, Scene, COLORS, SHAPES, SIZES
    world = ShapesWorld(WorldConfig(image_size=64, seed=0, min_objects=1, max_objects=3,
                                    background="plain", clutter=0))
    scene = world.scene(index, split="train")      # splits "train" / "val" / "test" are disjoint by layout
    scenes = world.scenes("val", 100)              # list of the first 100 val scenes (``start=`` to offset)
    world.iter_scenes("train", n=None)             # lazy, endless when n is None
    world.class_names                              # ["red circle", "red square", ...] (colours x shapes)
    world.popularity                               # class names from most to least frequent
    scene.image        # PIL.Image RGB, image_size x image_size
    scene.objects      # list[ShapeObject(color, shape, size, center, bbox, mask)], objects[0] is the main object
    scene.caption      # "a large red circle to the left of a small blue square."
    scene.vqa          # list[QA(question, answer, kind)]: one color, shape, count and (when clear) position
                       # question, then one "yes" and one "no" exist question in random order
    scene.pope         # list[PopeProbe(question, answer, strategy, target)]: per strategy every present object
                       # ("yes") and as many absent ones ("no")
    scene.refexps      # list[RefExp(text, object_index, mask)], each naming its target and nothing else
    scene.label        # class id of objects[0]'s "colour shape"; scene.label_name == world.class_names[label]
    scene.to_record()  # JSON-able dict (masks as COCO-style uncompressed RLE, see ``rle_encode``)
    render_grid(scenes, "grid.png")                # contact sheet with captions, for a person to look at
    # python -m data.shapes --out grid.png --image-size 64 --max-objects 3 --background noise

Conventions:

* ``bbox`` is ``(x0, y0, x1, y1)`` in pixels with exclusive ends (``mask[y0:y1, x0:x1]`` holds the whole object);
  ``center`` is ``(x, y)`` in pixels (pixel centres sit at ``i + 0.5``).
* Objects never overlap: their bounding squares keep a gap, so masks are disjoint and every pair of objects is
  clearly separated horizontally or vertically (which is what relative-position questions rely on).
* The object count is uniform in ``[min_objects, max_objects]``; positions are uniform over the free space.
* Within one scene every ``(colour, shape)`` pair is distinct, so "the red circle" always names one object and
  "Is there a red circle?" has one answer.
* Splits: a candidate layout (objects, sizes, positions) is hashed; the hash assigns it to exactly one split
  (80/10/10), and a scene of split ``s`` draws candidates until one belongs to ``s``. The same layout can never
  appear in two splits, whatever the indices.
* Popularity: ``(colour, shape)`` pairs are drawn with Zipf-like weights ``1 / (1 + rank) ** skew`` over a
  seed-dependent ranking (``skew=0`` is uniform). "popular" POPE negatives are the most frequent absent pairs under
  these weights, as POPE's popular split takes the most frequent COCO categories.
* Answers are single words: a colour, a shape, a count as digits ("2"), "left"/"right"/"above"/"below", "yes"/"no".

Other modalities: moving shapes and their sounds are seeded worlds of their own with the same palette and shapes
(``data/video.py``: clips where objects move, appear, leave and change colour; ``data/audio.py``: a sound per
colour and shape), because their questions are about time, which a still scene has none of. Spoken questions about
these scenes come from ``data/speech.py``; ``data/unimoe.py`` writes any mix of them in Uni-MoE's format.
``Scene.media`` (a dict keyed by modality name) stays empty here.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Well separated in hue (about 55-80 degrees apart for the default six) and all far from the grey backgrounds.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 235),
    "yellow": (245, 220, 40),
    "purple": (150, 60, 205),
    "cyan": (40, 215, 225),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
}
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
ALL_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Half-extent of an object as a fraction of the image size, with a floor in pixels so shapes stay recognisable
# at 32 px (an 11 px star is still a star; a 7 px one is a blob).
SIZE_SCALE: dict[str, tuple[float, float]] = {
    "small": (0.12, 5.0),
    "medium": (0.155, 6.0),
    "large": (0.19, 7.0),
}
SIZES: tuple[str, ...] = ("small", "large")
SPLITS: tuple[str, ...] = ("train", "val", "test")
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "gradient")
POPE_STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")
QA_KINDS: tuple[str, ...] = ("color", "shape", "count", "position", "exist")
# Share of the layout-hash space owned by each split (percent).
_SPLIT_BUCKETS: dict[str, tuple[int, int]] = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
_SPLIT_ID = {name: i for i, name in enumerate(SPLITS)}
_PLAIN_GREY = 118
_MAX_CANDIDATES = 10_000


@dataclass(frozen=True, kw_only=True, slots=True)
class WorldConfig:
    """What the world looks like. Every field takes part in the scene's seed, so changing any changes the scenes."""

    image_size: int = 64
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 3
    background: str = "plain"  # "plain" | "noise" | "gradient" (all neutral grey, never a palette colour)
    clutter: int = 0  # number of thin grey distractor strokes drawn under the objects
    colors: tuple[str, ...] = COLORS
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = SIZES
    skew: float = 0.5  # Zipf exponent of the (colour, shape) pair frequencies; 0 = uniform

    def __post_init__(self) -> None:
        # Lists from YAML are accepted and frozen into tuples so the config stays hashable.
        for name in ("colors", "shapes", "sizes"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"WorldConfig.{name} must be a list of names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not 32 <= self.image_size <= 336:
            raise ValueError(f"WorldConfig.image_size must be in 32..336, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"WorldConfig needs 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if self.background not in BACKGROUNDS:
            raise ValueError(f"WorldConfig.background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.clutter < 0:
            raise ValueError(f"WorldConfig.clutter must be >= 0, got {self.clutter}")
        if self.skew < 0:
            raise ValueError(f"WorldConfig.skew must be >= 0, got {self.skew}")
        for name, allowed in (("colors", COLOR_RGB), ("shapes", ALL_SHAPES), ("sizes", SIZE_SCALE)):
            values = getattr(self, name)
            unknown = [v for v in values if v not in allowed]
            if unknown or not values or len(set(values)) != len(values):
                raise ValueError(
                    f"WorldConfig.{name}={list(values)} must be distinct names from {sorted(allowed)}"
                    + (f"; unknown: {unknown}" if unknown else "")
                )
        if self.max_objects > len(self.colors) * len(self.shapes) // 2:
            # POPE needs as many absent pairs as present ones.
            raise ValueError(
                f"WorldConfig.max_objects={self.max_objects} is too many for {len(self.colors)} colours x "
                f"{len(self.shapes)} shapes (at most half the pairs may be present)"
            )


@dataclass(frozen=True, eq=False, slots=True)
class ShapeObject:
    color: str
    shape: str
    size: str
    center: tuple[int, int]  # (x, y) pixel whose centre is the shape's centre
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive ends
    mask: np.ndarray  # bool, H x W

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True, slots=True)
class QA:
    question: str
    answer: str
    kind: str  # one of QA_KINDS


@dataclass(frozen=True, slots=True)
class PopeProbe:
    question: str
    answer: str  # "yes" | "no"
    strategy: str  # one of POPE_STRATEGIES
    target: str  # "red circle"


@dataclass(frozen=True, eq=False, slots=True)
class RefExp:
    text: str  # "the red circle", "the circle on the left"
    object_index: int
    mask: np.ndarray


@dataclass(eq=False, slots=True)
class Scene:
    id: str
    split: str
    index: int
    image: Image.Image
    objects: list[ShapeObject]
    caption: str
    vqa: list[QA]
    pope: list[PopeProbe]
    refexps: list[RefExp]
    label: int
    label_name: str
    background: str
    # Future modalities ("video", "audio") keyed by name; see the module docstring.
    media: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict of everything but the pixels; exporters add the image path."""
        return {
            "id": self.id,
            "split": self.split,
            "index": self.index,
            "image_size": list(self.image.size),
            "background": self.background,
            "label": self.label,
            "label_name": self.label_name,
            "caption": self.caption,
            "objects": [
                {
                    "color": o.color,
                    "shape": o.shape,
                    "size": o.size,
                    "center": list(o.center),
                    "bbox": list(o.bbox),
                    "area": o.area,
                    "mask_rle": rle_encode(o.mask),
                }
                for o in self.objects
            ],
            "vqa": [{"question": q.question, "answer": q.answer, "kind": q.kind} for q in self.vqa],
            "pope": [
                {"question": p.question, "answer": p.answer, "strategy": p.strategy, "target": p.target}
                for p in self.pope
            ],
            "refexps": [{"text": r.text, "object_index": r.object_index} for r in self.refexps],
        }


# ----------------------------------------------------------------------------------------------------------------
# COCO-style uncompressed RLE (column-major runs, starting with a run of zeros), as pycocotools' frPyObjects reads.
# ----------------------------------------------------------------------------------------------------------------


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h}x{w}={h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((h, w), order="F")


# ----------------------------------------------------------------------------------------------------------------
# Rasterisation: numpy point-in-polygon on pixel centres, so the output is exact and backend independent.
# ----------------------------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, r: float) -> np.ndarray | None:
    """Vertices (x, y) relative to the centre, y down; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85 * r  # about the circle's area, so "large square" and "large circle" look equally large
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "diamond":
        return np.array([[0, -r], [r, 0], [0, r], [-r, 0]])
    if shape == "triangle":
        return np.array([[0, -r], [r, 0.8 * r], [-r, 0.8 * r]])
    if shape == "star":
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.5 * r)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "cross":
        a = 0.34 * r
        return np.array(
            [
                [-a, -r],
                [a, -r],
                [a, -a],
                [r, -a],
                [r, a],
                [a, a],
                [a, r],
                [-a, r],
                [-a, a],
                [-r, a],
                [-r, -a],
                [-a, -a],
            ]
        )
    raise ValueError(f"unknown shape {shape!r}; known: {ALL_SHAPES}")


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule on the grid of points (xs, ys)."""
    inside = np.zeros(np.broadcast(xs, ys).shape, dtype=bool)
    n = len(poly)
    for k in range(n):
        x0, y0 = poly[k]
        x1, y1 = poly[(k + 1) % n]
        if y0 == y1:
            continue
        crosses = (ys >= min(y0, y1)) & (ys < max(y0, y1))
        x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside


def shape_mask(shape: str, center: tuple[int, int], radius: float, image_size: int) -> np.ndarray:
    """Boolean H x W mask of ``shape`` centred on pixel ``center`` with half-extent ``radius``."""
    cx, cy = center[0] + 0.5, center[1] + 0.5
    lo_x, hi_x = max(0, int(cx - radius) - 1), min(image_size, int(cx + radius) + 2)
    lo_y, hi_y = max(0, int(cy - radius) - 1), min(image_size, int(cy + radius) + 2)
    xs = (np.arange(lo_x, hi_x) + 0.5)[None, :] - cx
    ys = (np.arange(lo_y, hi_y) + 0.5)[:, None] - cy
    poly = _shape_polygon(shape, radius)
    if poly is None:
        # Round the radius to a half pixel: a radius just above an integer leaves one-pixel nubs on the axes.
        r = math.floor(radius) + 0.5
        window = xs**2 + ys**2 <= r * r
    else:
        # Shrink by a hair so no edge passes exactly through a pixel centre: the even-odd test is half-open, which
        # would otherwise make left/right and top/bottom edges rasterise differently (lopsided crosses).
        window = _polygon_mask(xs, ys, poly * (1 - 1e-7))
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[lo_y:hi_y, lo_x:hi_x] = window
    return mask


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ----------------------------------------------------------------------------------------------------------------
# Language: descriptions, relations, questions, referring expressions, POPE probes.
# ----------------------------------------------------------------------------------------------------------------

_POSITION_WORDS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}


@dataclass(frozen=True, slots=True)
class _Desc:
    """A noun phrase: optional size / colour / shape (None = "object") and an optional extreme position."""

    size: str | None = None
    color: str | None = None
    shape: str | None = None
    position: str | None = None

    def text(self) -> str:
        words = [w for w in (self.size, self.color, self.shape or "object") if w]
        phrase = " ".join(words)
        return f"{phrase} {_POSITION_WORDS[self.position]}" if self.position else phrase


def _matches(desc: _Desc, obj: ShapeObject) -> bool:
    return all(
        want is None or want == have
        for want, have in ((desc.size, obj.size), (desc.color, obj.color), (desc.shape, obj.shape))
    )


def _resolve(desc: _Desc, objects: Sequence[ShapeObject]) -> int | None:
    """Index of the single object ``desc`` names, or None when it names none or several.

    A position word picks the extreme one of several matching objects, and only when it lies entirely beyond all
    the others on that axis (its bbox does not overlap theirs), so "the circle on the left" is never a judgement call.
    """
    hits = [i for i, o in enumerate(objects) if _matches(desc, o)]
    if desc.position is None:
        return hits[0] if len(hits) == 1 else None
    if len(hits) < 2:  # "the circle on the left" only makes sense with several circles
        return None
    near, far, sign = {"left": (2, 0, 1), "right": (0, 2, -1), "top": (3, 1, 1), "bottom": (1, 3, -1)}[
        desc.position
    ]
    for i in hits:
        # near edge of i vs far edges of the others: x1 <= x0 for "left", x0 >= x1 for "right", etc.
        if all(sign * objects[i].bbox[near] <= sign * objects[j].bbox[far] for j in hits if j != i):
            return i
    return None


def _unique_descs(objects: Sequence[ShapeObject], i: int) -> list[_Desc]:
    """All noun phrases (from a fixed, short-first list) that name object ``i`` and no other."""
    o = objects[i]
    attribute_sets = [
        _Desc(shape=o.shape),
        _Desc(color=o.color),
        _Desc(color=o.color, shape=o.shape),
        _Desc(size=o.size, shape=o.shape),
        _Desc(size=o.size, color=o.color),
        _Desc(size=o.size),
    ]
    out = [d for d in attribute_sets if _resolve(d, objects) == i]
    for base in (_Desc(shape=o.shape), _Desc(color=o.color), _Desc()):
        for pos in _POSITION_WORDS:
            d = replace(base, position=pos)
            if _resolve(d, objects) == i:
                out.append(d)
    return out


def _refexp_descs(o: ShapeObject, unique: Sequence[_Desc], limit: int = 4) -> list[_Desc]:
    """The referring expressions kept for object ``o`` out of its ``unique`` phrases: its full name, then the
    shortest unique phrases, then one with a position word (when one is unique), at most ``limit``."""
    full = _Desc(color=o.color, shape=o.shape)
    others = [d for d in unique if d != full and not (d.size and d.position is None and d.shape is None)]
    plain = [d for d in others if d.position is None][: limit - 2]
    positional = [d for d in others if d.position is not None][:1]
    return [full, *plain, *positional][:limit]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _relation(a: ShapeObject, b: ShapeObject, ra: float, rb: float) -> tuple[str | None, str | None]:
    """(horizontal, vertical) relation of a to b; each None unless the two are clearly apart on that axis."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    horizontal = ("left" if dx > 0 else "right") if abs(dx) >= ra + rb else None
    vertical = ("above" if dy > 0 else "below") if abs(dy) >= ra + rb else None
    return horizontal, vertical


_RELATION_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


# ----------------------------------------------------------------------------------------------------------------
# The world.
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layout:
    pairs: tuple[tuple[str, str], ...]
    sizes: tuple[str, ...]
    centers: tuple[tuple[int, int], ...]


class ShapesWorld:
    """A deterministic generator of scenes; see the module docstring."""

    def __init__(self, config: WorldConfig | None = None, **overrides: Any) -> None:
        config = config or WorldConfig()
        self.config = replace(config, **overrides) if overrides else config
        cfg = self.config
        self.pairs: list[tuple[str, str]] = [(c, s) for c in cfg.colors for s in cfg.shapes]
        self.class_names: list[str] = [f"{c} {s}" for c, s in self.pairs]
        # Popularity ranking of pairs: a permutation fixed by the seed, Zipf weights over it.
        rank = np.random.default_rng([cfg.seed, 7919]).permutation(len(self.pairs))
        weights = 1.0 / (1.0 + rank.astype(np.float64)) ** cfg.skew
        self.pair_probs: np.ndarray = weights / weights.sum()
        # Most to least frequent; ties (skew=0) keep the canonical order.
        self.popularity: list[str] = [
            self.class_names[k] for k in np.argsort(-self.pair_probs, kind="stable")
        ]
        self._radius = {s: max(SIZE_SCALE[s][0] * cfg.image_size, SIZE_SCALE[s][1]) for s in cfg.sizes}
        self._gap = max(1, cfg.image_size // 32)
        config_key = repr(tuple((f.name, getattr(cfg, f.name)) for f in fields(cfg)))
        self._config_digest = int.from_bytes(
            hashlib.blake2b(config_key.encode(), digest_size=8).digest(), "big"
        )

    # -------------------------------------------------------------------------------------------------- public API

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def scene(self, index: int, split: str = "train") -> Scene:
        if split not in _SPLIT_ID:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if index < 0:
            raise ValueError(f"scene index must be >= 0, got {index}")
        cfg = self.config
        rng = np.random.default_rng([self._config_digest, cfg.seed, _SPLIT_ID[split], index])
        layout = self._draw_layout(rng, split)
        radii = [self._radius[s] for s in layout.sizes]
        objects = []
        for (color, shape), size, center, r in zip(layout.pairs, layout.sizes, layout.centers, radii):
            mask = shape_mask(shape, center, r, cfg.image_size)
            objects.append(ShapeObject(color, shape, size, center, _bbox(mask), mask))
        image = self._paint(rng, objects)
        # Language draws from its own stream so changing question templates never changes the pixels.
        lang = np.random.default_rng([self._config_digest, cfg.seed, _SPLIT_ID[split], index, 1])
        main = objects[0]
        label = self.class_names.index(main.name)
        unique = [_unique_descs(objects, i) for i in range(len(objects))]
        return Scene(
            id=f"shapes_s{cfg.seed}_{split}_{index:07d}",
            split=split,
            index=index,
            image=image,
            objects=objects,
            caption=self._caption(objects, radii),
            vqa=self._vqa(lang, objects, radii, unique),
            pope=self._pope(lang, objects),
            refexps=[
                RefExp(f"the {d.text()}", i, objects[i].mask)
                for i in range(len(objects))
                for d in _refexp_descs(objects[i], unique[i])
            ],
            label=label,
            label_name=self.class_names[label],
            background=cfg.background,
        )

    def resample_vqa(self, scene: Scene, draw: int) -> list[QA]:
        """Another draw of ``scene``'s questions: the same generator as ``scene.vqa`` on language stream ``draw``.

        ``draw`` >= 1 (draw 0 is ``scene.vqa`` itself). Each draw picks other objects and other referring phrases, so
        a training set can hold more questions of a kind per image than the one per kind a scene lists.
        """
        if draw < 1:
            raise ValueError(f"draw must be >= 1 (draw 0 is scene.vqa), got {draw}")
        cfg = self.config
        lang = np.random.default_rng([self._config_digest, cfg.seed, _SPLIT_ID[scene.split], scene.index, 1, draw])
        objects = scene.objects
        radii = [self._radius[o.size] for o in objects]
        unique = [_unique_descs(objects, i) for i in range(len(objects))]
        return self._vqa(lang, objects, radii, unique)

    def spatial_questions(self, scene: Scene) -> list[QA]:
        """Every question about where things are that ``scene`` answers unambiguously, in the templates of ``scene.vqa``.

        For training data only. A scene lists at most one position question (a 1-object scene is the only one asked
        where its object sits in the image) and seldom a colour / shape question whose object is named by its place.
        Here: every uniquely named object's side of the image on each axis where it is clearly off-centre (the rule
        of ``scene.vqa``: at least an eighth of the image), every clear relation between two uniquely named objects
        (the rule of ``scene.vqa``), and the colour and shape of every object that a phrase with a position word
        ("the object on the left", "the circle at the top") names alone.
        """
        objects = scene.objects
        names = [o.name for o in objects]
        named = [i for i, n in enumerate(names) if names.count(n) == 1]
        half, clear = self.config.image_size / 2, self.config.image_size / 8
        qas: list[QA] = []
        for i in named:
            o = objects[i]
            dx, dy = o.center[0] + 0.5 - half, o.center[1] + 0.5 - half
            if abs(dx) >= clear:
                side = "left" if dx < 0 else "right"
                qas.append(QA(f"Is the {o.name} on the left or on the right of the image?", side, "position"))
            if abs(dy) >= clear:
                side = "above" if dy < 0 else "below"
                qas.append(QA(f"Is the {o.name} above or below the center of the image?", side, "position"))
        for a in named:
            for b in named:
                if a == b:
                    continue
                horizontal, vertical = _relation(objects[a], objects[b], self._radius[objects[a].size],
                                                 self._radius[objects[b].size])
                if horizontal:
                    qas.append(QA(f"Is the {names[a]} to the left or to the right of the {names[b]}?", horizontal,
                                  "position"))
                if vertical:
                    qas.append(QA(f"Is the {names[a]} above or below the {names[b]}?", vertical, "position"))
        for i, o in enumerate(objects):
            for d in _unique_descs(objects, i):
                if d.position is None:
                    continue
                if d.color is None:
                    qas.append(QA(f"What color is the {d.text()}?", o.color, "color"))
                if d.shape is None:
                    qas.append(QA(f"What shape is the {d.text()}?", o.shape, "shape"))
        return qas

    def scenes(self, split: str, n: int, start: int = 0) -> list[Scene]:
        return [self.scene(i, split) for i in range(start, start + n)]

    def iter_scenes(self, split: str, n: int | None = None, start: int = 0) -> Iterator[Scene]:
        """Lazily yield scenes ``start, start+1, ...`` (forever when ``n`` is None)."""
        stop = None if n is None else start + n
        for i in itertools.count(start):
            if stop is not None and i >= stop:
                return
            yield self.scene(i, split)

    def split_of_layout(self, layout_key: str) -> str:
        """The split that owns a layout key (exposed for tests and for checking external data)."""
        bucket = int.from_bytes(hashlib.blake2b(layout_key.encode(), digest_size=8).digest(), "big") % 100
        return next(s for s, (lo, hi) in _SPLIT_BUCKETS.items() if lo <= bucket < hi)

    @staticmethod
    def layout_key(scene: Scene) -> str:
        return repr(tuple((o.color, o.shape, o.size, o.center) for o in scene.objects))

    # -------------------------------------------------------------------------------------------------- layout

    def _draw_layout(self, rng: np.random.Generator, split: str) -> _Layout:
        cfg = self.config
        # The object count is drawn once: redrawing it when placement fails would favour fewer objects.
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        for _ in range(_MAX_CANDIDATES):
            picks = rng.choice(len(self.pairs), size=n, replace=False, p=self.pair_probs)
            pairs = tuple(self.pairs[k] for k in picks)
            sizes = tuple(cfg.sizes[k] for k in rng.integers(0, len(cfg.sizes), size=n))
            centers = self._place(rng, sizes)
            if centers is None:
                continue
            key = repr(tuple((c, s, z, xy) for (c, s), z, xy in zip(pairs, sizes, centers)))
            if self.split_of_layout(key) == split:
                return _Layout(pairs, sizes, centers)
        raise RuntimeError(
            f"could not place {n} objects of sizes {cfg.sizes} in a {cfg.image_size}px image; "
            "lower max_objects, use smaller sizes or a larger image_size"
        )

    def _place(self, rng: np.random.Generator, sizes: Sequence[str]) -> tuple[tuple[int, int], ...] | None:
        """Integer centres whose bounding squares keep a gap from each other and the border; None if stuck.

        Each centre is drawn uniformly from all positions still free (computed on the pixel grid), largest object
        first so that crowded scenes rarely get stuck; the returned order is that of ``sizes``.
        """
        size_px = self.config.image_size
        grid = np.arange(size_px)
        placed: dict[int, tuple[int, int, float]] = {}
        for k in sorted(range(len(sizes)), key=lambda k: -self._radius[sizes[k]]):
            r = self._radius[sizes[k]]
            # Keep the same gap from the border as between objects, so no shape touches the frame.
            lo, hi = math.ceil(r) + self._gap, size_px - 1 - math.ceil(r) - self._gap
            axis_ok = (grid >= lo) & (grid <= hi)
            free = axis_ok[None, :] & axis_ok[:, None]  # [y, x]
            for px, py, pr in placed.values():
                need = r + pr + self._gap
                free &= (np.abs(grid - px) >= need)[None, :] | (np.abs(grid - py) >= need)[:, None]
            ys, xs = np.nonzero(free)
            if len(xs) == 0:
                return None
            j = int(rng.integers(len(xs)))
            placed[k] = (int(xs[j]), int(ys[j]), r)
        return tuple(placed[k][:2] for k in range(len(sizes)))

    # -------------------------------------------------------------------------------------------------- pixels

    def _paint(self, rng: np.random.Generator, objects: Sequence[ShapeObject]) -> Image.Image:
        cfg = self.config
        s = cfg.image_size
        if cfg.background == "plain":
            grey = np.full((s, s), _PLAIN_GREY, dtype=np.float64)
        elif cfg.background == "noise":
            grey = _PLAIN_GREY + 18.0 * rng.standard_normal((s, s))
        else:  # gradient: a linear ramp between two greys in a random direction
            a, b = rng.uniform(80, 160, size=2)
            theta = rng.uniform(0, 2 * math.pi)
            t = (np.arange(s) + 0.5) / s
            proj = math.cos(theta) * t[None, :] + math.sin(theta) * t[:, None]
            proj = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-9)
            grey = a + (b - a) * proj
        canvas = np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        for _ in range(cfg.clutter):
            # Thin neutral strokes: visual noise that is never a palette colour and never an object.
            x0, y0 = rng.uniform(0, s, size=2)
            length = rng.uniform(0.1, 0.3) * s
            theta = rng.uniform(0, math.pi)
            half_w = max(0.5, s / 96)
            dx, dy = math.cos(theta), math.sin(theta)
            nx, ny = -dy * half_w, dx * half_w
            x1, y1 = x0 + dx * length, y0 + dy * length
            poly = np.array([[x0 + nx, y0 + ny], [x1 + nx, y1 + ny], [x1 - nx, y1 - ny], [x0 - nx, y0 - ny]])
            xs = (np.arange(s) + 0.5)[None, :]
            ys = (np.arange(s) + 0.5)[:, None]
            stroke = _polygon_mask(xs, ys, poly)
            canvas[stroke] = int(rng.choice([40, 70, 190, 215]))
        for o in objects:
            canvas[o.mask] = COLOR_RGB[o.color]
        return Image.fromarray(canvas, mode="RGB")

    # -------------------------------------------------------------------------------------------------- language

    def _caption(self, objects: Sequence[ShapeObject], radii: Sequence[float]) -> str:
        phrases = [_article(f"{o.size} {o.color} {o.shape}") for o in objects]
        if len(objects) == 1:
            return f"{phrases[0]}."
        if len(objects) == 2:
            horizontal, vertical = _relation(objects[0], objects[1], radii[0], radii[1])
            rel = horizontal or vertical
            assert rel is not None  # placement keeps every pair apart on some axis
            return f"{phrases[0]} {_RELATION_PHRASE[rel]} {phrases[1]}."
        order = sorted(range(len(objects)), key=lambda i: (objects[i].center[0], objects[i].center[1]))
        listed = ", ".join(phrases[i] for i in order[:-1]) + f" and {phrases[order[-1]]}"
        # "from left to right" only when each next object is clearly to the right of the previous one.
        apart = all(
            objects[b].center[0] - objects[a].center[0] >= radii[a] + radii[b]
            for a, b in zip(order, order[1:])
        )
        return f"{listed}, from left to right." if apart else f"{listed}."

    def _vqa(
        self,
        rng: np.random.Generator,
        objects: Sequence[ShapeObject],
        radii: Sequence[float],
        unique: Sequence[Sequence[_Desc]],
    ) -> list[QA]:
        """``unique[i]``: the phrases naming object i alone (from ``_unique_descs``)."""
        cfg = self.config
        qas: list[QA] = []
        order = [int(i) for i in rng.permutation(len(objects))]

        # colour: ask about an object through a phrase that does not give its colour away
        for i in order:
            descs = [d for d in unique[i] if d.color is None]
            if descs:
                d = descs[int(rng.integers(len(descs)))]
                qas.append(QA(f"What color is the {d.text()}?", objects[i].color, "color"))
                break
        # shape: likewise without the shape
        for i in order[::-1]:
            descs = [d for d in unique[i] if d.shape is None]
            if descs:
                d = descs[int(rng.integers(len(descs)))]
                qas.append(QA(f"What shape is the {d.text()}?", objects[i].shape, "shape"))
                break
        # count: of everything, of a colour or of a shape (the latter two may be zero)
        what = int(rng.integers(3))
        if what == 0:
            qas.append(QA("How many objects are there?", str(len(objects)), "count"))
        elif what == 1:
            # Mostly a colour that is present, else "0" would be most answers.
            pick = objects[int(rng.integers(len(objects)))].color
            color = pick if rng.random() < 0.75 else cfg.colors[int(rng.integers(len(cfg.colors)))]
            n = sum(o.color == color for o in objects)
            qas.append(QA(f"How many {color} objects are there?", str(n), "count"))
        else:
            pick = objects[int(rng.integers(len(objects)))].shape
            shape = pick if rng.random() < 0.75 else cfg.shapes[int(rng.integers(len(cfg.shapes)))]
            n = sum(o.shape == shape for o in objects)
            qas.append(QA(f"How many {_plural(shape)} are there?", str(n), "count"))
        # position: relative to another object, or (single object) within the image
        if len(objects) >= 2:
            a, b = (int(k) for k in rng.choice(len(objects), size=2, replace=False))
            horizontal, vertical = _relation(objects[a], objects[b], radii[a], radii[b])
            na, nb = objects[a].name, objects[b].name
            if horizontal and (not vertical or rng.random() < 0.5):
                qas.append(
                    QA(f"Is the {na} to the left or to the right of the {nb}?", horizontal, "position")
                )
            elif vertical:
                qas.append(QA(f"Is the {na} above or below the {nb}?", vertical, "position"))
        else:
            o, half = objects[0], cfg.image_size / 2
            dx, dy = o.center[0] + 0.5 - half, o.center[1] + 0.5 - half
            if abs(dx) >= abs(dy) and abs(dx) >= cfg.image_size / 8:
                side = "left" if dx < 0 else "right"
                qas.append(QA(f"Is the {o.name} on the left or on the right of the image?", side, "position"))
            elif abs(dy) >= cfg.image_size / 8:
                side = "above" if dy < 0 else "below"
                qas.append(QA(f"Is the {o.name} above or below the center of the image?", side, "position"))
        # existence: exactly one yes and one no per scene, in random order
        present = {o.name for o in objects}
        absent = [c for c in self.class_names if c not in present]
        yes = objects[int(rng.integers(len(objects)))].name
        no = absent[int(rng.integers(len(absent)))]
        pair = [
            QA(f"Is there {_article(yes)} in the image?", "yes", "exist"),
            QA(f"Is there {_article(no)} in the image?", "no", "exist"),
        ]
        qas.extend(pair if rng.random() < 0.5 else pair[::-1])
        return qas

    def _pope(self, rng: np.random.Generator, objects: Sequence[ShapeObject]) -> list[PopeProbe]:
        """For each strategy: every present object ("yes") and as many absent pairs ("no")."""
        present = [o.name for o in objects]
        absent = [c for c in self.class_names if c not in present]
        k = len(present)
        probes: list[PopeProbe] = []
        for strategy in POPE_STRATEGIES:
            if strategy == "random":
                negatives = [absent[j] for j in rng.choice(len(absent), size=k, replace=False)]
            elif strategy == "popular":
                negatives = [c for c in self.popularity if c not in present][:k]
            else:
                # Absent pairs that share a colour or a shape with something present (the confusable ones, as
                # POPE's adversarial split takes objects that co-occur with the present ones); topped up at random.
                colors = {o.color for o in objects}
                shapes = {o.shape for o in objects}
                near = [c for c in absent if c.split(" ")[0] in colors or c.split(" ")[1] in shapes]
                take = min(k, len(near))
                negatives = [near[j] for j in rng.choice(len(near), size=take, replace=False)]
                rest = [c for c in absent if c not in negatives]
                negatives += [rest[j] for j in rng.choice(len(rest), size=k - take, replace=False)]
            items = [(t, "yes") for t in present] + [(t, "no") for t in negatives]
            for j in rng.permutation(len(items)):
                target, answer = items[int(j)]
                probes.append(
                    PopeProbe(f"Is there {_article(target)} in the image?", answer, strategy, target)
                )
        return probes


# ----------------------------------------------------------------------------------------------------------------
# Looking at the world.
# ----------------------------------------------------------------------------------------------------------------


def render_grid(scenes: Sequence[Scene], path: str | Path, cols: int = 4, cell: int = 160) -> Path:
    """Save a contact sheet: each scene upscaled (nearest) to ``cell`` px with its caption and id underneath."""
    font = ImageFont.load_default()
    text_h = 46
    rows = math.ceil(len(scenes) / cols)
    sheet = Image.new("RGB", (cols * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, scene in enumerate(scenes):
        x = 8 + (k % cols) * (cell + 8)
        y = 8 + (k // cols) * (cell + text_h + 8)
        sheet.paste(scene.image.resize((cell, cell), Image.NEAREST), (x, y))
        lines = _wrap(scene.caption, font, cell) + [scene.id]
        for j, line in enumerate(lines[:4]):
            draw.text((x, y + cell + 2 + 11 * j), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return [*lines, line] if line else lines


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m data.shapes --out grid.png [WorldConfig fields]``: render a contact sheet of scenes."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Render a contact sheet of synthetic scenes with their captions."
    )
    parser.add_argument("--out", default="shapes_grid.png")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("-n", type=int, default=16, help="number of scenes")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=3)
    parser.add_argument("--background", default="plain", choices=BACKGROUNDS)
    parser.add_argument("--clutter", type=int, default=0)
    args = parser.parse_args(argv)
    world = ShapesWorld(
        WorldConfig(
            image_size=args.image_size,
            seed=args.seed,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            background=args.background,
            clutter=args.clutter,
        )
    )
    path = render_grid(world.scenes(args.split, args.n), args.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
