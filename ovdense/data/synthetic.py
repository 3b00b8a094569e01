"""A seeded synthetic world: coloured shapes, some with defects, on textured backgrounds.

Every scene comes with its pixel-level ground truth and a caption, so the project can train
its own tiny CLIP (``tools/train_toy_clip.py``) and measure every head without downloads.

World: ``COLOURS`` × ``SHAPES`` objects, each flawless or in one of the ``DEFECTS`` states,
drawn in random order (later objects occlude earlier ones) at random position, size and
rotation, on one of the ``TEXTURES``, with Gaussian pixel noise. Masks are the exact pixels
drawn (no anti-aliasing), so ground truth and image agree to the pixel.

Label maps of a ``Scene`` (all ``[H, W]``):

* ``instance``: 0 background, ``i + 1`` for ``objects[i]`` (visible pixels only);
* ``colour``: 0 background, ``1 + COLOURS index``;
* ``shape``: 0 background, ``1 + SHAPES index``;
* ``colour_shape``: 0 background, ``1 + colour_index · len(SHAPES) + shape_index``;
* ``defect``: ``bool``, the pixels a defect changed.

Open-vocabulary split (``open_vocabulary_split``): of the 30 colour–shape pairs, the 10 with
``(colour index + shape index) mod 3 = 0`` are *novel*, the other 20 *base*; a trained head
learns from base pairs only (``base_labels`` maps novel pixels to ignored) and is scored on
all 30.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 85, 215),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
DEFECTS: tuple[str, ...] = ("scratched", "holed", "stained")
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "noisy", "gradient")


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn.

    Attributes:
        size: ``(H, W)`` in pixels.
        objects: ``(min, max)`` number of objects.
        radius: ``(min, max)`` object radius as a fraction of ``min(H, W)``.
        defect_rate: probability that an object has a defect.
        defects: the defect states to draw from.
        noise: standard deviation of the Gaussian pixel noise (0–255 scale).
        min_visible: an object must keep this fraction of its pixels visible.
        colours, shapes, textures: the choices drawn from (all of the world's by default).
    """

    size: tuple[int, int] = (128, 128)
    objects: tuple[int, int] = (1, 4)
    radius: tuple[float, float] = (0.09, 0.17)
    defect_rate: float = 0.0
    defects: tuple[str, ...] = DEFECTS
    noise: float = 6.0
    min_visible: float = 0.5
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    textures: tuple[str, ...] = TEXTURES


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    defect: str | None
    centre: tuple[float, float]  # (x, y) pixels
    radius: float
    angle: float  # radians

    @property
    def name(self) -> str:
        """``"scratched red circle"``, ``"blue star"``, …"""
        words = ([self.defect] if self.defect else []) + [self.colour, self.shape]
        return " ".join(words)


@dataclass
class Scene:
    image: np.ndarray  # H, W, 3 uint8
    objects: list[SceneObject]
    texture: str
    instance: np.ndarray  # H, W int64
    defect: np.ndarray  # H, W bool
    caption: str = ""
    colour: np.ndarray = field(init=False)
    shape: np.ndarray = field(init=False)
    colour_shape: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        colour_of = np.array([0] + [list(COLOURS).index(o.colour) + 1 for o in self.objects])
        shape_of = np.array([0] + [SHAPES.index(o.shape) + 1 for o in self.objects])
        self.colour = colour_of[self.instance]
        self.shape = shape_of[self.instance]
        both = np.array([0] + [
            1 + (list(COLOURS).index(o.colour)) * len(SHAPES) + SHAPES.index(o.shape)
            for o in self.objects
        ])
        self.colour_shape = both[self.instance]


# --------------------------------------------------------------------------------------------
# Vocabularies of the world (class 0 is the background)


def colour_classes() -> list[str]:
    return ["background", *COLOURS]


def shape_classes() -> list[str]:
    return ["background", *SHAPES]


def colour_shape_classes() -> list[str]:
    return ["background"] + [f"{c} {s}" for c in COLOURS for s in SHAPES]


def is_novel(colour: str, shape: str) -> bool:
    """Whether a colour–shape pair is *novel* in the open-vocabulary split: with ``i`` its
    index in ``COLOURS`` and ``j`` in ``SHAPES``, novel iff ``(i + j) mod 3 = 0``."""
    return (list(COLOURS).index(colour) + SHAPES.index(shape)) % 3 == 0


def open_vocabulary_split(novel_shape: str | None = None) -> tuple[list[str], list[str]]:
    """The world's open-vocabulary split: ``(base, novel)`` colour–shape names, each in
    ``colour_shape_classes`` order — 20 base pairs a head may train on, 10 novel pairs it
    must recognise from their names alone. Every colour and every shape occurs in both
    parts, so a novel pair is a new combination of seen words.

    ``novel_shape`` gives the harder split instead: every pair of that shape novel (6), the other
    24 base, so a head trained on base labels has never been told of that shape at all — only
    the CLIP it sits on has (F-VLM's premise: the detector cannot name what it never saw)."""
    if novel_shape is not None and novel_shape not in SHAPES:
        raise ValueError(f"unknown shape {novel_shape!r}; known: {', '.join(SHAPES)}")
    base, novel = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            held_out = shape == novel_shape if novel_shape is not None else is_novel(colour, shape)
            (novel if held_out else base).append(f"{colour} {shape}")
    return base, novel


def base_labels(ignore: int = 255) -> np.ndarray:
    """``[1 + len(COLOURS)·len(SHAPES)]`` map from ``colour_shape`` labels to training labels
    over ``["background", *base]``: background stays 0, base pair ``k`` becomes its
    position ``1 + k`` in ``base``, novel pairs become ``ignore`` (no supervision)."""
    base, _ = open_vocabulary_split()
    names = colour_shape_classes()
    mapping = np.full(len(names), ignore, np.int64)
    mapping[0] = 0
    for label, name in enumerate(names[1:], start=1):
        if name in base:
            mapping[label] = 1 + base.index(name)
    return mapping


# --------------------------------------------------------------------------------------------
# Drawing


def shape_mask(shape: str, size: tuple[int, int], centre: tuple[float, float], radius: float,
               angle: float) -> np.ndarray:
    """The exact ``[H, W]`` bool mask of a shape with circumradius ``radius``."""
    mask = np.zeros(size, np.uint8)
    cx, cy = centre
    if shape in ("circle", "ring"):
        cv2.circle(mask, (round(cx), round(cy)), round(radius), 1, thickness=-1)
        if shape == "ring":
            cv2.circle(mask, (round(cx), round(cy)), round(0.55 * radius), 0, thickness=-1)
        return mask.astype(bool)
    if shape == "square":
        radii, count = [radius], 4
    elif shape == "triangle":
        radii, count = [radius], 3
    elif shape == "star":
        radii, count = [radius, 0.45 * radius], 10
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")
    points = []
    for i in range(count):
        r = radii[i % len(radii)]
        t = angle + 2 * math.pi * i / count
        points.append((cx + r * math.cos(t), cy + r * math.sin(t)))
    cv2.fillPoly(mask, [np.round(np.array(points)).astype(np.int32)], 1)
    return mask.astype(bool)


def background(texture: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A low-saturation textured background ``[H, W, 3]`` float32 (0–255)."""
    H, W = size
    base = rng.uniform(70, 190)
    tint = rng.uniform(-12, 12, size=3)
    a = np.clip(base + tint, 0, 255)
    b = np.clip(a + rng.choice([-1, 1]) * rng.uniform(25, 50), 0, 255)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    if texture == "plain":
        t = np.zeros((H, W), np.float32)
    elif texture == "striped":
        period = rng.uniform(8, 20)
        theta = rng.uniform(0, math.pi)
        t = (np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period) > 0)
        t = t.astype(np.float32)
    elif texture == "checkered":
        cell = int(rng.integers(6, 16))
        t = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    elif texture == "noisy":
        small = rng.random((H // 4 + 1, W // 4 + 1)).astype(np.float32)
        t = cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)
    elif texture == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(theta) + yy * math.sin(theta))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        raise ValueError(f"unknown texture {texture!r}; textures are {TEXTURES}")
    return a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]


def _paint_defect(kind: str, canvas: np.ndarray, back: np.ndarray, obj: SceneObject,
                  mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw a defect inside ``mask``; return the bool mask of the pixels it changed."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask)
    pick = int(rng.integers(len(ys)))  # the defect is centred on a pixel of the object
    cx, cy = float(xs[pick]), float(ys[pick])
    r = obj.radius
    spot = np.zeros((H, W), np.uint8)
    if kind == "scratched":
        t = rng.uniform(0, math.pi)
        length = rng.uniform(0.5, 0.9) * r
        p1 = (round(cx - length * math.cos(t)), round(cy - length * math.sin(t)))
        p2 = (round(cx + length * math.cos(t)), round(cy + length * math.sin(t)))
        cv2.line(spot, p1, p2, 1, thickness=max(1, round(r / 8)))
        changed = spot.astype(bool) & mask
        canvas[changed] = 0.25 * canvas[changed] + 0.75 * np.array([35, 30, 30])
    elif kind == "holed":
        cv2.circle(spot, (round(cx), round(cy)), max(2, round(0.25 * r)), 1, -1)
        changed = spot.astype(bool) & mask
        canvas[changed] = 0.3 * back[changed] + 0.7 * np.array([20, 20, 20])
    elif kind == "stained":
        axes = (max(2, round(rng.uniform(0.2, 0.35) * r)), max(2, round(rng.uniform(0.15, 0.3) * r)))
        cv2.ellipse(spot, (round(cx), round(cy)), axes,
                    rng.uniform(0, 180), 0, 360, 1, -1)
        changed = spot.astype(bool) & mask
        canvas[changed] = 0.3 * canvas[changed] + 0.7 * np.array([110, 75, 45])
    else:
        raise ValueError(f"unknown defect {kind!r}; defects are {DEFECTS}")
    return changed


def caption(objects: list[SceneObject], texture: str | None = None) -> str:
    """``"a photo of a red circle and a blue star on a striped background"``."""
    names = [o.name for o in objects]
    if not names:
        text = "a photo of an empty background"
    elif len(names) == 1:
        text = f"a photo of a {names[0]}"
    else:
        text = "a photo of a " + ", a ".join(names[:-1]) + f" and a {names[-1]}"
    if texture and names:
        text += f" on a {texture} background"
    return text


def render_scene(rng: np.random.Generator | int, config: SceneConfig = SceneConfig()) -> Scene:
    """Draw one scene. The same seed (or generator state) gives the same scene."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    H, W = config.size
    texture = str(rng.choice(config.textures))
    back = background(texture, (H, W), rng)
    canvas = back.copy()
    instance = np.zeros((H, W), np.int64)
    defect = np.zeros((H, W), bool)
    objects: list[SceneObject] = []
    areas: list[int] = []  # each object's full (unoccluded) area
    count = int(rng.integers(config.objects[0], config.objects[1] + 1))
    side = min(H, W)
    for _ in range(count):
        for _attempt in range(30):
            radius = rng.uniform(*config.radius) * side
            centre = (rng.uniform(radius, W - radius), rng.uniform(radius, H - radius))
            obj = SceneObject(
                colour=str(rng.choice(config.colours)),
                shape=str(rng.choice(config.shapes)),
                defect=(str(rng.choice(config.defects)) if rng.random() < config.defect_rate else None),
                centre=centre, radius=radius, angle=rng.uniform(0, 2 * math.pi),
            )
            mask = shape_mask(obj.shape, (H, W), obj.centre, obj.radius, obj.angle)
            trial = instance.copy()
            trial[mask] = len(objects) + 1
            if _visible_enough(trial, areas + [int(mask.sum())], config.min_visible):
                break
        else:
            continue  # no room for another object
        shade = rng.uniform(0.85, 1.1)
        colour = np.clip(np.array(COLOURS[obj.colour], np.float32) * shade, 0, 255)
        canvas[mask] = colour
        instance = trial
        defect &= ~mask  # an occluded defect is no longer visible
        if obj.defect:
            defect |= _paint_defect(obj.defect, canvas, back, obj, mask, rng)
        objects.append(obj)
        areas.append(int(mask.sum()))
    canvas += rng.normal(0, config.noise, size=canvas.shape)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return Scene(image, objects, texture, instance, defect, caption(_by_area(objects, instance), texture))


def _visible_enough(trial: np.ndarray, full_areas: list[int], fraction: float) -> bool:
    """Every object (the new one last) keeps ``fraction`` of its full area visible."""
    if full_areas[-1] == 0:
        return False
    visible = np.bincount(trial.reshape(-1), minlength=len(full_areas) + 1)[1:]
    return all(v >= fraction * a for v, a in zip(visible, full_areas))


def _by_area(objects: list[SceneObject], instance: np.ndarray) -> list[SceneObject]:
    """Objects ordered by visible area, largest first (the caption's order)."""
    areas = np.bincount(instance.reshape(-1), minlength=len(objects) + 1)[1:]
    order = sorted(range(len(objects)), key=lambda i: -areas[i])
    return [objects[i] for i in order]
