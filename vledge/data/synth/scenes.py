"""Scenes: what a synthetic picture holds (its objects, background, word) and drawing it with OpenCV.

A scene is a ``grid`` x ``grid`` board of simple coloured shapes (one per cell) on a plain,
slightly noisy background, sometimes with a short word in an empty cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from vledge.errors import ConfigError, DataError

if TYPE_CHECKING:
    from vledge.data.synth.options import SynthOptions

# Saturated BGR colours, pairwise far apart and far from every background tone.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (36, 28, 237),
    "orange": (0, 128, 255),
    "yellow": (0, 235, 255),
    "green": (40, 200, 40),
    "cyan": (240, 220, 0),
    "blue": (230, 80, 20),
    "purple": (200, 40, 160),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "star": "stars"}
# Extent of an object as a fraction of its cell's side.
SIZES = {"small": 0.5, "large": 0.8}
# No colour words, so reading never collides with colour answers.
WORDS = ("cat", "dog", "sun", "car", "box", "cup", "hat", "pen", "map", "key", "bus", "fox")
# Largest offset of an object's centre from its cell's centre, as a fraction of the cell.
JITTER = 0.04
MIN_CELL_PX = 16
RELATIONS = ("to the left of", "to the right of", "above", "below")

_NAMES_3 = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
_NAMES_2 = (("top left", "top right"), ("bottom left", "bottom right"))

_SHIFT = 4  # cv2 fixed-point bits: sub-pixel geometry, so small shapes stay symmetric
_ONE = 1 << _SHIFT


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    row: int
    col: int
    # Offset of the centre from the cell's centre, as fractions of the cell (x, y).
    offset: tuple[float, float] = (0.0, 0.0)

    @property
    def name(self) -> str:
        """The unambiguous name of the object in its scene, e.g. "red circle"."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order (row-major)
    background: tuple[int, int, int]  # BGR
    word: str | None = None
    word_cell: tuple[int, int] | None = None  # (row, col)
    grid: int = 3
    # Brightness change across the image, left->right and top->bottom, in pixel values.
    gradient: tuple[float, float] = (0.0, 0.0)
    noise: float = 0.0  # standard deviation of the Gaussian pixel noise

    def to_dict(self) -> dict:
        """Plain JSON form, as stored under each record's ``"scene"`` key."""
        return {
            "grid": self.grid,
            "background": list(self.background),
            "gradient": list(self.gradient),
            "noise": self.noise,
            "word": self.word,
            "word_cell": list(self.word_cell) if self.word_cell is not None else None,
            "objects": [
                {
                    "shape": o.shape,
                    "color": o.color,
                    "size": o.size,
                    "row": o.row,
                    "col": o.col,
                    "position": position_name(o.row, o.col, self.grid),
                    "offset": list(o.offset),
                }
                for o in self.objects
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        try:
            objects = tuple(
                SceneObject(o["shape"], o["color"], o["size"], int(o["row"]), int(o["col"]), tuple(o.get("offset", (0.0, 0.0))))
                for o in data["objects"]
            )
            cell = data.get("word_cell")
            return cls(
                objects=objects,
                background=tuple(int(v) for v in data["background"]),
                word=data.get("word"),
                word_cell=tuple(cell) if cell is not None else None,
                grid=int(data.get("grid", 3)),
                gradient=tuple(data.get("gradient", (0.0, 0.0))),
                noise=float(data.get("noise", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not a synthetic scene: {exc!r}") from None


def position_name(row: int, col: int, grid: int = 3) -> str:
    """Human name of a cell: the nine usual names on 3x3, corners on 2x2, "row r column c" otherwise."""
    if grid == 3:
        return _NAMES_3[row][col]
    if grid == 2:
        return _NAMES_2[row][col]
    return f"row {row + 1} column {col + 1}"


def position_names(grid: int = 3) -> list[str]:
    return [position_name(r, c, grid) for r in range(grid) for c in range(grid)]


def random_scene(rng: np.random.Generator, options: SynthOptions) -> Scene:
    """Draw objects in distinct cells with distinct (colour, shape) pairs, plus background and word."""
    grid = options.grid
    cells = grid * grid
    n = int(rng.integers(options.min_objects, options.max_objects + 1))
    chosen_cells = rng.choice(cells, size=n, replace=False)
    pairs = rng.choice(len(COLORS) * len(SHAPES), size=n, replace=False)
    colors = list(COLORS)
    sizes = list(SIZES)
    objects = []
    for cell, pair in zip(chosen_cells, pairs):
        size = sizes[int(rng.integers(len(sizes)))]
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
        objects.append(
            SceneObject(
                shape=SHAPES[int(pair) % len(SHAPES)],
                color=colors[int(pair) // len(SHAPES)],
                size=size,
                row=int(cell) // grid,
                col=int(cell) % grid,
                offset=(round(float(dx), 4), round(float(dy), 4)),
            )
        )
    objects.sort(key=lambda o: (o.row, o.col))

    # Low-saturation dark-to-mid tone: a grey level with a small tint per channel.
    # Every such tone stays more than 100 (BGR distance) from every object colour.
    level = rng.uniform(20, 100)
    background = tuple(int(round(level + t)) for t in rng.uniform(-12, 12, size=3))
    gradient = (0.0, 0.0)
    if rng.random() < 0.5:
        gradient = tuple(round(float(g), 2) for g in rng.uniform(-24, 24, size=2))
    noise = round(float(rng.uniform(1.0, 4.0)), 2)

    word = word_cell = None
    wants_word = rng.random() < options.word_probability
    empty = sorted(set(range(cells)) - {int(c) for c in chosen_cells})
    if wants_word and empty:
        word = WORDS[int(rng.integers(len(WORDS)))]
        cell = empty[int(rng.integers(len(empty)))]
        word_cell = (cell // grid, cell % grid)
    return Scene(tuple(objects), background, word, word_cell, grid, gradient, noise)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- drawing


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(points * _ONE).astype(np.int32)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Polygon for a shape whose bounding box is centred on (cx, cy) with half-extent r."""
    if shape == "square":
        h = 0.86 * r  # a little smaller so its area matches the other shapes
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        pts = [(0.0, -r), (r, r * 0.85), (-r, r * 0.85)]
    elif shape == "diamond":
        pts = [(0.0, -r), (0.85 * r, 0.0), (0.0, r), (-0.85 * r, 0.0)]
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        # The star's points reach r up but only r*cos(36deg) down: centre its bounding box.
        shift = r * (1 - math.cos(math.pi / 5)) / 2
        pts = list(zip(radii * np.cos(angles), radii * np.sin(angles) + shift))
    else:
        raise ConfigError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return np.asarray(pts, dtype=np.float64) + (cx, cy)


def cell_center(row: int, col: int, image_size: int, grid: int, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
    """Centre (x, y) of a cell in pixel coordinates (pixel centres at integers), plus an offset in cell units."""
    cell = image_size / grid
    return (col + 0.5 + offset[0]) * cell - 0.5, (row + 0.5 + offset[1]) * cell - 0.5


def _draw_object(img: np.ndarray, obj: SceneObject, image_size: int, grid: int) -> None:
    cx, cy = cell_center(obj.row, obj.col, image_size, grid, obj.offset)
    r = SIZES[obj.size] * image_size / grid / 2
    color = COLORS[obj.color]
    if obj.shape == "circle":
        cv2.circle(img, (round(cx * _ONE), round(cy * _ONE)), round(r * _ONE), color, -1, cv2.LINE_AA, _SHIFT)
    else:
        cv2.fillPoly(img, [_fixed(_shape_points(obj.shape, cx, cy, r))], color, cv2.LINE_AA, _SHIFT)


def _draw_word(img: np.ndarray, word: str, cell: tuple[int, int], image_size: int, grid: int) -> None:
    """Light-grey text with a dark outline, scaled to fit its cell and centred in it."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    side = image_size / grid
    thickness = max(1, round(side / 40))
    outline = thickness + 2  # odd widths keep the outline centred on the strokes
    (w1, h1), _ = cv2.getTextSize(word, font, 1.0, outline)
    scale = min(0.9 * side / w1, 0.55 * side / h1)
    (w, h), _ = cv2.getTextSize(word, font, scale, outline)
    cx, cy = cell_center(cell[0], cell[1], image_size, grid)
    origin = (round(cx - w / 2), round(cy + h / 2))
    cv2.putText(img, word, origin, font, scale, (15, 15, 15), outline, cv2.LINE_AA)
    cv2.putText(img, word, origin, font, scale, (225, 225, 225), thickness, cv2.LINE_AA)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator, grid: int | None = None) -> np.ndarray:
    """Draw a scene as an ``image_size`` square HxWx3 uint8 BGR image; the pixel noise comes from ``rng``.

    ``grid`` defaults to the scene's own grid; passing a different one is an error.
    """
    grid = scene.grid if grid is None else grid
    if grid != scene.grid:
        raise ConfigError(f"render_scene: grid {grid} does not match the scene's grid {scene.grid}")
    if image_size < MIN_CELL_PX * grid:
        raise ConfigError(f"render_scene: image_size {image_size} is below {MIN_CELL_PX} px per cell")
    ramp = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
    gx, gy = scene.gradient
    shade = gx * ramp[None, :] + gy * ramp[:, None]
    base = np.asarray(scene.background, dtype=np.float32)
    img = np.clip(base[None, None, :] + shade[:, :, None], 0, 255).round().astype(np.uint8)
    for obj in scene.objects:
        _draw_object(img, obj, image_size, grid)
    if scene.word is not None and scene.word_cell is not None:
        _draw_word(img, scene.word, scene.word_cell, image_size, grid)
    noise = rng.normal(0.0, scene.noise, size=img.shape).astype(np.float32)
    return np.clip(img.astype(np.float32) + noise, 0, 255).round().astype(np.uint8)
