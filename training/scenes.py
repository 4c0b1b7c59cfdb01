"""Deterministic generator and renderer of simple shape scenes, with English and Chinese captions.

This is the data side of the Twig demo model: pictures of 1-4 flat coloured shapes (circle, square, triangle,
star, ring, cross, diamond) on a plain or two-tone background, with counts, absolute positions and pairwise
relations. Every scene is a small JSON-serialisable dataclass, so an evaluator knows the ground truth of each
prompt, and every scene comes with several aligned English/Chinese captions (short prompts up to long,
multi-sentence descriptions).

Design rules that keep the ground truth measurable from pixels:
  * every group of objects in a scene has its own colour (colours are unique per scene);
  * the background colours never equal an object colour of the same scene;
  * objects never overlap and keep a margin from the picture border;
  * only groups with count 1 carry an absolute position or take part in a relation.

Coordinates are normalised to [0, 1] (x to the right, y downwards); a radius is half the side of the shape's
bounding square, also as a fraction of the picture side. Randomness comes only from `numpy.random.default_rng`
seeded with (seed, index), so the same seed gives the same scenes, captions and pixels on every machine.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from twig_core.errors import TwigError

# --------------------------------------------------------------------------------------------------------------
# Vocabulary of the scenes
# --------------------------------------------------------------------------------------------------------------

#: Colours, chosen far apart in RGB (the closest pair, red/orange and orange/yellow, is > 100 apart).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 30),
    "orange": (250, 128, 0),
    "yellow": (250, 230, 40),
    "green": (30, 170, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 70, 220),
    "purple": (160, 40, 210),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
#: Colours an object may have (gray is background-only: it is what blends of other colours look like).
OBJECT_COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white", "black")
BACKGROUND_COLORS: tuple[str, ...] = COLOR_NAMES

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "diamond")

#: Radius (half of the bounding-square side) per size word, as a fraction of the picture side.
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.125, "large": 0.165}
SIZE_JITTER = 0.08  # radius is multiplied by U(1 - j, 1 + j)

#: Absolute positions: allowed range of the object centre (x range, y range), before the border margin.
_LO, _HI, _MID, _BAND, _ANY = (0.0, 0.36), (0.64, 1.0), (0.42, 0.58), (0.25, 0.75), (0.0, 1.0)
POSITIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left": (_LO, _BAND),
    "right": (_HI, _BAND),
    "top": (_BAND, _LO),
    "bottom": (_BAND, _HI),
    "center": (_MID, _MID),
    "top_left": (_LO, _LO),
    "top_right": (_HI, _LO),
    "bottom_left": (_LO, _HI),
    "bottom_right": (_HI, _HI),
}
#: Pairwise relations "subject <relation> object".
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
INVERSE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}

BACKGROUND_SPLITS: tuple[str, ...] = ("none", "top_bottom", "left_right")

SCENE_KINDS: dict[str, float] = {  # kind -> sampling weight
    "single": 0.20,  # one object, with or without an absolute position
    "count": 0.20,  # 2-4 objects of one colour and shape ("three red circles")
    "pair_relation": 0.20,  # "a green star above a yellow triangle"
    "pair_position": 0.15,  # "a red circle on the left and a blue square on the right"
    "multi": 0.10,  # 3-4 single objects at distinct positions
    "count_pair": 0.15,  # "two yellow stars and a blue ring"
}

BORDER_MARGIN = 0.04  # empty band between objects and the picture border
OBJECT_GAP = 0.035  # minimum empty gap between two objects (between their bounding circles)
RELATION_MIN_OFFSET = 0.28  # generation: main-axis centre offset of a relation pair
RELATION_MAX_CROSS = 0.12  # generation: cross-axis centre offset of a relation pair

DATASET_VERSION = 2


# --------------------------------------------------------------------------------------------------------------
# Scene dataclasses
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One drawn object: centre and radius, normalised to the picture side."""

    cx: float
    cy: float
    r: float


@dataclass
class Group:
    """`count` objects sharing shape, colour and size; `position` only when count == 1."""

    shape: str
    color: str
    count: int = 1
    size: str = "medium"
    position: str | None = None
    instances: list[Instance] = field(default_factory=list)


@dataclass
class Relation:
    """groups[subject] <relation> groups[object], e.g. (0, "above", 1)."""

    subject: int
    relation: str
    object: int


@dataclass
class Background:
    """colors: one colour for split "none"; for "top_bottom" [top, bottom]; for "left_right" [left, right]."""

    colors: list[str]
    split: str = "none"


@dataclass
class Scene:
    kind: str
    groups: list[Group]
    background: Background
    relation: Relation | None = None

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        try:
            groups = [
                Group(
                    shape=g["shape"],
                    color=g["color"],
                    count=int(g.get("count", 1)),
                    size=g.get("size", "medium"),
                    position=g.get("position"),
                    instances=[Instance(**i) for i in g.get("instances", [])],
                )
                for g in d["groups"]
            ]
            bg = Background(colors=list(d["background"]["colors"]), split=d["background"].get("split", "none"))
            rel = Relation(**d["relation"]) if d.get("relation") else None
            scene = cls(kind=d["kind"], groups=groups, background=bg, relation=rel)
        except (KeyError, TypeError) as e:
            raise TwigError(f"scene dict: missing or malformed field ({e!r})") from e
        scene.validate()
        return scene

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Scene":
        return cls.from_dict(json.loads(s))

    def copy(self) -> "Scene":
        return copy.deepcopy(self)

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def key(self) -> str:
        """Canonical composition: everything that every caption of the scene states (objects, counts, positions,
        relation) and nothing that some captions leave out (size, background, exact placement). Scenes with the
        same key can share a short caption, so the train/held-out split is made on this key."""
        parts = []
        for g in sorted(self.groups, key=lambda g: g.color):
            parts.append(f"{g.count}x{g.color}-{g.shape}" + (f"@{g.position}" if g.position else ""))
        if self.relation is not None:
            a, b = self.groups[self.relation.subject], self.groups[self.relation.object]
            rel = self.relation.relation
            if rel in ("right_of", "below"):  # canonical direction
                a, b, rel = b, a, INVERSE_RELATION[rel]
            parts.append(f"{a.color}-{a.shape}|{rel}|{b.color}-{b.shape}")
        return ";".join(parts)

    def validate(self) -> None:
        """Raise TwigError if the scene breaks a rule the evaluator relies on."""
        if not self.groups:
            raise TwigError("scene: no groups")
        if self.kind not in SCENE_KINDS:
            raise TwigError(f"scene.kind: unknown kind {self.kind!r}")
        colors = [g.color for g in self.groups]
        if len(set(colors)) != len(colors):
            raise TwigError(f"scene.groups: colours must be unique per scene, got {colors}")
        for i, g in enumerate(self.groups):
            if g.shape not in SHAPES:
                raise TwigError(f"scene.groups[{i}].shape: unknown shape {g.shape!r}")
            if g.color not in OBJECT_COLORS:
                raise TwigError(f"scene.groups[{i}].color: not an object colour {g.color!r}")
            if g.size not in SIZES:
                raise TwigError(f"scene.groups[{i}].size: unknown size {g.size!r}")
            if not 1 <= g.count <= 4:
                raise TwigError(f"scene.groups[{i}].count: must be 1..4, got {g.count}")
            if g.position is not None and (g.position not in POSITIONS or g.count != 1):
                raise TwigError(f"scene.groups[{i}].position: {g.position!r} (only count-1 groups, known names)")
            if g.instances and len(g.instances) != g.count:
                raise TwigError(f"scene.groups[{i}].instances: {len(g.instances)} instances for count {g.count}")
        bg = self.background
        if bg.split not in BACKGROUND_SPLITS:
            raise TwigError(f"scene.background.split: unknown split {bg.split!r}")
        want = 1 if bg.split == "none" else 2
        if len(bg.colors) != want or len(set(bg.colors)) != want:
            raise TwigError(f"scene.background.colors: need {want} distinct colours for split {bg.split!r}")
        for c in bg.colors:
            if c not in BACKGROUND_COLORS:
                raise TwigError(f"scene.background.colors: unknown colour {c!r}")
            if c in colors:
                raise TwigError(f"scene.background.colors: {c!r} is also an object colour")
        if self.relation is not None:
            r = self.relation
            if r.relation not in RELATIONS:
                raise TwigError(f"scene.relation.relation: unknown relation {r.relation!r}")
            n = len(self.groups)
            if not (0 <= r.subject < n and 0 <= r.object < n and r.subject != r.object):
                raise TwigError("scene.relation: subject/object must be two different group indices")
            if self.groups[r.subject].count != 1 or self.groups[r.object].count != 1:
                raise TwigError("scene.relation: related groups must have count 1")


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, seq, p=None):
    seq = list(seq)
    return seq[int(rng.choice(len(seq), p=p))]


def _rand_range(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * rng.random())


def _centre_range(rng_range: tuple[float, float], r: float) -> tuple[float, float] | None:
    lo = max(rng_range[0], r + BORDER_MARGIN)
    hi = min(rng_range[1], 1.0 - r - BORDER_MARGIN)
    return (lo, hi) if lo <= hi else None


def _fits(inst: Instance, placed: list[Instance]) -> bool:
    for o in placed:
        if math.hypot(inst.cx - o.cx, inst.cy - o.cy) < inst.r + o.r + OBJECT_GAP:
            return False
    return True


def _place_one(rng, r: float, xr, yr, placed: list[Instance], tries: int = 60) -> Instance | None:
    xs, ys = _centre_range(xr, r), _centre_range(yr, r)
    if xs is None or ys is None:
        return None
    for _ in range(tries):
        inst = Instance(round(_rand_range(rng, *xs), 4), round(_rand_range(rng, *ys), 4), round(r, 4))
        if _fits(inst, placed):
            return inst
    return None


def _radius(rng, size: str) -> float:
    return SIZES[size] * _rand_range(rng, 1.0 - SIZE_JITTER, 1.0 + SIZE_JITTER)


def layout_scene(scene: Scene, rng: np.random.Generator, attempts: int = 20) -> Scene:
    """(Re)place every object of `scene` in place, e.g. after editing a count; returns the scene."""
    for _ in range(attempts):
        if _layout(rng, scene):
            scene.validate()
            return scene
    raise TwigError("layout_scene: could not place the objects without overlap")


def _layout(rng: np.random.Generator, scene: Scene) -> bool:
    """Fill in instances for every group; False if the random layout failed (caller resamples)."""
    placed: list[Instance] = []
    for g in scene.groups:
        g.instances = []
    rel = scene.relation
    order = list(range(len(scene.groups)))
    if rel is not None:  # place the related pair first, the subject before the object
        order = [rel.subject, rel.object] + [i for i in order if i not in (rel.subject, rel.object)]
    for gi in order:
        g = scene.groups[gi]
        if rel is not None and gi == rel.object:
            a = scene.groups[rel.subject].instances[0]
            r = _radius(rng, g.size)
            inst = None
            for _ in range(60):
                d = _rand_range(rng, RELATION_MIN_OFFSET, 0.7)
                cross = _rand_range(rng, -RELATION_MAX_CROSS, RELATION_MAX_CROSS)
                # subject <rel> object  ->  object is on the opposite side of the subject
                dx, dy = {"left_of": (d, cross), "right_of": (-d, cross), "above": (cross, d), "below": (cross, -d)}[
                    rel.relation
                ]
                cand = Instance(round(a.cx + dx, 4), round(a.cy + dy, 4), round(r, 4))
                inside = r + BORDER_MARGIN <= cand.cx <= 1 - r - BORDER_MARGIN and (
                    r + BORDER_MARGIN <= cand.cy <= 1 - r - BORDER_MARGIN
                )
                if inside and _fits(cand, placed):
                    inst = cand
                    break
            if inst is None:
                return False
            g.instances.append(inst)
            placed.append(inst)
            continue
        xr, yr = POSITIONS[g.position] if g.position else (_ANY, _ANY)
        for _ in range(g.count):
            inst = _place_one(rng, _radius(rng, g.size), xr, yr, placed)
            if inst is None:
                return False
            g.instances.append(inst)
            placed.append(inst)
    return True


_SIZE_WEIGHTS = {"small": 0.3, "medium": 0.4, "large": 0.3}


def _sample_size(rng, allow_large: bool = True) -> str:
    names = list(_SIZE_WEIGHTS) if allow_large else ["small", "medium"]
    w = np.array([_SIZE_WEIGHTS[n] for n in names])
    return _choice(rng, names, p=w / w.sum())


def _sample_background(rng, object_colors: Iterable[str]) -> Background:
    allowed = [c for c in BACKGROUND_COLORS if c not in set(object_colors)]
    w = np.array([2.0 if c in ("white", "black", "gray") else 1.0 for c in allowed])
    w /= w.sum()
    split = _choice(rng, BACKGROUND_SPLITS, p=[0.7, 0.15, 0.15])
    if split == "none":
        return Background([_choice(rng, allowed, p=w)], "none")
    idx = rng.choice(len(allowed), size=2, replace=False, p=w)
    return Background([allowed[int(i)] for i in idx], split)


def sample_scene(rng: np.random.Generator, kind: str | None = None) -> Scene:
    """Draw one random scene (with layout) from `rng`. `kind` forces a scene kind (see SCENE_KINDS)."""
    kinds = list(SCENE_KINDS)
    probs = np.array([SCENE_KINDS[k] for k in kinds])
    if kind is not None and kind not in SCENE_KINDS:
        raise TwigError(f"sample_scene: unknown kind {kind!r}")
    k = kind or _choice(rng, kinds, p=probs / probs.sum())  # drawn once: failed layouts must not bias kinds

    def shapes(n: int) -> list[str]:
        return [_choice(rng, SHAPES) for _ in range(n)]

    def colors(n: int) -> list[str]:  # distinct per scene
        return [OBJECT_COLORS[int(i)] for i in rng.choice(len(OBJECT_COLORS), size=n, replace=False)]

    for _attempt in range(100):
        relation = None
        if k == "single":
            pos = _choice(rng, [None] + list(POSITIONS), p=[0.3] + [0.7 / len(POSITIONS)] * len(POSITIONS))
            groups = [Group(shapes(1)[0], colors(1)[0], 1, _sample_size(rng), pos)]
        elif k == "count":
            n = int(rng.integers(2, 5))
            groups = [Group(shapes(1)[0], colors(1)[0], n, _sample_size(rng, allow_large=n <= 3))]
        elif k == "pair_relation":
            sh, co = shapes(2), colors(2)
            groups = [Group(sh[i], co[i], 1, _sample_size(rng)) for i in range(2)]
            relation = Relation(0, _choice(rng, RELATIONS), 1)
        elif k == "pair_position":
            pos = _choice(rng, [("left", "right"), ("top", "bottom"), ("top_left", "bottom_right"),
                                ("top_right", "bottom_left")])
            if rng.random() < 0.5:
                pos = pos[::-1]
            sh, co = shapes(2), colors(2)
            groups = [Group(sh[i], co[i], 1, _sample_size(rng), pos[i]) for i in range(2)]
        elif k == "multi":
            pos = _choice(rng, [("left", "center", "right"), ("top", "center", "bottom"),
                                ("top_left", "top_right", "bottom_left", "bottom_right"),
                                ("top_left", "top_right", "bottom")])
            n = len(pos)
            sh, co = shapes(n), colors(n)
            groups = [Group(sh[i], co[i], 1, _sample_size(rng, allow_large=False), pos[i]) for i in range(n)]
        else:  # count_pair
            n = int(rng.integers(2, 4))
            sh, co = shapes(2), colors(2)
            groups = [Group(sh[0], co[0], n, _sample_size(rng, allow_large=False)),
                      Group(sh[1], co[1], 1, _sample_size(rng))]
            if rng.random() < 0.5:
                groups = groups[::-1]
        scene = Scene(k, groups, _sample_background(rng, [g.color for g in groups]), relation)
        if _layout(rng, scene):
            scene.validate()
            return scene
    raise TwigError("sample_scene: could not lay out a scene in 100 attempts")  # pragma: no cover


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices (pixel units) for polygonal shapes; None for circle/ring (drawn as ellipses)."""
    if shape == "square":
        s = 0.86 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.85 * r, cy), (cx, cy + r), (cx - 0.85 * r, cy)]
    if shape == "triangle":  # upright, roughly equilateral, vertically centred on its bounding box
        return [(cx, cy - 0.9 * r), (cx + r, cy + 0.83 * r), (cx - r, cy + 0.83 * r)]
    if shape == "star":  # five points, point up; inner radius 0.5 keeps the arms thick
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.5 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.05 * r + rad * math.sin(a)))
        return pts
    if shape == "cross":  # plus sign, arm thickness 0.64 r
        t, s = 0.32 * r, 0.95 * r
        return [(cx - t, cy - s), (cx + t, cy - s), (cx + t, cy - t), (cx + s, cy - t), (cx + s, cy + t),
                (cx + t, cy + t), (cx + t, cy + s), (cx - t, cy + s), (cx - t, cy + t), (cx - s, cy + t),
                (cx - s, cy - t), (cx - t, cy - t)]
    return None


RING_INNER = 0.55  # inner radius of a ring, relative to its outer radius


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, hole_fill=None) -> None:
    """Draw one shape in pixel units. `hole_fill` paints the ring hole (background colour for a solid picture);
    None leaves the hole untouched (used when the caller draws on a mask over the background)."""
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        if shape == "ring":
            ri = RING_INNER * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=hole_fill)
        return
    poly = shape_polygon(shape, cx, cy, r)
    if poly is None:
        raise TwigError(f"draw_shape: unknown shape {shape!r}")
    draw.polygon(poly, fill=fill)


def _background_image(bg: Background, n: int, palette: dict = PALETTE) -> Image.Image:
    img = Image.new("RGB", (n, n), palette[bg.colors[0]])
    if bg.split != "none":
        d = ImageDraw.Draw(img)
        if bg.split == "top_bottom":
            d.rectangle([0, n // 2, n, n], fill=palette[bg.colors[1]])
        else:
            d.rectangle([n // 2, 0, n, n], fill=palette[bg.colors[1]])
    return img


def render_scene(scene: Scene, size: int = 128, supersample: int = 4, palette: dict = PALETTE) -> np.ndarray:
    """Render to uint8 [size, size, 3]. Antialiasing: draw at size*supersample, then box-downsample.
    ``palette``: colour name -> RGB (another palette paints a colour name in other pixels)."""
    if size < 16:
        raise TwigError(f"render_scene: size must be >= 16, got {size}")
    n = size * max(1, int(supersample))
    bg = _background_image(scene.background, n, palette)
    # Objects are drawn as an opaque layer over the background through a mask, so a ring hole shows the
    # background (also across a two-tone split).
    layer = Image.new("RGB", (n, n), (0, 0, 0))
    mask = Image.new("L", (n, n), 0)
    dl, dm = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for g in scene.groups:
        for inst in g.instances:
            cx, cy, r = inst.cx * n, inst.cy * n, inst.r * n
            draw_shape(dl, g.shape, cx, cy, r, fill=palette[g.color], hole_fill=None)
            draw_shape(dm, g.shape, cx, cy, r, fill=255, hole_fill=0)
    img = Image.composite(layer, bg, mask)
    if n != size:
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------

_NOUN_EN = {
    "circle": ("circle", "circles"),
    "square": ("square", "squares"),
    "triangle": ("triangle", "triangles"),
    "star": ("star", "stars"),
    "ring": ("ring", "rings"),
    "cross": ("cross", "crosses"),
    "diamond": ("diamond", "diamonds"),
}
_NUM_EN = {1: "one", 2: "two", 3: "three", 4: "four"}
_SIZE_EN = {"small": "small", "medium": "medium-sized", "large": "large"}
_POS_EN = {
    "left": ["on the left", "on the left side"],
    "right": ["on the right", "on the right side"],
    "top": ["at the top", "near the top"],
    "bottom": ["at the bottom", "near the bottom"],
    "center": ["in the center", "in the middle"],
    "top_left": ["in the top left corner", "at the top left"],
    "top_right": ["in the top right corner", "at the top right"],
    "bottom_left": ["in the bottom left corner", "at the bottom left"],
    "bottom_right": ["in the bottom right corner", "at the bottom right"],
}
_REL_EN = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}

# Chinese nouns with their measure word.
_NOUN_ZH = {
    "circle": [("圆", "个"), ("圆形", "个")],
    "square": [("正方形", "个"), ("方块", "个")],
    "triangle": [("三角形", "个")],
    "star": [("星星", "颗"), ("五角星", "个")],
    "ring": [("圆环", "个")],
    "cross": [("十字", "个"), ("十字形", "个")],
    "diamond": [("菱形", "个")],
}
_COLOR_ZH = {"red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "cyan": "青色", "blue": "蓝色",
             "purple": "紫色", "white": "白色", "black": "黑色", "gray": "灰色"}
_NUM_ZH = {1: "一", 2: "两", 3: "三", 4: "四"}
_POS_ZH = {
    "left": ["左边", "左侧"],
    "right": ["右边", "右侧"],
    "top": ["上方", "上面"],
    "bottom": ["下方", "下面"],
    "center": ["中间", "正中间"],
    "top_left": ["左上角"],
    "top_right": ["右上角"],
    "bottom_left": ["左下角"],
    "bottom_right": ["右下角"],
}
_REL_ZH = {"left_of": ["左边", "左侧"], "right_of": ["右边", "右侧"], "above": ["上方", "上面"], "below": ["下方", "下面"]}

_INTRO = [
    ("A simple flat illustration.", "这是一张简洁的扁平风格插图。"),
    ("A minimalist picture of flat geometric shapes.", "一张由简单几何图形组成的极简图片。"),
    ("A clean vector-style image of simple shapes.", "这是一幅干净的矢量风格图形画。"),
]
_OUTRO = [
    ("The shapes are filled with solid colors and have no shading.", "图形都是纯色填充，没有阴影。"),
    ("Nothing else is in the picture.", "画面中没有其他东西。"),
    ("The edges are crisp and clean.", "图形边缘清晰干净。"),
]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class _Phraser:
    """Noun phrases for one scene with fixed per-group noun choices, so en/zh captions stay aligned."""

    def __init__(self, scene: Scene, rng: np.random.Generator):
        self.scene = scene
        self.rng = rng
        self.zh_noun = [_NOUN_ZH[g.shape][int(rng.integers(len(_NOUN_ZH[g.shape])))] for g in scene.groups]

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    # English ----------------------------------------------------------------------------------------------------
    def np_en(self, gi: int, size: bool) -> str:
        g = self.scene.groups[gi]
        adj = (f"{_SIZE_EN[g.size]} " if size else "") + g.color
        sing, plur = _NOUN_EN[g.shape]
        if g.count == 1:
            return f"{_a(adj)} {adj} {sing}"
        return f"{_NUM_EN[g.count]} {adj} {plur}"

    def pos_en(self, gi: int) -> str:
        return self.pick(_POS_EN[self.scene.groups[gi].position])

    # Chinese ----------------------------------------------------------------------------------------------------
    def np_zh(self, gi: int, size: bool, numeral: bool = True) -> str:
        g = self.scene.groups[gi]
        noun, mw = self.zh_noun[gi]
        color = _COLOR_ZH[g.color]
        if noun == "圆" and (not numeral or (size and g.size == "medium")):
            noun = "圆形"  # "红色圆形", not "红色圆", where no 的 separates colour and noun
        num = f"{_NUM_ZH[g.count]}{mw}" if numeral else ""
        if not size:
            return f"{num}{color}的{noun}" if numeral else f"{color}{noun}"
        if g.size == "small":
            return f"{num}{color}的小{noun}"
        if g.size == "large":
            return f"{num}{color}的大{noun}"
        return f"{num}中等大小的{color}{noun}"

    def pos_zh(self, gi: int) -> str:
        return self.pick(_POS_ZH[self.scene.groups[gi].position])

    # Background -------------------------------------------------------------------------------------------------
    def bg_phrase_en(self) -> str:
        bg = self.scene.background
        if bg.split == "none":
            c = bg.colors[0]
            return self.pick([f"on {_a(c)} {c} background", f"against a plain {c} background"])
        c0, c1 = bg.colors
        if bg.split == "top_bottom":
            return self.pick([f"on a background that is {c0} on the top and {c1} on the bottom",
                              f"on a two-tone background, {c0} above and {c1} below"])
        return self.pick([f"on a background that is {c0} on the left half and {c1} on the right half",
                          f"on a two-tone background, {c0} on the left and {c1} on the right"])

    def bg_prefix_zh(self) -> str:
        bg = self.scene.background
        z = [_COLOR_ZH[c] for c in bg.colors]
        if bg.split == "none":
            return self.pick([f"{z[0]}背景上，", f"在{z[0]}的背景上，"])
        if bg.split == "top_bottom":
            return f"上{z[0][0]}下{z[1][0]}的背景上，"
        return f"左{z[0][0]}右{z[1][0]}的背景上，"

    def bg_suffix_zh(self) -> str:
        bg = self.scene.background
        z = [_COLOR_ZH[c] for c in bg.colors]
        if bg.split == "none":
            return f"，背景是{z[0]}的"
        if bg.split == "top_bottom":
            return f"，背景上半部分是{z[0]}，下半部分是{z[1]}"
        return f"，背景左半边是{z[0]}，右半边是{z[1]}"

    def bg_sentence(self) -> tuple[str, str]:
        bg = self.scene.background
        z = [_COLOR_ZH[c] for c in bg.colors]
        if bg.split == "none":
            return f"The background is plain {bg.colors[0]}.", f"背景是纯{z[0]}的。"
        c0, c1 = bg.colors
        if bg.split == "top_bottom":
            return (f"The background is split horizontally: the top half is {c0} and the bottom half is {c1}.",
                    f"背景分为上下两部分，上半部分是{z[0]}，下半部分是{z[1]}。")
        return (f"The background is split vertically: the left half is {c0} and the right half is {c1}.",
                f"背景分为左右两半，左半边是{z[0]}，右半边是{z[1]}。")

    # Relation -----------------------------------------------------------------------------------------------------
    def relation_pair(self) -> tuple[int, int, str]:
        """(subject, object, relation) of the scene's relation, stated the other way round ("B below A" for
        "A above B") a third of the time.

        The captions (objects, long) then state the pair in one of two orders, the same in both languages:
        subject first ("A to the left of B", "A在B左边") or relation first ("to the left of B, A", "B的左边有A").
        With a causal text encoder only the words after the relation know it; in a subject-first Chinese caption
        those are the relation word alone, while relation-first captions let the subject's own words carry its
        place."""
        r = self.scene.relation
        a, b, rel = r.subject, r.object, r.relation
        if self.rng.random() < 0.35:
            a, b, rel = b, a, INVERSE_RELATION[rel]
        return a, b, rel

    # Object clause (short / medium) -------------------------------------------------------------------------------
    def objects(self, size: bool) -> tuple[str, str]:
        s = self.scene
        n = len(s.groups)
        if s.relation is not None:
            a, b, rel = self.relation_pair()
            rz = self.pick(_REL_ZH[rel])
            if self.rng.random() < 0.5:  # subject first: "A to the left of B", "A在B（的）左边"
                en = f"{self.np_en(a, size)} {_REL_EN[rel]} {self.np_en(b, size)}"
                zh = f"{self.np_zh(a, size)}在{self.np_zh(b, size, numeral=size)}{'' if size else '的'}{rz}"
            else:  # relation first: "to the left of B, A", "B的左边有A"
                en = f"{_REL_EN[rel]} {self.np_en(b, size)}, {self.np_en(a, size)}"
                zh = f"{self.np_zh(b, size, numeral=False)}的{rz}有{self.np_zh(a, size)}"
            return en, zh
        order = [int(i) for i in self.rng.permutation(n)] if self.rng.random() < 0.5 else list(range(n))
        if all(g.position for g in s.groups):
            parts_en = [f"{self.np_en(i, size)} {self.pos_en(i)}" for i in order]
            en = parts_en[0] if n == 1 else ", ".join(parts_en[:-1]) + " and " + parts_en[-1]
            if n == 1 and self.rng.random() < 0.3:
                en = f"{self.pos_en(0)}, {self.np_en(0, size)}"
            style = int(self.rng.integers(3))
            if style == 0:  # 左边一个红色的圆，右边一个蓝色的正方形
                zh = "，".join(f"{self.pos_zh(i)}{self.np_zh(i, size)}" for i in order)
            elif style == 1:  # 画面左边有一个红色的圆，右边有一个蓝色的正方形
                zh = "，".join(("画面" if k == 0 else "") + f"{self.pos_zh(i)}有{self.np_zh(i, size)}"
                              for k, i in enumerate(order))
            else:  # 一个红色的圆在画面左边，一个蓝色的正方形在右边
                zh = "，".join(f"{self.np_zh(i, size)}在" + ("画面" if k == 0 else "") + self.pos_zh(i)
                              for k, i in enumerate(order))
            return en, zh
        en = " and ".join(self.np_en(i, size) for i in order)
        zh = "和".join(self.np_zh(i, size) for i in order)
        return en, zh

    # Caption styles ---------------------------------------------------------------------------------------------
    def short(self) -> tuple[str, str]:
        en, zh = self.objects(size=False)
        if len(self.scene.groups) == 1 and not self.scene.groups[0].position and self.rng.random() < 0.3:
            zh = f"画面中有{zh}"
        return en, zh

    def medium(self) -> tuple[str, str]:
        en, zh = self.objects(size=True)
        if self.rng.random() < 0.5:
            en = f"{en}, {self.bg_phrase_en()}"
        else:
            en = f"{_cap(self.bg_phrase_en())}: {en}"
        if self.rng.random() < 0.5:
            zh = f"{self.bg_prefix_zh()}{zh}"
        else:
            zh = f"{zh}{self.bg_suffix_zh()}"
        return en, zh

    def long(self) -> tuple[str, str]:
        s = self.scene
        en_s, zh_s = [], []
        i_en, i_zh = self.pick(_INTRO)
        en_s.append(i_en)
        zh_s.append(i_zh)
        b_en, b_zh = self.bg_sentence()
        bg_first = self.rng.random() < 0.5
        if bg_first:
            en_s.append(b_en)
            zh_s.append(b_zh)
        related = set()
        if s.relation is not None:
            r = s.relation
            related = {r.subject, r.object}
            a, b, rel = self.relation_pair()
            rz = self.pick(_REL_ZH[rel])
            verb = "is" if s.groups[a].count == 1 else "are"
            if self.rng.random() < 0.5:
                en_s.append(_cap(f"{self.np_en(a, True)} {verb} {_REL_EN[rel]} {self.np_en(b, True)}."))
                zh_s.append(f"{self.np_zh(a, True)}在{self.np_zh(b, True)}{rz}。")
            else:
                en_s.append(f"{_cap(_REL_EN[rel])} {self.np_en(b, True)}, there {verb} {self.np_en(a, True)}.")
                zh_s.append(f"在{self.np_zh(b, True)}的{rz}，有{self.np_zh(a, True)}。")
        first = True
        for i, g in enumerate(s.groups):
            if i in related:
                continue
            if g.position:
                if self.rng.random() < 0.5:
                    en_s.append(f"There is {self.np_en(i, True)} {self.pos_en(i)}.")
                else:
                    en_s.append(f"{_cap(self.pos_en(i))}, there is {self.np_en(i, True)}.")
                if self.rng.random() < 0.5:
                    zh_s.append(f"画面{self.pos_zh(i)}有{self.np_zh(i, True)}。")
                else:
                    zh_s.append(f"{self.np_zh(i, True)}位于画面{self.pos_zh(i)}。")
            else:
                verb = "is" if g.count == 1 else "are"
                also_en = "" if first else " also"
                en_s.append(f"There {verb}{also_en} {self.np_en(i, True)}.")
                zh_s.append(f"画面中有{self.np_zh(i, True)}。" if first else f"还有{self.np_zh(i, True)}。")
            first = False
        if s.num_objects > 1:
            en_s.append(f"There are {_NUM_EN[s.num_objects]} shapes in total.")
            zh_s.append(f"画面中一共有{_NUM_ZH[s.num_objects]}个图形。")
        if not bg_first:
            en_s.append(b_en)
            zh_s.append(b_zh)
        if self.rng.random() < 0.7:
            o_en, o_zh = self.pick(_OUTRO)
            en_s.append(o_en)
            zh_s.append(o_zh)
        return " ".join(en_s), "".join(zh_s)


_RELATION_FIRST_EN = re.compile(r"(?:^|: |\. )(?:" + "|".join(_REL_EN.values()) + ") ", re.IGNORECASE)


def stated_order(caption_en: str) -> str | None:
    """How an English caption states its scene's relation: "relation" first ("To the left of B, there is A.",
    also at the start of a sentence or after "White background: "), "subject" first ("A is to the left of B"), or
    None when it states none. The Chinese translation uses the same order."""
    if _RELATION_FIRST_EN.search(caption_en):
        return "relation"
    low = caption_en.lower()
    return "subject" if any(f" {w} " in low for w in _REL_EN.values()) else None


#: Caption styles; "short" states objects, counts, positions and relations only; "medium" adds sizes and the
#: background; "long" is a multi-sentence description of everything.
CAPTION_STYLES: tuple[str, ...] = ("short", "medium", "long")
STYLE_MENTIONS_BACKGROUND = {"short": False, "medium": True, "long": True}


def make_captions(scene: Scene, rng: np.random.Generator,
                  styles: Iterable[str] = ("short", "short", "medium", "long")) -> list[dict[str, str]]:
    """Aligned caption pairs: [{"style", "en", "zh"}, ...], one per entry of `styles`."""
    out = []
    for st in styles:
        if st not in CAPTION_STYLES:
            raise TwigError(f"make_captions: unknown style {st!r}")
        p = _Phraser(scene, rng)
        en, zh = getattr(p, st)()
        out.append({"style": st, "en": en, "zh": zh})
    return out


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


def split_of_key(key: str, heldout_fraction: float = 0.1, salt: str = "twig-demo") -> str:
    """'heldout' or 'train', a stable hash of the composition key (independent of the seed)."""
    h = int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big")
    return "heldout" if (h % 100000) < heldout_fraction * 100000 else "train"


def iter_records(seed: int = 0, heldout_fraction: float = 0.1) -> Iterator[dict[str, Any]]:
    """Endless stream of scene records {"index", "id", "split", "key", "scene", "captions"} (no pixels)."""
    i = 0
    while True:
        rng = scene_rng(seed, i)
        scene = sample_scene(rng)
        key = scene.key()
        split = split_of_key(key, heldout_fraction)
        caps = make_captions(scene, rng)
        yield {"index": i, "id": f"{seed}-{i:07d}", "split": split, "key": key, "scene": scene.to_dict(),
               "captions": caps}
        i += 1


def generate_records(n_train: int, n_heldout: int, seed: int = 0,
                     heldout_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """Scene records for both splits. Train records may repeat a composition (different layout/size/background,
    which is augmentation); held-out records have unique compositions, none of which occurs in train."""
    train, held, held_keys = [], [], set()
    limit = 200 * (n_train + n_heldout) + 10000
    for rec in iter_records(seed, heldout_fraction):
        if len(train) >= n_train and len(held) >= n_heldout:
            break
        if rec["index"] > limit:
            raise TwigError(f"generate_records: could not fill the splits ({len(train)}/{n_train} train, "
                            f"{len(held)}/{n_heldout} held-out)")
        if rec["split"] == "train":
            if len(train) < n_train:
                train.append(rec)
        elif len(held) < n_heldout and rec["key"] not in held_keys:
            held_keys.add(rec["key"])
            held.append(rec)
    return train, held


def render_records(records: list[dict], size: int = 128, supersample: int = 4) -> np.ndarray:
    out = np.empty((len(records), size, size, 3), dtype=np.uint8)
    for j, rec in enumerate(records):
        out[j] = render_scene(Scene.from_dict(rec["scene"]), size, supersample)
    return out


def build_dataset(out_dir: str | os.PathLike, n_train: int = 20000, n_heldout: int = 400, seed: int = 0,
                  size: int = 128, supersample: int = 4, heldout_fraction: float = 0.1) -> dict[str, Any]:
    """Render the dataset ahead of time. Writes into out_dir:
        train.json / heldout.json   list of records {"id", "key", "split", "index", "scene",
                                    "captions": [{"style", "en", "zh"}, ...]}
        train.npz / heldout.npz     "images": uint8 [N, size, size, 3] (same order as the json)
        meta.json                   seed, size, counts, palette, version
    Returns the meta dict. Deterministic: the same arguments give identical arrays and json."""
    os.makedirs(out_dir, exist_ok=True)
    train, held = generate_records(n_train, n_heldout, seed, heldout_fraction)
    for name, recs in (("train", train), ("heldout", held)):
        imgs = render_records(recs, size, supersample)
        np.savez_compressed(os.path.join(out_dir, f"{name}.npz"), images=imgs)
        with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(recs, f, ensure_ascii=False, indent=None, separators=(",", ":"))
    meta = {
        "version": DATASET_VERSION, "seed": seed, "size": size, "supersample": supersample,
        "heldout_fraction": heldout_fraction, "n_train": len(train), "n_heldout": len(held),
        "n_train_captions": sum(2 * len(r["captions"]) for r in train),
        "n_heldout_captions": sum(2 * len(r["captions"]) for r in held),
        "palette": {k: list(v) for k, v in PALETTE.items()},
        "shapes": list(SHAPES), "caption_styles": list(CAPTION_STYLES),
    }
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    return meta


def load_split(out_dir: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, list[dict]]:
    """(images uint8 [N,H,W,3], records) of one split written by build_dataset."""
    if split not in ("train", "heldout"):
        raise TwigError(f"load_split: split must be 'train' or 'heldout', got {split!r}")
    npz, js = os.path.join(out_dir, f"{split}.npz"), os.path.join(out_dir, f"{split}.json")
    if not (os.path.isfile(npz) and os.path.isfile(js)):
        raise TwigError(f"load_split: missing {npz} or {js}")
    with np.load(npz) as z:
        images = z["images"]
    with open(js, encoding="utf-8") as f:
        records = json.load(f)
    if len(records) != len(images):
        raise TwigError(f"load_split: {js} has {len(records)} records but {npz} has {len(images)} images")
    return images, records


def all_caption_texts(records: Iterable[dict]) -> list[str]:
    """Every English and Chinese caption of the records (the tokenizer's training corpus)."""
    out = []
    for r in records:
        for c in r["captions"]:
            out.append(c["en"])
            out.append(c["zh"])
    return out


def demo_tokenizer_corpus(n_scenes: int = 3000, seed: int = 0) -> list[str]:
    """Captions (both languages) of the first `n_scenes` training scenes: the corpus the demo tokenizer is
    trained on. Deterministic."""
    train, _ = generate_records(n_scenes, 0, seed)
    return all_caption_texts(train)


def _main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Render the Twig demo shape dataset.")
    ap.add_argument("out_dir")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-heldout", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128)
    a = ap.parse_args(argv)
    meta = build_dataset(a.out_dir, a.n_train, a.n_heldout, a.seed, a.size)
    print(json.dumps({k: v for k, v in meta.items() if k != "palette"}))


if __name__ == "__main__":
    _main()
