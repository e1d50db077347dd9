"""Conversations: the exact captions, descriptions and question-answer turns of a scene."""

from __future__ import annotations

from collections import Counter

import numpy as np

from vledge.data.records import Turn
from vledge.data.synth.scenes import PLURALS, RELATIONS, SHAPES, Scene, SceneObject, position_name
from vledge.errors import ConfigError
from vledge.prompt import CAPTION_PROMPT

_CAPTION_QUESTIONS = (CAPTION_PROMPT, "What is in this image?", "Write a short caption.")
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
    raise ConfigError(f"unknown relation {relation!r}; choose from {RELATIONS}")


def _relation_question(scene: Scene, rng: np.random.Generator) -> Turn | None:
    if len(scene.objects) < 2:
        return None
    want = rng.random() < 0.5  # balance yes and no
    options = [
        (a, rel, b)
        for a in scene.objects
        for b in scene.objects
        if a is not b
        for rel in RELATIONS
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
# The question tasks, in the order dataset.json counts them.
QUESTION_TASKS = tuple(_QUESTION_MAKERS)


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

