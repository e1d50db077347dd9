"""Built-in synthetic visual-instruction data: drawn scenes with exact answers.

Every scene is a ``grid`` x ``grid`` board of simple coloured shapes (one per
cell) on a plain, slightly noisy background, sometimes with a short word in an
empty cell. Because we draw the picture ourselves, every answer (counts,
colours, shapes, positions, relations, the word) is known exactly, so a small
model's mistakes are its own and exact-match accuracy is a fair measure.

Torch-free: numpy + OpenCV only. Sample ``i`` is drawn from
``np.random.default_rng([seed, i])``, so the output depends on the seed alone,
never on the number of worker processes.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from vledge import __version__
from vledge.data.records import Turn
from vledge.errors import ConfigError, DataError
from vledge.leftovers import clean_stale, temp_prefix

log = logging.getLogger(__name__)

GENERATOR = "vledge.data.synth"
# Bump when the same seed would draw different scenes or conversations.
GENERATOR_VERSION = 4

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
IMAGE_FORMATS = ("jpg", "png")
SPLITS = ("train", "val", "test")

_NAMES_3 = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
_NAMES_2 = (("top left", "top right"), ("bottom left", "bottom right"))

_CAPTION_QUESTIONS = ("Describe the image briefly.", "What is in this image?", "Write a short caption.")
_DESCRIBE_QUESTIONS = ("Describe the image in detail.", "Give a detailed description of the image.")
_LIST_QUESTIONS = ("List the objects by shape.", "Group the objects by shape.")
_COUNT_ALL = ("How many objects are there?", "How many objects are in the image?", "Count the objects.")
_COUNT_SHAPE = ("How many {p} are there?", "How many {p} are in the image?")
_COLOR_QUESTIONS = ("What color is the {s}?", "What is the color of the {s}?")
_SHAPE_QUESTIONS = ("What shape is the {c} object?", "What is the shape of the {c} object?")
# The same attributes asked by place: they tie each grid cell's visual tokens to words directly,
# which is what lets a model trained from scratch learn to bind colour and shape to objects.
_COLOR_AT_QUESTIONS = ("What color is the object {w}?",)
_SHAPE_AT_QUESTIONS = ("What shape is the object {w}?",)
_POSITION_QUESTIONS = ("Where is the {c} {s}?", "Where is the {c} {s} located?")
_WHAT_AT_QUESTIONS = ("What is {w}?",)
_READ_QUESTIONS = ("What word is written in the image?", "What does the text in the image say?")
_RELATIONS = ("to the left of", "to the right of", "above", "below")

_SHIFT = 4  # cv2 fixed-point bits: sub-pixel geometry, so small shapes stay symmetric
_ONE = 1 << _SHIFT


# --------------------------------------------------------------------------- options


@dataclass
class SynthOptions:
    """Everything that decides the generated data; stored in ``dataset.json``."""

    size: int = 20000
    seed: int = 0
    image_size: int = 64
    grid: int = 3
    min_objects: int = 1
    max_objects: int = 6
    word_probability: float = 0.25
    splits: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train / val / test
    image_format: str = "jpg"  # jpg (quality 95) | png

    def __post_init__(self) -> None:
        for name in ("size", "seed", "image_size", "grid", "min_objects", "max_objects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"SynthOptions.{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        if self.size < 1:
            raise ConfigError(f"SynthOptions.size must be at least 1, got {self.size}")
        if self.seed < 0:
            raise ConfigError(f"SynthOptions.seed must be non-negative, got {self.seed}")
        if not 2 <= self.grid <= 6:
            raise ConfigError(f"SynthOptions.grid must be between 2 and 6, got {self.grid}")
        if self.image_size < MIN_CELL_PX * self.grid or self.image_size > 4096:
            raise ConfigError(
                f"SynthOptions.image_size must be between {MIN_CELL_PX * self.grid} "
                f"({MIN_CELL_PX} px per cell on a {self.grid}x{self.grid} grid) and 4096, got {self.image_size}"
            )
        if self.min_objects < 1:
            raise ConfigError(f"SynthOptions.min_objects must be at least 1, got {self.min_objects}")
        cells = self.grid * self.grid
        if not self.min_objects <= self.max_objects <= cells:
            raise ConfigError(
                f"SynthOptions.max_objects must be between min_objects ({self.min_objects}) "
                f"and the {cells} grid cells, got {self.max_objects}"
            )
        try:
            self.word_probability = float(self.word_probability)
        except (TypeError, ValueError):
            raise ConfigError(f"SynthOptions.word_probability must be a number, got {self.word_probability!r}") from None
        if not 0.0 <= self.word_probability <= 1.0:
            raise ConfigError(f"SynthOptions.word_probability must be in [0, 1], got {self.word_probability}")
        try:
            splits = tuple(float(x) for x in self.splits)
        except (TypeError, ValueError):
            raise ConfigError(f"SynthOptions.splits must be three numbers, got {self.splits!r}") from None
        if len(splits) != 3 or min(splits) < 0 or splits[0] <= 0 or abs(sum(splits) - 1.0) > 1e-6:
            raise ConfigError(
                f"SynthOptions.splits must be three non-negative fractions (train > 0) summing to 1, got {self.splits!r}"
            )
        self.splits = splits  # type: ignore[assignment]
        fmt = str(self.image_format).lower()
        if fmt not in IMAGE_FORMATS:
            raise ConfigError(f"SynthOptions.image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        self.image_format = fmt

    def split_counts(self) -> dict[str, int]:
        """Exact number of samples per split (val and test rounded, train takes the rest)."""
        val = int(math.floor(self.size * self.splits[1] + 0.5))
        test = min(int(math.floor(self.size * self.splits[2] + 0.5)), self.size - val)
        return {"train": self.size - val - test, "val": val, "test": test}


# --------------------------------------------------------------------------- scenes


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


# --------------------------------------------------------------------------- words


def _reading_order(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: (o.row, o.col))


def _join(items: list[str], last: str = "and") -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {last} " + items[-1]


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    if position.startswith("row "):
        return f"in {position}"
    return f"at the {position}"


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: "a red circle", "an orange star"."""
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def caption(scene: Scene) -> str:
    """Short caption: the objects in reading order, e.g. "a red circle and a blue square"."""
    return _join([_a(o.name) for o in _reading_order(scene)])


def describe(scene: Scene) -> str:
    """Detailed description: count, then each object place first, then the word.

    The place comes before the object ("At the top left, a large red circle.") so that
    every attribute word the model learns to produce follows the words naming its cell.
    """
    objects = _reading_order(scene)
    n = len(objects)
    parts = ["There is 1 object." if n == 1 else f"There are {n} objects."]
    for o in objects:
        where = _where(position_name(o.row, o.col, scene.grid))
        parts.append(f"{where[0].upper()}{where[1:]}, a {o.size} {o.name}.")
    if scene.word is not None and scene.word_cell is not None:
        parts.append(f"The word {scene.word} is written {_where(position_name(*scene.word_cell, scene.grid))}.")
    return " ".join(parts)


def list_by_shape(scene: Scene) -> str:
    """The objects grouped by shape, e.g. "2 circles: red at the top left, blue in the center. No stars."

    Captions and descriptions always name a colour before its shape and a place before its
    object, so they teach looking an object up by colour or by place. This text runs the
    other way: each colour and place follows its shape and count, which is what "What color
    is the star?", "How many stars are there?" and "Where is the red star?" need.
    """
    groups = []
    for shape in SHAPES:
        objects = [o for o in _reading_order(scene) if o.shape == shape]
        if objects:
            noun = shape if len(objects) == 1 else PLURALS[shape]
            groups.append(f"{len(objects)} {noun}: " + ", ".join(f"{o.color} {_at(o, scene)}" for o in objects) + ".")
    absent = [PLURALS[shape] for shape in SHAPES if all(o.shape != shape for o in scene.objects)]
    if absent:
        groups.append(f"No {_join(absent, 'or')}.")
    return " ".join(groups)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _count_question(scene: Scene, rng: np.random.Generator) -> Turn:
    if rng.random() < 0.5:
        return Turn(_pick(rng, _COUNT_ALL), str(len(scene.objects)), "count")
    shape = _pick(rng, SHAPES)
    n = sum(o.shape == shape for o in scene.objects)
    return Turn(_pick(rng, _COUNT_SHAPE).format(p=PLURALS[shape]), str(n), "count")


def _at(obj: SceneObject, scene: Scene) -> str:
    return _where(position_name(obj.row, obj.col, scene.grid))


def _attribute_question(scene: Scene, rng: np.random.Generator, asked: str) -> Turn:
    """Ask an object's colour (named by its shape) or shape (named by its colour), or either by its place.

    Naming by the other attribute needs that attribute to be unique in the scene; the place always is.
    """
    known = "shape" if asked == "color" else "color"
    counts = Counter(getattr(o, known) for o in scene.objects)
    unique = [o for o in scene.objects if counts[getattr(o, known)] == 1]
    by_place, by_known = (_COLOR_AT_QUESTIONS, _COLOR_QUESTIONS) if asked == "color" else (_SHAPE_AT_QUESTIONS,
                                                                                          _SHAPE_QUESTIONS)
    if not unique or rng.random() < 0.5:
        obj = _pick(rng, scene.objects)
        return Turn(_pick(rng, by_place).format(w=_at(obj, scene)), getattr(obj, asked), asked)
    obj = _pick(rng, unique)
    question = _pick(rng, by_known).format(s=obj.shape, c=obj.color)
    return Turn(question, getattr(obj, asked), asked)


def _color_question(scene: Scene, rng: np.random.Generator) -> Turn:
    return _attribute_question(scene, rng, "color")


def _shape_question(scene: Scene, rng: np.random.Generator) -> Turn:
    return _attribute_question(scene, rng, "shape")


def _position_question(scene: Scene, rng: np.random.Generator) -> Turn:
    if rng.random() < 1 / 3:  # the inverse question: what is in a given cell (possibly nothing)
        row, col = int(rng.integers(scene.grid)), int(rng.integers(scene.grid))
        here = [o for o in scene.objects if (o.row, o.col) == (row, col)]
        answer = _a(here[0].name) if here else "nothing"
        return Turn(_pick(rng, _WHAT_AT_QUESTIONS).format(w=_where(position_name(row, col, scene.grid))), answer,
                    "position")
    obj = _pick(rng, scene.objects)
    question = _pick(rng, _POSITION_QUESTIONS).format(c=obj.color, s=obj.shape)
    return Turn(question, position_name(obj.row, obj.col, scene.grid), "position")


def relation_holds(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """Strict grid comparison: same column is neither left nor right, same row neither above nor below."""
    if relation == "to the left of":
        return a.col < b.col
    if relation == "to the right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ConfigError(f"unknown relation {relation!r}; choose from {_RELATIONS}")


def _relation_question(scene: Scene, rng: np.random.Generator) -> Turn | None:
    if len(scene.objects) < 2:
        return None
    want = rng.random() < 0.5  # balance yes and no
    options = [
        (a, rel, b)
        for a in scene.objects
        for b in scene.objects
        if a is not b
        for rel in _RELATIONS
        if relation_holds(a, rel, b) == want
    ]
    if not options:  # cannot happen with distinct cells, kept for hand-made scenes
        return None
    a, rel, b = _pick(rng, options)
    return Turn(f"Is the {a.name} {rel} the {b.name}?", "yes" if want else "no", "relation")


def _read_question(scene: Scene, rng: np.random.Generator) -> Turn | None:
    if scene.word is None:
        return None
    return Turn(_pick(rng, _READ_QUESTIONS), scene.word, "read")


_QUESTION_MAKERS = {
    "count": _count_question,
    "color": _color_question,
    "shape": _shape_question,
    "position": _position_question,
    "relation": _relation_question,
    "read": _read_question,
}


def _available_tasks(scene: Scene) -> list[str]:
    """Question tasks this scene can answer unambiguously."""
    shapes = Counter(o.shape for o in scene.objects)
    colors = Counter(o.color for o in scene.objects)
    usable = {
        "count": True,
        "color": bool(scene.objects),
        "shape": bool(scene.objects),
        "position": bool(scene.objects),
        "relation": len(scene.objects) >= 2,
        "read": scene.word is not None,
    }
    return [task for task in _QUESTION_MAKERS if usable[task]]


def scene_conversation(scene: Scene, rng: np.random.Generator) -> tuple[Turn, ...]:
    """One caption or describe turn, the list by shape, and 3-5 distinct questions, all in shuffled order.

    Question tasks are taken without repetition first (read always, as words
    are rare; the others in random order), then repeated with new questions
    if a scene offers too few tasks.
    """
    if rng.random() < 0.5:
        turns = [Turn(_pick(rng, _CAPTION_QUESTIONS), caption(scene), "caption")]
    else:
        turns = [Turn(_pick(rng, _DESCRIBE_QUESTIONS), describe(scene), "describe")]
    turns.append(Turn(_pick(rng, _LIST_QUESTIONS), list_by_shape(scene), "list"))
    wanted = int(rng.integers(3, 6))
    available = _available_tasks(scene)
    order = [available[i] for i in rng.permutation(len(available))]
    order.sort(key=lambda task: task != "read")  # the word is rare: always ask about it
    seen = {turn.question for turn in turns}
    questions: list[Turn] = []
    attempts = 0
    while len(questions) < wanted and attempts < 40 and order:
        task = order[len(questions)] if len(questions) < len(order) else _pick(rng, order)
        attempts += 1
        turn = _QUESTION_MAKERS[task](scene, rng)
        if turn is None or turn.question in seen:
            continue
        seen.add(turn.question)
        questions.append(turn)
    turns.extend(questions)
    return tuple(turns[i] for i in rng.permutation(len(turns)))


# --------------------------------------------------------------------------- dataset


@dataclass
class SynthSummary:
    out_dir: Path
    counts: dict[str, int]  # samples per split
    tasks: dict[str, int]  # question turns per task
    seconds: float

    def describe(self) -> str:
        total = sum(self.counts.values())
        splits = ", ".join(f"{name} {count}" for name, count in self.counts.items())
        tasks = ", ".join(f"{name} {count}" for name, count in self.tasks.items())
        return (
            f"wrote {total} synthetic images to {self.out_dir} in {self.seconds:.1f} s\n"
            f"  splits: {splits}\n"
            f"  turns:  {tasks}"
        )


@dataclass(frozen=True)
class _Job:
    folder: str
    options: SynthOptions
    start: int
    stop: int
    id_width: int


def _record(i: int, options: SynthOptions, folder: Path, id_width: int) -> dict:
    """Draw, render, write and describe sample ``i``; everything comes from ``default_rng([seed, i])``."""
    rng = np.random.default_rng([options.seed, i])
    scene = random_scene(rng, options)
    image = render_scene(scene, options.image_size, rng)
    turns = scene_conversation(scene, rng)
    sample_id = f"{i:0{id_width}d}"
    name = f"images/{sample_id}.{options.image_format}"
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if options.image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, encoded = cv2.imencode(f".{options.image_format}", image, params)
    if not ok:
        raise DataError(f"OpenCV could not encode {name}")
    (folder / name).write_bytes(encoded.tobytes())
    conversations = []
    for k, turn in enumerate(turns):
        question = ("<image>\n" + turn.question) if k == 0 else turn.question
        conversations.append({"from": "human", "value": question, "task": turn.task})
        conversations.append({"from": "gpt", "value": turn.answer})
    return {"id": sample_id, "image": name, "conversations": conversations, "scene": scene.to_dict()}


def _run_job(job: _Job) -> list[dict]:
    folder = Path(job.folder)
    return [_record(i, job.options, folder, job.id_width) for i in range(job.start, job.stop)]


def _init_worker() -> None:
    # The parent handles Ctrl-C and terminates the pool; one OpenCV thread per process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)


def _write_records(path: Path, records: list[dict]) -> None:
    """A JSON list with one record per line: valid JSON that ``head`` and ``diff`` can still read."""
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text("[\n" + body + "\n]\n" if records else "[]\n", encoding="utf-8")


def _is_synth_dataset(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to touch anything but our own earlier output (or an empty folder), even with overwrite."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not overwrite:
        raise DataError(f"{out_dir} already exists; pass overwrite=True (--force) to replace it")
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise DataError(f"{out_dir} exists and is not a folder; refusing to replace it")
    if any(out_dir.iterdir()) and not _is_synth_dataset(out_dir):
        raise DataError(f"{out_dir} is not a vledge synthetic dataset (no dataset.json from {GENERATOR}); refusing to replace it")


def _vocabulary(options: SynthOptions) -> dict[str, list[str]]:
    return {
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "positions": position_names(options.grid),
        "relations": list(_RELATIONS),
        "words": list(WORDS),
    }


def generate_dataset(
    out_dir: Path,
    options: SynthOptions,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write images, ``train/val/test.json`` (LLaVA format) and ``dataset.json`` into ``out_dir``.

    Everything is written into a hidden sibling folder that is renamed into
    place only when complete, so ``out_dir`` is never half-written; an existing
    ``out_dir`` is replaced only with ``overwrite`` and only after success.
    ``progress`` receives the number of samples finished since its last call.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir.parent, out_dir.name, suffix=".tmp")  # the folders of killed runs
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir.name), suffix=".tmp", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        id_width = max(6, len(str(options.size - 1)))
        chunk = max(1, min(256, math.ceil(options.size / (workers * 8))))
        jobs = [
            _Job(str(tmp), options, start, min(start + chunk, options.size), id_width)
            for start in range(0, options.size, chunk)
        ]
        workers = min(workers, len(jobs))
        log.info("drawing %d scenes with %d worker(s) into %s", options.size, workers, tmp)
        records: list[dict] = []
        if workers == 1:
            for job in jobs:
                done = _run_job(job)
                records.extend(done)
                if progress is not None:
                    progress(len(done))
        else:
            # "spawn": a forked child inherits locks held by the parent's other threads (OpenCV's,
            # ONNX Runtime's, torch's) and can wait on them forever.
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
                for done in pool.imap(_run_job, jobs):
                    records.extend(done)
                    if progress is not None:
                        progress(len(done))

        counts = options.split_counts()
        tasks: Counter = Counter()
        for record in records:
            tasks.update(m["task"] for m in record["conversations"] if m["from"] == "human")
        task_counts = {t: tasks[t] for t in ("caption", "describe", "list", *_QUESTION_MAKERS) if tasks[t]}
        start = 0
        for split in SPLITS:
            _write_records(tmp / f"{split}.json", records[start : start + counts[split]])
            start += counts[split]
        meta = {
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "vledge_version": __version__,
            "options": asdict(options),
            "counts": counts,
            "tasks": task_counts,
            "vocabulary": _vocabulary(options),
            "colors_bgr": {name: list(bgr) for name, bgr in COLORS.items()},
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = SynthSummary(out_dir, counts, task_counts, time.perf_counter() - started)
    log.info("%s", summary.describe())
    return summary


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    _check_target(out_dir, overwrite)  # it may have appeared while we were drawing
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
