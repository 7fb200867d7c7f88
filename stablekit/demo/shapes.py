"""A procedural dataset: plain-background pictures of one or two coloured shapes, with captions.

Everything is drawn from a seed, so the data set needs no files. A `Scene` holds the facts of
one picture (background colour, shapes with colour, kind, size and place); `render` draws it
(anti-aliased by 4x supersampling) and `caption` words it in one of several phrasings. The same
facts let `analyse.py` check a generated picture against its prompt.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Named colours (RGB). Chosen to be far apart, so a picture's colours can be named unambiguously.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (35, 70, 215),
    "yellow": (245, 215, 40),
    "orange": (245, 135, 20),
    "purple": (130, 50, 170),
    "pink": (245, 140, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "brown": (120, 70, 30),
    "cyan": (40, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond")
SIZES = {"small": 0.13, "medium": 0.2, "large": 0.3}  # radius as a fraction of the picture's side
# Where a shape sits: caption words -> centre as fractions of width and height.
PLACES: dict[str, tuple[float, float]] = {
    "top left corner": (0.25, 0.25), "top": (0.5, 0.25), "top right corner": (0.75, 0.25),
    "left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left corner": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right corner": (0.75, 0.75),
}
# (shape colour, background colour) pairs never shown in training: they measure generalisation.
HELD_OUT_PAIRS = frozenset({
    ("red", "green"), ("blue", "yellow"), ("purple", "white"), ("orange", "black"),
    ("white", "brown"), ("cyan", "grey"), ("pink", "blue"), ("yellow", "purple"),
})


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    size: str
    place: str
    jitter: tuple[float, float] = (0.0, 0.0)  # offset from the place's centre, fraction of the side


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]


def random_scene(rng: random.Random, *, held_out: bool = False) -> Scene:
    """One or two shapes; `held_out` False never pairs a shape colour with a background in HELD_OUT_PAIRS."""
    names = list(COLOURS)
    background = rng.choice(names)
    count = 1 if rng.random() < 0.75 else 2
    places = rng.sample(["left", "right"], 2) if count == 2 else [rng.choice(list(PLACES))]
    shapes = []
    for place in places:
        allowed = [c for c in names if c != background and ((c, background) in HELD_OUT_PAIRS) == held_out]
        if not allowed:
            allowed = [c for c in names if c != background]
        size = rng.choice(["small", "medium"]) if count == 2 else rng.choice(list(SIZES))
        jitter = (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06))
        shapes.append(Shape(rng.choice(allowed), rng.choice(SHAPES), size, place, jitter))
    return Scene(background, tuple(shapes))


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * 0.15 + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":  # five points, inner radius 0.45
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(f"not a polygon shape: {kind}")


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene as an RGB picture of size x size."""
    big = size * supersample
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fx, fy = PLACES[shape.place]
        cx, cy = (fx + shape.jitter[0]) * big, (fy + shape.jitter[1]) * big
        r = SIZES[shape.size] * big
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            inner = r * 0.55
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=COLOURS[scene.background])
        else:
            draw.polygon(_polygon(shape.kind, cx, cy, r), fill=fill)
    return image.resize((size, size), Image.LANCZOS)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: Shape, with_size: bool) -> str:
    words = ([shape.size] if with_size else []) + [shape.colour, shape.kind]
    return f"{_article(words[0])} {' '.join(words)}"


def caption(scene: Scene, rng: random.Random) -> str:
    """One of several phrasings of the scene; place and size words appear in some of them."""
    bg = scene.background
    if len(scene.shapes) == 2:
        a, b = scene.shapes
        left, right = (a, b) if a.place == "left" else (b, a)
        forms = [
            f"{_noun(a, False)} and {_noun(b, False)} on {_article(bg)} {bg} background",
            f"{_noun(left, False)} on the left and {_noun(right, False)} on the right, {bg} background",
            f"{bg} background with {_noun(a, False)} and {_noun(b, False)}",
        ]
        return rng.choice(forms)
    (s,) = scene.shapes
    where = "in the center" if s.place == "center" else (
        f"in the {s.place}" if "corner" in s.place else f"at the {s.place}")
    forms = [
        f"{_noun(s, False)} on {_article(bg)} {bg} background",
        f"{_noun(s, True)} on {_article(bg)} {bg} background",
        f"{_noun(s, False)} {where}, {bg} background",
        f"{_noun(s, True)} {where}, {bg} background",
        f"{s.colour} {s.kind}, {bg} background",
        f"{_noun(s, False)} on {bg}",
        f"{bg} background with {_noun(s, False)}",
        f"{_article(s.kind)} {s.kind} coloured {s.colour} on {_article(bg)} {bg} background",
    ]
    return rng.choice(forms)


def batch(rng: random.Random, count: int, size: int = 64) -> tuple[np.ndarray, list[Scene]]:
    """`count` training scenes and their pictures as uint8 [count, size, size, 3]."""
    scenes = [random_scene(rng) for _ in range(count)]
    pictures = np.stack([np.asarray(render(s, size)) for s in scenes])
    return pictures, scenes
