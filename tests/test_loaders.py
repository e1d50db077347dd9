"""Dataset loaders on small datasets built in tmp_path, with bad records of every kind."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from vledge.data.loaders import (
    CAPTION_QUESTIONS,
    CLASSIFY_QUESTION,
    coco_image_root,
    load_coco_captions,
    load_image_folder,
    load_llava,
    load_records,
)
from vledge.data.records import Turn
from vledge.errors import DataError


def write_image(path: Path, value: int = 100) -> Path:
    """A real 16x16 picture written by OpenCV (PNG or JPEG by the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((16, 16, 3), value, dtype=np.uint8)
    image[4:12, 4:12] = (0, 0, 255)
    assert cv2.imwrite(str(path), image)
    return path


def write_bad_images(folder: Path) -> None:
    """zero.png (0 bytes), cut.jpg (first half of a JPEG), text.jpg (text named .jpg)."""
    (folder / "zero.png").write_bytes(b"")
    ok, jpeg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    assert ok
    data = jpeg.tobytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("this is not a picture\n")


def conv(*pairs, task=None):
    messages = []
    for question, answer in pairs:
        human = {"from": "human", "value": question}
        if task:
            human["task"] = task
        messages += [human, {"from": "gpt", "value": answer}]
    return messages


def entry(record_id, conversations, image="images/a.png"):
    return {"id": record_id, "image": image, "conversations": conversations}


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------ LLaVA


@pytest.fixture
def llava_dir(tmp_path):
    images = tmp_path / "images"
    write_image(images / "a.png")
    write_image(images / "b.jpg", 30)
    write_bad_images(images)
    good = [
        entry("10", conv(("<image>\nHow many squares?", "One."), task="count")),
        {
            "id": "2",
            "image": "images/b.jpg",
            "conversations": [
                {"from": "user", "value": "What color is the square?\n<image>"},
                {"from": "assistant", "value": " Red. "},
                {"from": "human", "value": "And the background?", "task": "color"},
                {"from": "gpt", "value": "Dark gray."},
            ],
        },
        {"id": 7, "image": "images/a.png", "conversations": conv(("<image>", "A red square on gray."))},
    ]
    bad_images = [
        {"id": "zero", "image": "images/zero.png", "conversations": conv(("<image>\nq", "a"))},
        {"id": "cut", "image": "images/cut.jpg", "conversations": conv(("<image>\nq", "a"))},
        {"id": "text", "image": "images/text.jpg", "conversations": conv(("<image>\nq", "a"))},
    ]
    bad = [
        {"id": "gone", "image": "images/missing.png", "conversations": conv(("<image>\nq", "a"))},
        {"id": "textonly", "conversations": conv(("hello", "hi"))},
        {"id": "noanswer", "image": "images/a.png", "conversations": conv(("<image>\nq", "   "))},
        entry("unanswered", conv(("<image>\nq", "a")) + [{"from": "human", "value": "more?"}]),
        {"id": "noplaceholder", "image": "images/a.png", "conversations": conv(("What is this?", "a"))},
        entry("twoplaceholders", conv(("<image>\nq", "a"), ("<image> again", "b"))),
        {"id": "nopair", "image": "images/a.png", "conversations": []},
        {"id": "onlyhuman", "image": "images/a.png", "conversations": [{"from": "human", "value": "<image>\nq"}]},
        {
            "id": "gptfirst",
            "image": "images/a.png",
            "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>\nq"}],
        },
        {
            "id": "twohumans",
            "image": "images/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nq"},
                {"from": "human", "value": "q2"},
                {"from": "gpt", "value": "a"},
                {"from": "gpt", "value": "b"},
            ],
        },
        {"id": "emptyfollowup", "image": "images/a.png", "conversations": conv(("<image>\nq", "a"), ("  ", "b"))},
        "not a dict",
        ["a", "list"],
        {"id": "convstr", "image": "images/a.png", "conversations": "<image> hi"},
        entry("valuenum", [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]),
        entry("role", [{"from": "system", "value": "<image>"}, {"from": "gpt", "value": "a"}]),
        {"id": ["x"], "image": "images/a.png", "conversations": conv(("<image>\nq", "a"))},
        {"id": "imagenum", "image": 5, "conversations": conv(("<image>\nq", "a"))},
        {"id": "tasknum", "image": "images/a.png", "conversations": conv(("<image>\nq", "a"), task=3)},
    ]
    write_json(tmp_path / "data.json", good + bad_images + bad)
    return tmp_path


EXPECTED_LLAVA_SKIPS = {
    "image missing": 1,
    "no image": 1,
    "no answer": 2,
    "no image placeholder": 1,
    "several image placeholders": 1,
    "no conversation": 2,
    "turns not alternating": 2,
    "no question": 1,
    "malformed record": 8,
}


def test_load_llava_keeps_good_records_and_counts_every_skip(llava_dir):
    records, report = load_llava(llava_dir / "data.json")
    # Without verify_images the zero-byte, truncated and text "images" exist, so they are kept.
    assert [r.id for r in records] == ["2", "7", "10", "cut", "text", "zero"]
    assert report.kept == 6
    assert dict(report.skipped) == EXPECTED_LLAVA_SKIPS

    by_id = {r.id: r for r in records}
    assert by_id["10"].turns == (Turn("How many squares?", "One.", "count"),)
    assert by_id["2"].turns == (
        Turn("What color is the square?", "Red.", "chat"),
        Turn("And the background?", "Dark gray.", "color"),
    )
    assert by_id["7"].turns == (Turn("", "A red square on gray.", "chat"),)  # the image alone is the question
    assert by_id["10"].image == (llava_dir / "images" / "a.png").absolute()
    assert all(r.image.is_absolute() for r in records)


def test_load_llava_verify_images_rejects_broken_files(llava_dir):
    records, report = load_llava(llava_dir / "data.json", verify_images=True)
    assert [r.id for r in records] == ["2", "7", "10"]
    assert report.skipped["image unreadable"] == 3  # zero-byte, truncated JPEG, text named .jpg
    assert dict(report.skipped) == {**EXPECTED_LLAVA_SKIPS, "image unreadable": 3}
    assert report.summary().startswith(f"{llava_dir / 'data.json'} (LLaVA): kept 3 records, skipped 22 (")


def test_verify_images_catches_jpeg_cut_inside_its_scan(tmp_path):
    """Some OpenCV builds decode a JPEG cut inside its scan data as grey-filled, not as a failure."""
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ok, jpeg = cv2.imencode(".jpg", noise)
    data = jpeg.tobytes()
    assert data.rfind(b"\xff\xda") < len(data) * 0.9  # the cut falls after the start of scan
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "late_cut.jpg").write_bytes(data[: int(len(data) * 0.9)])
    (tmp_path / "img" / "whole.jpg").write_bytes(data)
    entries = [entry(name, conv(("<image>\nq", "a")), image=f"img/{name}.jpg") for name in ("late_cut", "whole")]
    records, report = load_llava(write_json(tmp_path / "d.json", entries), verify_images=True)
    assert [r.id for r in records] == ["whole"]
    assert dict(report.skipped) == {"image unreadable": 1}


def test_load_llava_image_root_and_duplicate_ids(tmp_path):
    write_image(tmp_path / "pics" / "x.png")
    entries = [
        {"id": "same", "image": "x.png", "conversations": conv(("<image>\nfirst", "a"))},
        {"id": "same", "image": "x.png", "conversations": conv(("<image>\nsecond", "b"))},
        {"image": "x.png", "conversations": conv(("<image>\nno id", "c"))},
    ]
    json_path = write_json(tmp_path / "ann" / "conv.json", entries)
    records, report = load_llava(json_path, image_root=tmp_path / "pics")
    assert [r.id for r in records] == ["conv-2", "same", "same#2"]
    assert [r.turns[0].question for r in records] == ["no id", "first", "second"]
    assert report.kept == 3 and not report.skipped

    records, report = load_llava(json_path)  # default root: the JSON's folder, where x.png is not
    assert records == [] and report.skipped == Counter({"image missing": 3})


def test_load_llava_bad_files_raise_data_error_naming_the_file(tmp_path):
    not_json = tmp_path / "broken.json"
    not_json.write_text("{ this is not json")
    with pytest.raises(DataError, match="broken.json"):
        load_llava(not_json)
    a_dict = write_json(tmp_path / "dict.json", {"records": []})
    with pytest.raises(DataError, match="dict.json"):
        load_llava(a_dict)
    with pytest.raises(DataError, match="absent.json"):
        load_llava(tmp_path / "absent.json")


def test_logging_summary(llava_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vledge.data.loaders"):
        load_llava(llava_dir / "data.json")
    assert any(r.levelno == logging.WARNING and "kept 6 records" in r.getMessage() for r in caplog.records)

    write_image(tmp_path / "ok" / "x.png")
    json_path = write_json(tmp_path / "ok" / "train.json", [entry("1", conv(("<image>\nq", "a")), image="x.png")])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vledge.data.loaders"):
        load_llava(json_path)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [(logging.INFO, f"{json_path} (LLaVA): kept 1 records")]


# ------------------------------------------------------------------ COCO captions


@pytest.fixture
def coco_dir(tmp_path):
    write_image(tmp_path / "val2017" / "000000000001.jpg")
    write_image(tmp_path / "val2017" / "000000000002.png")
    write_bad_images(tmp_path / "val2017")
    data = {
        "info": {},
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "height": 16, "width": 16},
            {"id": 2, "file_name": "000000000002.png"},
            {"id": 3, "file_name": "missing.jpg"},
            {"id": 4, "file_name": "cut.jpg"},
            {"id": 5},  # no file name
        ],
        "annotations": [
            {"id": 101, "image_id": 1, "caption": "A red square on a gray background.\n"},
            {"id": 102, "image_id": 1, "caption": "  A  small   red square. "},
            {"id": 9, "image_id": 2, "caption": "A square."},
            {"id": 103, "image_id": 3, "caption": "An image that is not there."},
            {"id": 104, "image_id": 99, "caption": "Unknown image."},
            {"id": 105, "image_id": 2, "caption": "   "},
            {"id": 106, "image_id": 4, "caption": "A truncated picture."},
            {"id": 107, "image_id": 1},
            "not a dict",
        ],
    }
    write_json(tmp_path / "annotations" / "captions_val2017.json", data)
    return tmp_path


def test_load_coco_captions(coco_dir):
    json_path = coco_dir / "annotations" / "captions_val2017.json"
    assert coco_image_root(json_path) == coco_dir / "val2017"
    records, report = load_coco_captions(json_path)
    assert [r.id for r in records] == ["coco-9", "coco-101", "coco-102", "coco-106"]
    assert dict(report.skipped) == {
        "image missing": 1,
        "unknown image id": 1,
        "no caption": 1,
        "malformed record": 2,
        "malformed image entry": 1,
    }
    first = records[1]
    assert first.image == (coco_dir / "val2017" / "000000000001.jpg").absolute()
    (turn,) = first.turns
    assert turn.task == "caption"
    assert turn.answer == "A red square on a gray background."
    assert records[2].turns[0].answer == "A small red square."
    assert all(r.turns[0].question in CAPTION_QUESTIONS for r in records)
    # The instruction is a pure function of the annotation id: the same on every load.
    again, _ = load_coco_captions(json_path)
    assert [r.turns[0].question for r in again] == [r.turns[0].question for r in records]
    assert len({r.turns[0].question for r in records}) > 1  # not always the same instruction


def test_load_coco_captions_verify_and_explicit_root(coco_dir, tmp_path):
    json_path = coco_dir / "annotations" / "captions_val2017.json"
    records, report = load_coco_captions(json_path, verify_images=True)
    assert [r.id for r in records] == ["coco-9", "coco-101", "coco-102"]
    assert report.skipped["image unreadable"] == 1

    records, report = load_coco_captions(json_path, image_root=tmp_path / "elsewhere")
    assert records == [] and report.skipped["image missing"] == 5


def test_coco_image_root_rule(tmp_path):
    # captions JSON inside the image folder itself; and a JSON without a split in its name
    inside = write_json(tmp_path / "train2014" / "captions_train2014.json", {"images": [], "annotations": []})
    assert coco_image_root(inside) == tmp_path / "train2014"
    plain = write_json(tmp_path / "data" / "caps.json", {"images": [], "annotations": []})
    assert coco_image_root(plain) == tmp_path / "data"
    nested = write_json(tmp_path / "c" / "captions_val.json", {"images": [], "annotations": []})
    (tmp_path / "c" / "val").mkdir()
    assert coco_image_root(nested) == tmp_path / "c" / "val"


def test_load_coco_rejects_wrong_shape(tmp_path):
    path = write_json(tmp_path / "captions_x.json", {"annotations": {}})
    with pytest.raises(DataError, match="captions_x.json"):
        load_coco_captions(path)


# ------------------------------------------------------------------ ImageFolder


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pets"
    write_image(root / "golden_retriever" / "b.png")
    write_image(root / "golden_retriever" / "a.JPG")
    write_image(root / "golden_retriever" / "more" / "c.jpeg")
    write_image(root / "tabby_cat" / "x.bmp")
    (root / "tabby_cat" / "notes.txt").write_text("not an image")
    write_bad_images(root / "tabby_cat")
    (root / "empty_class").mkdir()
    write_image(root / ".ipynb_checkpoints" / "hidden.png")
    (root / "README.md").write_text("files in the root are not records")
    return root


def test_load_image_folder(folder):
    records, report = load_image_folder(folder)
    assert [r.id for r in records] == [
        "golden_retriever/a.JPG",
        "golden_retriever/b.png",
        "golden_retriever/more/c.jpeg",
        "tabby_cat/cut.jpg",
        "tabby_cat/text.jpg",
        "tabby_cat/x.bmp",
        "tabby_cat/zero.png",
    ]
    assert dict(report.skipped) == {"not an image": 1}
    assert records[0].turns == (Turn(CLASSIFY_QUESTION, "golden retriever", "classify"),)
    assert records[-1].turns[0].answer == "tabby cat"
    assert records[0].image == (folder / "golden_retriever" / "a.JPG").absolute()


def test_load_image_folder_verify(folder):
    records, report = load_image_folder(folder, verify_images=True)
    assert len(records) == 4
    assert dict(report.skipped) == {"not an image": 1, "image unreadable": 3}


def test_load_image_folder_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="nothing_here"):
        load_image_folder(tmp_path / "nothing_here")


# ------------------------------------------------------------------ dispatch


def test_load_records_split_json_folder(tmp_path):
    """The vledge synthetic layout: train.json / val.json beside an images folder."""
    write_image(tmp_path / "images" / "0.png")
    for split in ("train", "val"):
        entry = {"id": f"{split}-0", "image": "images/0.png", "conversations": conv(("<image>\nq", split))}
        write_json(tmp_path / f"{split}.json", [entry])
    records, report = load_records(tmp_path)
    assert [r.id for r in records] == ["train-0"]
    records, _ = load_records(tmp_path, split="val")
    assert records[0].turns[0].answer == "val"
    with pytest.raises(DataError, match=r"no test\.json.*train\.json, val\.json"):
        load_records(tmp_path, split="test")


def test_load_records_json_files(llava_dir, coco_dir):
    records, report = load_records(llava_dir / "data.json")
    assert "(LLaVA)" in report.source and report.kept == 6
    records, report = load_records(coco_dir / "annotations" / "captions_val2017.json")
    assert "(COCO captions)" in report.source and report.kept == 4
    records, report = load_records(coco_dir, split="val2017")  # the COCO root folder
    assert report.kept == 4


def test_load_records_image_folders(folder, tmp_path):
    (folder / "labels.json").write_text("{}")  # a JSON not named after a split does not hide the classes
    records, report = load_records(folder)
    assert "(ImageFolder)" in report.source and report.kept == 7

    write_image(tmp_path / "splits" / "train" / "cat" / "1.png")
    write_image(tmp_path / "splits" / "val" / "dog" / "2.png")
    records, _ = load_records(tmp_path / "splits")
    assert [r.turns[0].answer for r in records] == ["cat"]
    records, _ = load_records(tmp_path / "splits", split="val")
    assert [r.turns[0].answer for r in records] == ["dog"]
    with pytest.raises(DataError, match="no test/ folder.*train, val"):
        load_records(tmp_path / "splits", split="test")


def test_load_records_errors_name_the_path(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="notes.txt"):
        load_records(text)
    broken = tmp_path / "broken.json"
    broken.write_text("not json at all")
    with pytest.raises(DataError, match="broken.json"):
        load_records(broken)
    scalar = write_json(tmp_path / "scalar.json", 42)
    with pytest.raises(DataError, match="scalar.json"):
        load_records(scalar)
    with pytest.raises(DataError, match="absent"):
        load_records(tmp_path / "absent")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no dataset recognised; looked for train\.json"):
        load_records(empty)


def test_cli_data_inspect(llava_dir):
    from click.testing import CliRunner

    from vledge.cli import main

    (llava_dir / "train.json").write_bytes((llava_dir / "data.json").read_bytes())
    result = CliRunner().invoke(main, ["data", "inspect", str(llava_dir)])
    assert result.exit_code == 0, result.output
    assert "kept 6 records" in result.output
    assert "count      1 turns" in result.output

    result = CliRunner().invoke(main, ["data", "inspect", str(llava_dir / "nothing")])
    assert result.exit_code == 1
    assert "DataError" in result.output and "nothing" in result.output


def test_official_coco_layout_with_dated_splits(tmp_path):
    from vledge.data.loaders import load_records

    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    cv2.imwrite(str(tmp_path / "train2017" / "000001.jpg"), np.zeros((16, 16, 3), np.uint8))
    coco = {"images": [{"id": 1, "file_name": "000001.jpg"}],
            "annotations": [{"id": 7, "image_id": 1, "caption": "A black square."}]}
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(coco))
    records, report = load_records(tmp_path, split="train")
    assert report.kept == 1 and records[0].turns[0].answer == "A black square."
    assert (records[0].image.parent.name, records[0].image.name) == ("train2017", "000001.jpg")
    with pytest.raises(DataError, match="none for split 'val'"):
        load_records(tmp_path, split="val")
