"""Read real datasets (LLaVA JSON, COCO captions, ImageFolder) into records.

Every loader returns ``(records, report)``: a bad record is skipped and counted
under a short, stable reason instead of failing the whole dataset, because real
datasets always contain a few. Only a file that cannot be read as a dataset at
all raises :class:`~vledge.errors.DataError`. Records come back sorted by id, so
the same data gives the same order (and the same seeded shuffle) on every run.

Torch-free: the runtime and the benchmarks use these too.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from vledge.data.jsonfile import TOO_DEEP, read_json
from vledge.data.records import LoadReport, Record, Turn
from vledge.errors import DataError
from vledge.prompt import CAPTION_PROMPT
from vledge.reads import MAX_IMAGE_FILE_BYTES, read_capped

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"  # the same string as vledge.tokenizer.IMAGE
# As torchvision.datasets.folder.IMG_EXTENSIONS, compared in lower case.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CAPTION_QUESTIONS = (CAPTION_PROMPT, "What is in this image?", "Write a short caption.")
CLASSIFY_QUESTION = "What is in this image?"
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")

HUMAN_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant"})

# Skip reasons: short and stable, because reports and tests compare them.
MALFORMED = "malformed record"
NO_IMAGE = "no image"
IMAGE_MISSING = "image missing"
IMAGE_UNREADABLE = "image unreadable"
NO_CONVERSATION = "no conversation"
NOT_ALTERNATING = "turns not alternating"
NO_QUESTION = "no question"
NO_ANSWER = "no answer"
NO_PLACEHOLDER = "no image placeholder"
EXTRA_PLACEHOLDER = "several image placeholders"
UNKNOWN_IMAGE_ID = "unknown image id"
MALFORMED_IMAGE_ENTRY = "malformed image entry"
NO_CAPTION = "no caption"
NOT_AN_IMAGE = "not an image"
NESTED_TOO_DEEP = "nested too deep"
OUTSIDE_DATASET = "image outside the dataset folder"
BAD_TEXT = "text not valid Unicode"
IMAGE_PATH_UNUSABLE = "image path unusable"


class _Skip(Exception):
    """Internal: this record is skipped for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- images


class _ImageChecker:
    """Says why an image cannot be used (or None), once per path: many records share an image."""

    def __init__(self, verify: bool) -> None:
        self.verify = verify
        self._seen: dict[Path, str | None] = {}

    def problem(self, path: Path) -> str | None:
        if path not in self._seen:
            try:
                self._seen[path] = _image_problem(path, self.verify)
            except (OSError, ValueError):  # a name too long for the file system, an embedded NUL, ...
                self._seen[path] = IMAGE_PATH_UNUSABLE
        return self._seen[path]


def _image_path(root: Path, name: str, allow_outside: bool) -> Path:
    """``name`` (from the dataset file) under ``root``; a name that leaves ``root`` is skipped unless allowed.

    The check is on the name as written (absolute, or ``..`` climbing out); links inside the dataset
    folder are the user's own and are followed.
    """
    path = root / name
    if not allow_outside:
        inside = os.path.normpath(path)
        if os.path.isabs(name) or not inside.startswith(os.path.join(os.path.normpath(root), "")):
            raise _Skip(OUTSIDE_DATASET)
    return path


def _valid_text(*texts: object) -> bool:
    """Lone surrogates (``"\\ud800"`` in JSON) decode into Python strings but are not text: no tokenizer takes them."""
    try:
        for text in texts:
            if isinstance(text, str):
                text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _image_problem(path: Path, verify: bool) -> str | None:
    if not path.is_file():
        return IMAGE_MISSING
    if verify and not _decodes(path):
        return IMAGE_UNREADABLE
    return None


def _decodes(path: Path) -> bool:
    """Whether OpenCV can decode the whole file; truncation is checked first because
    some OpenCV builds fill a cut-off JPEG with grey instead of failing."""
    try:  # a regular file under the size limit (not a FIFO, a device, or gigabytes)
        data = np.frombuffer(read_capped(path, MAX_IMAGE_FILE_BYTES, DataError, "image"), dtype=np.uint8)
    except DataError:
        return False
    if data.size == 0 or _looks_truncated(data.tobytes()):
        return False
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return False
    return image is not None and image.size > 0


def _looks_truncated(data: bytes) -> bool:
    if data.startswith(b"\xff\xd8"):  # JPEG: the end-of-image marker must follow the last scan
        last_scan = data.rfind(b"\xff\xda")
        return last_scan < 0 or data.rfind(b"\xff\xd9") < last_scan
    if data.startswith(b"\x89PNG\r\n\x1a\n"):  # PNG: must reach its IEND chunk
        return data.rfind(b"IEND") < 0
    return False


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


# --------------------------------------------------------------------------- shared helpers


def _natural_key(text: str) -> tuple:
    """Sort "img-2" before "img-10"; the raw id breaks ties such as "01" and "1"."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(part) if index % 2 else part for index, part in enumerate(parts)), text


def _finish(records: list[Record], report: LoadReport) -> tuple[list[Record], LoadReport]:
    """Make ids unique (later duplicates get "#2", "#3", ...), sort, count and log."""
    seen: set[str] = set()
    unique: list[Record] = []
    renamed = 0
    for record in records:
        record_id, copy = record.id, 1
        while record_id in seen:
            copy += 1
            record_id = f"{record.id}#{copy}"
        if record_id != record.id:
            renamed += 1
            record = Record(id=record_id, image=record.image, turns=record.turns)
        seen.add(record_id)
        unique.append(record)
    if renamed:
        log.info("%s: %d duplicate record ids renamed with a #n suffix", report.source, renamed)
    unique.sort(key=lambda record: _natural_key(record.id))
    report.kept = len(unique)
    log.log(logging.WARNING if report.skipped else logging.INFO, "%s", report.summary())
    return unique, report


def _skip(report: LoadReport, what: str, reason: str) -> None:
    report.skip(reason)
    log.debug("%s: skipped %s: %s", report.source, what, reason)


def _is_id(value: object) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- LLaVA


def load_llava(
    json_path: str | os.PathLike, image_root: str | os.PathLike | None = None, verify_images: bool = False,
    allow_outside_paths: bool = False,
) -> tuple[list[Record], LoadReport]:
    """LLaVA conversation JSON (a list of ``{"id", "image", "conversations"}``); images
    relative to ``image_root``, by default the JSON file's folder, and inside it unless
    ``allow_outside_paths``."""
    json_path = Path(json_path)
    data = read_json(json_path)
    return _llava_from_data(data, json_path, image_root, verify_images, allow_outside_paths)


def _llava_from_data(
    data: object, json_path: Path, image_root: str | os.PathLike | None, verify_images: bool,
    allow_outside: bool = False,
) -> tuple[list[Record], LoadReport]:
    if not isinstance(data, list):
        raise DataError(f"{json_path}: a LLaVA file holds a JSON list of records, found {type(data).__name__}")
    root = Path(image_root) if image_root is not None else json_path.parent
    root = root.absolute()
    report = LoadReport(source=f"{json_path} (LLaVA)")
    checker = _ImageChecker(verify_images)
    records = []
    for index, entry in enumerate(data):
        try:
            records.append(_llava_record(entry, index, json_path.stem, root, checker, allow_outside))
        except _Skip as skip:
            _skip(report, f"record {index}", skip.reason)
    return _finish(records, report)


def _llava_record(entry: object, index: int, stem: str, root: Path, checker: _ImageChecker,
                  allow_outside: bool) -> Record:
    if entry is TOO_DEEP:
        raise _Skip(NESTED_TOO_DEEP)
    if not isinstance(entry, dict):
        raise _Skip(MALFORMED)
    raw_id = entry.get("id")
    if raw_id is not None and not _is_id(raw_id):
        raise _Skip(MALFORMED)
    record_id = str(raw_id) if raw_id not in (None, "") else f"{stem}-{index}"
    image = entry.get("image")
    if image is None:
        raise _Skip(NO_IMAGE)  # text-only conversations exist in LLaVA mixes; vledge needs an image
    if not isinstance(image, str) or not image.strip():
        raise _Skip(MALFORMED)
    turns = _llava_turns(entry.get("conversations"))
    if not _valid_text(raw_id, image, *(text for turn in turns for text in (turn.question, turn.answer, turn.task))):
        raise _Skip(BAD_TEXT)
    path = _image_path(root, image.strip(), allow_outside)
    problem = checker.problem(path)
    if problem:
        raise _Skip(problem)
    return Record(id=record_id, image=path, turns=turns)


def _llava_turns(conversations: object) -> tuple[Turn, ...]:
    """Pair human/gpt messages into turns; the first question must hold the one image placeholder."""
    if not isinstance(conversations, list):
        raise _Skip(MALFORMED)
    messages = []
    for message in conversations:
        if not isinstance(message, dict):
            raise _Skip(MALFORMED)
        role, value, task = message.get("from"), message.get("value"), message.get("task", "chat")
        if not isinstance(role, str) or not isinstance(value, str) or not isinstance(task, str) or not task:
            raise _Skip(MALFORMED)
        role = role.lower()
        if role not in HUMAN_ROLES and role not in ASSISTANT_ROLES:
            raise _Skip(MALFORMED)
        messages.append((role in HUMAN_ROLES, value, task))
    if len(messages) < 2:
        raise _Skip(NO_CONVERSATION)
    for position, (is_human, _, _) in enumerate(messages):
        if is_human != (position % 2 == 0):
            raise _Skip(NOT_ALTERNATING)
    if len(messages) % 2:
        raise _Skip(NO_ANSWER)  # the last question was never answered

    placeholders = sum(value.count(IMAGE_PLACEHOLDER) for is_human, value, _ in messages if is_human)
    if IMAGE_PLACEHOLDER not in messages[0][1]:
        raise _Skip(NO_PLACEHOLDER)
    if placeholders > 1:
        raise _Skip(EXTRA_PLACEHOLDER)
    turns = []
    for position in range(0, len(messages), 2):
        _, question, task = messages[position]
        answer = messages[position + 1][1].strip()
        question = _strip_placeholder(question)
        if not answer:
            raise _Skip(NO_ANSWER)
        if not question and position > 0:  # the first question may be the image alone
            raise _Skip(NO_QUESTION)
        turns.append(Turn(question=question, answer=answer, task=task))
    return tuple(turns)


def _strip_placeholder(text: str) -> str:
    """ "<image>\\nWhat is this?" and "What is this?\\n<image>" both become "What is this?"."""
    return re.sub(r"\s*" + re.escape(IMAGE_PLACEHOLDER) + r"\s*", " ", text).strip()


# --------------------------------------------------------------------------- COCO captions


def load_coco_captions(
    json_path: str | os.PathLike, image_root: str | os.PathLike | None = None, verify_images: bool = False,
    allow_outside_paths: bool = False,
) -> tuple[list[Record], LoadReport]:
    """COCO ``captions_*.json``: one single-turn caption record per (image, caption) pair.

    Without ``image_root``, images are looked for in the split folder named by the
    file (``captions_val2017.json`` -> ``val2017/``) beside the JSON's folder, then
    inside it, and otherwise in the JSON's own folder; see :func:`coco_image_root`.
    """
    json_path = Path(json_path)
    data = read_json(json_path)
    return _coco_from_data(data, json_path, image_root, verify_images, allow_outside_paths)


def coco_image_root(json_path: str | os.PathLike) -> Path:
    """Where COCO images live by default: the first existing folder of ``<json dir>/../<split>``
    (the official ``annotations/`` + ``val2017/`` layout), ``<json dir>/<split>``, else ``<json dir>``."""
    json_path = Path(json_path)
    folder = json_path.parent
    stem = json_path.stem
    if stem.startswith("captions_") and len(stem) > len("captions_"):
        split = stem[len("captions_") :]
        for candidate in (folder.parent / split, folder / split):
            if candidate.is_dir():
                return candidate
    return folder


def _coco_from_data(
    data: object, json_path: Path, image_root: str | os.PathLike | None, verify_images: bool,
    allow_outside: bool = False,
) -> tuple[list[Record], LoadReport]:
    shaped = isinstance(data, dict) and all(isinstance(data.get(key), list) for key in ("images", "annotations"))
    if not shaped:
        raise DataError(f"{json_path}: a COCO captions file holds a JSON object with 'images' and 'annotations' lists")
    root = (Path(image_root) if image_root is not None else coco_image_root(json_path)).absolute()
    report = LoadReport(source=f"{json_path} (COCO captions)")
    checker = _ImageChecker(verify_images)

    files: dict[str | int, str] = {}
    for index, image in enumerate(data["images"]):
        if isinstance(image, dict) and _is_id(image.get("id")) and isinstance(image.get("file_name"), str):
            files.setdefault(image["id"], image["file_name"])
        else:
            _skip(report, f"image entry {index}", MALFORMED_IMAGE_ENTRY)

    records = []
    for index, annotation in enumerate(data["annotations"]):
        try:
            records.append(_coco_record(annotation, index, files, root, checker, allow_outside))
        except _Skip as skip:
            _skip(report, f"annotation {index}", skip.reason)
    return _finish(records, report)


def _coco_record(annotation: object, index: int, files: dict, root: Path, checker: _ImageChecker,
                 allow_outside: bool) -> Record:
    if annotation is TOO_DEEP:
        raise _Skip(NESTED_TOO_DEEP)
    if not isinstance(annotation, dict):
        raise _Skip(MALFORMED)
    image_id, caption, ann_id = annotation.get("image_id"), annotation.get("caption"), annotation.get("id")
    if not _is_id(image_id) or not isinstance(caption, str) or (ann_id is not None and not _is_id(ann_id)):
        raise _Skip(MALFORMED)
    if image_id not in files:
        raise _Skip(UNKNOWN_IMAGE_ID)
    answer = " ".join(caption.split())  # COCO captions carry stray newlines and double spaces
    if not answer:
        raise _Skip(NO_CAPTION)
    if not _valid_text(caption, files[image_id], image_id, ann_id):
        raise _Skip(BAD_TEXT)
    path = _image_path(root, files[image_id], allow_outside)
    problem = checker.problem(path)
    if problem:
        raise _Skip(problem)
    key = ann_id if ann_id is not None else f"{image_id}-{index}"
    # crc32, not hash(): the same annotation gets the same question in every process.
    question = CAPTION_QUESTIONS[zlib.crc32(str(key).encode()) % len(CAPTION_QUESTIONS)]
    return Record(id=f"coco-{key}", image=path, turns=(Turn(question=question, answer=answer, task="caption"),))


# --------------------------------------------------------------------------- ImageFolder


def load_image_folder(root: str | os.PathLike, verify_images: bool = False) -> tuple[list[Record], LoadReport]:
    """torchvision ImageFolder layout ``root/<class_name>/**/<image>``: one classify turn per image,
    answered by the class name with underscores as spaces. Hidden folders (``.ipynb_checkpoints``)
    are not classes; files directly in ``root`` are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (ImageFolder layout is <root>/<class_name>/<images>)")
    report = LoadReport(source=f"{root} (ImageFolder)")
    root = root.absolute()
    checker = _ImageChecker(verify_images)
    records = []
    for class_dir in _class_dirs(root):
        answer = class_dir.name.replace("_", " ").strip()
        for path in _files_under(class_dir):
            relative = path.relative_to(root).as_posix()
            if not _valid_text(answer, relative):  # names in bytes that are not UTF-8 (surrogate-escaped)
                _skip(report, relative.encode("utf-8", "replace").decode(), BAD_TEXT)
                continue
            if not _is_image_file(path):
                _skip(report, relative, NOT_AN_IMAGE)
                continue
            problem = checker.problem(path)
            if problem:
                _skip(report, relative, problem)
                continue
            turn = Turn(question=CLASSIFY_QUESTION, answer=answer, task="classify")
            records.append(Record(id=relative, image=path, turns=(turn,)))
    if not records and not report.skipped:
        log.warning("%s: no class folders with images", root)
    return _finish(records, report)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_under(folder: Path) -> Iterable[Path]:
    """Every file below ``folder`` in sorted order, following links like torchvision does."""
    for current, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            yield Path(current) / name


def _has_class_folders(root: Path) -> bool:
    return any(any(_is_image_file(p) for p in _files_under(d)) for d in _class_dirs(root))


# --------------------------------------------------------------------------- dispatch


def load_records(
    path: str | os.PathLike, split: str = "train", verify_images: bool = False, allow_outside_paths: bool = False
) -> tuple[list[Record], LoadReport]:
    """Recognise a dataset's layout and load it.

    A folder holding ``{split}.json`` (vledge synthetic data, LLaVA with splits) or
    ``annotations/captions_{split}.json`` (COCO); a ``.json`` file (a list is LLaVA, an
    object with "annotations" is COCO captions); an ImageFolder, either
    ``path/{split}/<class>/`` or ``path/<class>/``. Image names in a JSON file must stay
    inside its image folder unless ``allow_outside_paths`` (see docs/data.md).
    """
    outside = allow_outside_paths
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        return _load_json_file(path, verify_images, outside)

    split_json = path / f"{split}.json"
    if split_json.is_file():
        return _load_json_file(split_json, verify_images, outside)
    coco_json = path / "annotations" / f"captions_{split}.json"
    if coco_json.is_file():
        return load_coco_captions(coco_json, verify_images=verify_images, allow_outside_paths=outside)
    # the official layout names splits with a year: annotations/captions_train2017.json beside train2017/
    dated = sorted((path / "annotations").glob(f"captions_{split}[0-9][0-9][0-9][0-9].json"))
    if len(dated) == 1:
        return load_coco_captions(dated[0], verify_images=verify_images, allow_outside_paths=outside)
    if (path / "annotations").is_dir() and any((path / "annotations").glob("captions_*.json")):
        found = ", ".join(p.name for p in sorted((path / "annotations").glob("captions_*.json")))
        raise DataError(f"{path}: COCO annotations found ({found}) but none for split {split!r}; choose it with --split")
    split_json_files = sorted(p.name for p in path.glob("*.json") if p.stem.lower() in SPLIT_NAMES)
    if split_json_files:  # e.g. train.json and val.json beside images/: not an ImageFolder
        found = ", ".join(split_json_files)
        raise DataError(f"{path}: no {split}.json here (found {found}); choose the split with --split")
    split_dir = path / split
    if split_dir.is_dir() and _has_class_folders(split_dir):
        return load_image_folder(split_dir, verify_images)
    splits = sorted(d.name for d in _class_dirs(path) if d.name.lower() in SPLIT_NAMES)
    if splits:  # e.g. train/ and val/ but no test/: these are splits, not classes
        raise DataError(f"{path}: no {split}/ folder here (found splits {', '.join(splits)})")
    if _has_class_folders(path):
        return load_image_folder(path, verify_images)
    raise DataError(
        f"{path}: no dataset recognised; looked for {split}.json (LLaVA / vledge synthetic), "
        f"annotations/captions_{split}.json (COCO), {split}/<class>/<images> or <class>/<images> (ImageFolder)"
    )


def _load_json_file(path: Path, verify_images: bool, outside: bool = False) -> tuple[list[Record], LoadReport]:
    if path.suffix.lower() != ".json":
        raise DataError(f"{path}: not a dataset file; expected a .json (LLaVA conversations or COCO captions)")
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        return _coco_from_data(data, path, None, verify_images, outside)
    if isinstance(data, list):
        return _llava_from_data(data, path, None, verify_images, outside)
    raise DataError(f"{path}: neither LLaVA (a JSON list) nor COCO captions (an object with 'annotations')")
