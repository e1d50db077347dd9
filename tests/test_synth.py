"""The built-in synthetic data: deterministic, atomic, and every label true to the pixels.

Answers are recomputed here from each record's "scene" field with the test's
own tables, not with the generator's helpers, so a labelling bug cannot hide
behind the code it would be checked with.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from vledge.data import synth
from vledge.data.records import TASKS
from vledge.data.synth import Scene, SceneObject, SynthOptions, generate_dataset
from vledge.errors import ConfigError, DataError

POSITIONS_3X3 = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]
WHERE = {"center": "in the center", "left": "on the left", "right": "on the right"}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(folder: Path) -> dict[str, list[dict]]:
    return {split: json.loads((folder / f"{split}.json").read_text()) for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(out, SynthOptions(size=60, seed=3, word_probability=0.5), workers=2)
    return out


# --------------------------------------------------------------------------- files


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, dataset):
    again = tmp_path / "again"
    ticks: list[int] = []
    summary = generate_dataset(again, SynthOptions(size=60, seed=3, word_probability=0.5), workers=1, progress=ticks.append)
    assert sum(ticks) == 60
    assert summary.counts == {"train": 54, "val": 3, "test": 3}
    assert "60 synthetic images" in summary.describe()
    assert _files(again) == _files(dataset)

    other = tmp_path / "other"
    generate_dataset(other, SynthOptions(size=60, seed=4, word_probability=0.5), workers=1)
    assert (other / "train.json").read_bytes() != (dataset / "train.json").read_bytes()
    assert (other / "images/000000.jpg").read_bytes() != (dataset / "images/000000.jpg").read_bytes()


def test_splits_add_up_and_are_disjoint(dataset):
    records = _records(dataset)
    meta = json.loads((dataset / "dataset.json").read_text())
    ids = {split: [r["id"] for r in rs] for split, rs in records.items()}
    assert {split: len(v) for split, v in ids.items()} == meta["counts"] == {"train": 54, "val": 3, "test": 3}
    everything = ids["train"] + ids["val"] + ids["test"]
    assert len(set(everything)) == 60
    assert sorted(p.name for p in (dataset / "images").iterdir()) == sorted(f"{i}.jpg" for i in everything)
    tasks = Counter(m["task"] for rs in records.values() for r in rs for m in r["conversations"] if m["from"] == "human")
    assert meta["tasks"] == dict(tasks)
    assert meta["generator"] == "vledge.data.synth"
    assert meta["vocabulary"]["positions"] == [p for row in POSITIONS_3X3 for p in row]


def test_existing_output_needs_overwrite_and_is_replaced_only_when_done(tmp_path, monkeypatch):
    out = tmp_path / "out"
    generate_dataset(out, SynthOptions(size=8), workers=1)
    with pytest.raises(DataError, match="already exists"):
        generate_dataset(out, SynthOptions(size=8), workers=1)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(synth.dataset, "_record", broken)
    with pytest.raises(RuntimeError):
        generate_dataset(out, SynthOptions(size=5, seed=1), workers=1, overwrite=True)
    monkeypatch.undo()
    assert len(_records(out)["train"]) + len(_records(out)["val"]) + len(_records(out)["test"]) == 8  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind

    generate_dataset(out, SynthOptions(size=5, seed=1), workers=1, overwrite=True)
    assert len(list((out / "images").iterdir())) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_to_replace_a_folder_that_is_not_synthetic_data(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a vledge synthetic dataset"):
        generate_dataset(precious, SynthOptions(size=4), workers=1, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_cli_data_synth(tmp_path):
    from vledge.cli import main

    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(out), "--size", "40"])
    assert result.exit_code == 0, result.output
    assert "40 synthetic images" in result.output
    assert sum(len(v) for v in _records(out).values()) == 40
    again = CliRunner().invoke(main, ["data", "synth", "--out", str(out), "--size", "40"])
    assert again.exit_code != 0 and "DataError" in again.output


@pytest.mark.parametrize(
    "field, value",
    [
        ("size", 0),
        ("seed", -1),
        ("image_size", 20),
        ("grid", 7),
        ("min_objects", 0),
        ("max_objects", 10),
        ("word_probability", 1.5),
        ("splits", (0.5, 0.2, 0.2)),
        ("splits", (0.0, 0.5, 0.5)),
        ("image_format", "gif"),
    ],
)
def test_invalid_options_raise_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        SynthOptions(**{field: value})


# --------------------------------------------------------------------------- labels


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _where_phrase(position: str) -> str:
    return WHERE.get(position, "at the " + position)


def _expected_answer(question: str, scene: dict) -> str:
    """Answer a question from the scene metadata alone; fails on any phrasing it does not know."""
    objects = scene["objects"]
    if question in ("How many objects are there?", "How many objects are in the image?", "Count the objects."):
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+)s are (?:there|in the image)\?", question):
        return str(sum(o["shape"] == m[1] for o in objects))
    if m := re.fullmatch(r"(?:What color is|What is the color of) the (\w+)\?", question):
        matches = [o for o in objects if o["shape"] == m[1]]
        assert len(matches) == 1, f"ambiguous: {question}"
        return matches[0]["color"]
    if m := re.fullmatch(r"(?:What shape is|What is the shape of) the (\w+) object\?", question):
        matches = [o for o in objects if o["color"] == m[1]]
        assert len(matches) == 1, f"ambiguous: {question}"
        return matches[0]["shape"]
    if m := re.fullmatch(r"What (color|shape) is the object (.+)\?", question):
        (obj,) = [o for o in objects if _where_phrase(POSITIONS_3X3[o["row"]][o["col"]]) == m[2]]
        return obj[m[1]]
    if m := re.fullmatch(r"What is (at the .+|in the center|on the left|on the right)\?", question):
        here = [o for o in objects if _where_phrase(POSITIONS_3X3[o["row"]][o["col"]]) == m[1]]
        return _article(f"{here[0]['color']} {here[0]['shape']}") if here else "nothing"
    if m := re.fullmatch(r"Where is the (\w+) (\w+)(?: located)?\?", question):
        (obj,) = [o for o in objects if (o["color"], o["shape"]) == (m[1], m[2])]
        return POSITIONS_3X3[obj["row"]][obj["col"]]
    if m := re.fullmatch(r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?", question):
        (a,) = [o for o in objects if (o["color"], o["shape"]) == (m[1], m[2])]
        (b,) = [o for o in objects if (o["color"], o["shape"]) == (m[4], m[5])]
        holds = {
            "to the left of": a["col"] < b["col"],
            "to the right of": a["col"] > b["col"],
            "above": a["row"] < b["row"],
            "below": a["row"] > b["row"],
        }[m[3]]
        return "yes" if holds else "no"
    if question in ("What word is written in the image?", "What does the text in the image say?"):
        assert scene["word"] is not None
        return scene["word"]
    ordered = sorted(objects, key=lambda o: (o["row"], o["col"]))
    names = [_article(f"{o['color']} {o['shape']}") for o in ordered]
    if question in ("Describe the image briefly.", "What is in this image?", "Write a short caption."):
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if question in ("Describe the image in detail.", "Give a detailed description of the image."):
        n = len(objects)
        parts = ["There is 1 object." if n == 1 else f"There are {n} objects."]
        for o in ordered:
            pos = POSITIONS_3X3[o["row"]][o["col"]]
            where = WHERE.get(pos, "at the " + pos)
            parts.append(f"{where[0].upper()}{where[1:]}, a {o['size']} {o['color']} {o['shape']}.")
        if scene["word"] is not None:
            pos = POSITIONS_3X3[scene["word_cell"][0]][scene["word_cell"][1]]
            parts.append(f"The word {scene['word']} is written {WHERE.get(pos, 'at the ' + pos)}.")
        return " ".join(parts)
    if question in ("List the objects by shape.", "Group the objects by shape."):
        parts, absent = [], []
        for shape in ("circle", "square", "triangle", "diamond", "star"):
            group = [o for o in ordered if o["shape"] == shape]
            if not group:
                absent.append(shape + "s")
                continue
            places = ", ".join(f"{o['color']} {_where_phrase(POSITIONS_3X3[o['row']][o['col']])}" for o in group)
            parts.append(f"{len(group)} {shape if len(group) == 1 else shape + 's'}: {places}.")
        if absent:
            parts.append("No " + (absent[0] if len(absent) == 1 else ", ".join(absent[:-1]) + " or " + absent[-1]) + ".")
        return " ".join(parts)
    raise AssertionError(f"unknown question: {question!r}")


def test_every_answer_follows_from_the_scene(dataset):
    records = [r for rs in _records(dataset).values() for r in rs]
    seen_tasks = Counter()
    for record in records:
        scene, conv = record["scene"], record["conversations"]
        assert 1 <= len(scene["objects"]) <= 6
        cells = [(o["row"], o["col"]) for o in scene["objects"]]
        assert len(set(cells)) == len(cells)
        assert len({(o["color"], o["shape"]) for o in scene["objects"]}) == len(cells)
        if scene["word"] is not None:
            assert tuple(scene["word_cell"]) not in cells
        assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2)
        humans = conv[0::2]
        assert humans[0]["value"].startswith("<image>\n")
        assert not any("<image>" in m["value"] for m in conv[1:])
        questions = [m["value"].removeprefix("<image>\n") for m in humans]
        assert len(set(questions)) == len(questions)
        tasks = [m["task"] for m in humans]
        assert all(t in TASKS for t in tasks)
        assert sum(t in ("caption", "describe") for t in tasks) == 1
        assert tasks.count("list") == 1
        assert 5 <= len(tasks) <= 7
        if scene["word"] is not None:
            assert "read" in tasks
        for question, human, answer in zip(questions, humans, conv[1::2]):
            assert answer["value"] == _expected_answer(question, scene), (record["id"], question)
            seen_tasks[human["task"]] += 1
    assert set(seen_tasks) == {"caption", "describe", "list", "count", "color", "shape", "position", "relation", "read"}


def test_conversations_are_balanced():
    options = SynthOptions()
    first, relation = Counter(), Counter()
    for i in range(1500):
        rng = np.random.default_rng([9, i])
        scene = synth.random_scene(rng, options)
        turns = synth.scene_conversation(scene, rng)
        first[turns[0].task] += 1
        relation.update(t.answer for t in turns if t.task == "relation")
    assert set(first) == {"caption", "describe", "list", "count", "color", "shape", "position", "relation", "read"}
    assert 0.4 < relation["yes"] / (relation["yes"] + relation["no"]) < 0.6


# --------------------------------------------------------------------------- pixels


def _nearest_color(pixel: np.ndarray) -> tuple[str, float]:
    distances = {name: float(np.linalg.norm(pixel - np.array(bgr, float))) for name, bgr in synth.COLORS.items()}
    name = min(distances, key=distances.get)
    return name, distances[name]


def _patch(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """Median colour of the 3x3 pixels around (x, y): robust to noise and JPEG ringing."""
    xi, yi = int(round(x)), int(round(y))
    return np.median(image[yi - 1 : yi + 2, xi - 1 : xi + 2].reshape(-1, 3).astype(float), axis=0)


def test_pixels_agree_with_the_labels(dataset):
    for records in _records(dataset).values():
        for record in records:
            scene = record["scene"]
            image = cv2.imread(str(dataset / record["image"]), cv2.IMREAD_COLOR)
            assert image.shape == (64, 64, 3)
            cell = 64 / 3
            background = np.array(scene["background"], float)
            for obj in scene["objects"]:
                x = (obj["col"] + 0.5 + obj["offset"][0]) * cell - 0.5
                y = (obj["row"] + 0.5 + obj["offset"][1]) * cell - 0.5
                name, distance = _nearest_color(_patch(image, x, y))
                assert (name, obj["color"]) == (obj["color"], name) and distance < 60, (record["id"], obj, distance)
                if obj["shape"] == "circle":  # small ones end at 0.25 of the cell from the centre, large ones at 0.4
                    edge = _patch(image, x + 0.32 * cell, y)
                    inside = _nearest_color(edge)[0] == obj["color"] and _nearest_color(edge)[1] < 80
                    assert inside == (obj["size"] == "large"), (record["id"], obj)
            full = {(o["row"], o["col"]) for o in scene["objects"]}
            if scene["word_cell"] is not None:
                full.add(tuple(scene["word_cell"]))
            for row in range(3):
                for col in range(3):
                    if (row, col) not in full:  # empty cells show the background, within gradient and noise
                        centre = _patch(image, (col + 0.5) * cell - 0.5, (row + 0.5) * cell - 0.5)
                        assert np.abs(centre - background).max() < 30, (record["id"], row, col)


def test_background_is_far_from_every_object_color():
    options = SynthOptions()
    for i in range(2000):
        scene = synth.random_scene(np.random.default_rng([1, i]), options)
        assert max(scene.background) - min(scene.background) <= 24  # low saturation
        for bgr in synth.COLORS.values():
            assert np.linalg.norm(np.subtract(scene.background, bgr)) > 100


@pytest.mark.parametrize("image_size", [96, 128, 224])
def test_geometry_scales_with_the_image(image_size):
    scene = Scene(
        objects=(SceneObject("star", "yellow", "small", 0, 0), SceneObject("triangle", "blue", "large", 2, 1)),
        background=(60, 60, 60),
        word="fox",
        word_cell=(1, 2),
    )
    image = synth.render_scene(scene, image_size, np.random.default_rng(0))
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    cell = image_size / 3
    assert _nearest_color(_patch(image, cell / 2, cell / 2))[0] == "yellow"
    assert _nearest_color(_patch(image, 1.5 * cell, 2.5 * cell))[0] == "blue"
    word = image[int(cell) : int(2 * cell), int(2 * cell) :]
    assert (word.min(axis=2) > 180).sum() > cell  # light text was drawn in its cell
    assert Scene.from_dict(scene.to_dict()) == scene


def test_caption_and_describe():
    scene = Scene(
        objects=(
            SceneObject("circle", "red", "large", 0, 0),
            SceneObject("square", "blue", "small", 1, 1),
            SceneObject("triangle", "green", "large", 2, 2),
        ),
        background=(50, 50, 50),
        word="cat",
        word_cell=(0, 1),
    )
    assert synth.caption(scene) == "a red circle, a blue square and a green triangle"
    assert synth.describe(scene) == (
        "There are 3 objects. At the top left, a large red circle. In the center, a small blue square. "
        "At the bottom right, a large green triangle. The word cat is written at the top."
    )
    assert synth.caption(Scene(scene.objects[:1], (50, 50, 50))) == "a red circle"


@pytest.mark.parametrize("grid", [2, 4])
def test_other_grids(grid):
    options = SynthOptions(size=4, grid=grid, image_size=32 * grid, max_objects=grid * grid)
    rng = np.random.default_rng([0, 0])
    scene = synth.random_scene(rng, options)
    assert synth.render_scene(scene, options.image_size, rng).shape == (32 * grid, 32 * grid, 3)
    names = synth.position_names(grid)
    assert len(set(names)) == grid * grid
    for turn in synth.scene_conversation(scene, rng):
        if turn.task == "position":
            assert turn.answer in names
    with pytest.raises(ConfigError, match="grid"):
        synth.render_scene(scene, options.image_size, rng, grid=3 if grid != 3 else 2)


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_dataset_gets_ordinary_modes_under_the_umask(tmp_path, umask, file_mode, folder_mode):
    import os

    previous = os.umask(umask)
    try:
        out = generate_dataset(tmp_path / "synth", SynthOptions(size=6, seed=2), workers=1).out_dir
    finally:
        os.umask(previous)
    files = {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    folders = {p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")] if p.is_dir()}
    assert files == {file_mode} and folders == {folder_mode}, (sorted(map(oct, files)), sorted(map(oct, folders)))
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]
