"""The synthetic world's scenes: image `i` of a world with seed `s` is a scene of 1-4
shapes (kind, colour, position, size) and sometimes a short word, drawn from an RNG seeded
by (s, i) alone, so `scene_for(seed, i)` gives any image's ground truth without
generating anything. Each shape has its own cell of a 3x3 grid (left/right/top/bottom/
center) and a (kind, colour) pair unique in its scene, so "the shape on the left" and
"the red circle" always name exactly one object. Shapes are drawn without anti-aliasing
in exact palette colours, so pixels can check answers.

Every random choice comes from an RNG seeded by a hash of (seed, purpose, ...) (see
`derive_seed`), never from global state: the same arguments give the same pixels.
"""
from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
WORDS = ("CAT", "DOG", "SUN", "BUS", "HAT", "ZOO", "MAP", "KEY", "BOX", "RUN", "OK", "HI")

# The grid cell (column, row) of each position; corners stay empty so a word in the
# top or bottom cell can spill sideways without touching a shape.
CELLS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
TEXT_POSITIONS = ("top", "bottom")
TEXT_PROBABILITY = 0.4
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
RADIUS = {"small": 0.25, "large": 0.45}  # half the shape's extent, in cell widths


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    position: str
    size: str

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """Ground truth of one pool image."""

    shapes: tuple[Shape, ...]
    text: str | None = None
    text_position: str | None = None

    def count(self, kind: str | None = None, color: str | None = None) -> int:
        return sum(
            1 for s in self.shapes if kind in (None, s.kind) and color in (None, s.color)
        )

    def at(self, position: str) -> Shape | None:
        return next((s for s in self.shapes if s.position == position), None)


def derive_seed(seed: int, *purpose) -> int:
    """A 64-bit seed for one purpose: independent streams, no global RNG state."""
    digest = hashlib.sha256(repr((seed, *purpose)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def scene_for(seed: int, index: int) -> Scene:
    """The ground truth of pool image `index` of the corpus generated with `seed`."""
    rng = random.Random(derive_seed(seed, "scene", index))
    free = list(POSITIONS)
    text = text_position = None
    if rng.random() < TEXT_PROBABILITY:
        text_position = rng.choice(TEXT_POSITIONS)
        free.remove(text_position)
        text = rng.choice(WORDS)
    n = rng.randint(1, min(4, len(free)))
    objects = rng.sample([(k, c) for k in SHAPES for c in PALETTE], n)
    positions = sorted(rng.sample(free, n), key=POSITIONS.index)
    shapes = tuple(
        Shape(kind, color, position, rng.choice(SIZES))
        for (kind, color), position in zip(objects, positions)
    )
    return Scene(shapes, text, text_position)


@lru_cache(maxsize=8)
def _font(image_size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, image_size // 6))


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3

    def center(position: str) -> tuple[float, float]:
        col, row = CELLS[position]
        return (col + 0.5) * cell, (row + 0.5) * cell

    for shape in scene.shapes:
        cx, cy = center(shape.position)
        r = RADIUS[shape.size] * cell
        fill = PALETTE[shape.color]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    if scene.text:
        draw.text(center(scene.text_position), scene.text, fill=TEXT_COLOR,
                  font=_font(image_size), anchor="mm")
    return image


def png(image: Image.Image) -> bytes:
    """The image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
