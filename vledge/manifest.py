"""The model directory's manifest (``vledge.json``): written by the exporter, trusted by nobody.

Torch-free, because the runtime reads it. Reading verifies the format version and
every file's sha256 and size, and refuses any path that would leave the model
directory (absolute paths, ``..``, symlinks pointing out), including the
external-data references inside the ONNX files themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from vledge.hashing import file_sha256 as sha256_of
from vledge.config import ModelConfig, PreprocessSpec, PromptTemplate, from_dict
from vledge.errors import ConfigError, ModelDirError
from vledge.external_data import external_data_locations
from vledge.manifest_schema import COMPONENTS, PRECISIONS, validate_manifest  # the names live in the schema
from vledge.reads import read_json

log = logging.getLogger(__name__)

FORMAT = "vledge-model"
FORMAT_VERSION = 1
MANIFEST_NAME = "vledge.json"
TOKENIZER_NAME = "tokenizer.json"


def variant_filename(component: str, precision: str) -> str:
    """``onnx/<component>.onnx`` for fp32, ``onnx/<component>_<precision>.onnx`` otherwise (Optimum's naming)."""
    suffix = "" if precision == "fp32" else f"_{precision}"
    return f"onnx/{component}{suffix}.onnx"


def resolve_inside(root: Path, relative: str) -> Path:
    """The file ``relative`` names inside ``root``; anything that could escape the directory is refused."""
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or "\\" in relative or ":" in relative or ".." in pure.parts:
        raise ModelDirError(f"unsafe path {relative!r} in model directory {root}: only relative paths inside it")
    candidate = root.joinpath(*pure.parts)
    real_root = root.resolve()
    real = candidate.resolve()
    if real != real_root and real_root not in real.parents:
        raise ModelDirError(f"{relative!r} in model directory {root} resolves outside it ({real})")
    return candidate


@dataclass
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    model_config: ModelConfig
    special_tokens: dict[str, int]
    prefix_ids: list[int]
    num_image_tokens: int
    tensors: dict[str, dict[str, list[str]]]
    # component -> precision -> relative file path
    variants: dict[str, dict[str, str]]
    files: dict[str, FileEntry]
    # provider kind ("cpu", "cuda") -> component -> precision chosen by ``--quantize auto`` (or the defaults)
    selected: dict[str, dict[str, str]] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.model_config.preprocess

    @property
    def prompt(self) -> PromptTemplate:
        return self.model_config.prompt

    @property
    def language_kind(self) -> str:
        return self.model_config.language.kind

    def precisions(self, component: str) -> list[str]:
        return [p for p in PRECISIONS if p in self.variants.get(component, {})]

    def architecture(self) -> dict[str, Any]:
        language = self.model_config.language
        numbers = {
            "language_model": language.kind,
            "hidden": language.hidden,
            "layers": language.layers,
            "vocab_size": language.vocab_size,
            "image_tokens": self.num_image_tokens,
            "image_size": self.preprocess.image_size,
            "vision_backbone": self.model_config.vision.backbone,
            "projector": self.model_config.projector.kind,
        }
        numbers["cache"] = language.family.cache
        numbers.update(language.family.architecture_facts(language))
        return numbers

    def to_dict(self) -> dict[str, Any]:
        from vledge.config import to_dict

        return {
            "format": self.format,
            "format_version": self.format_version,
            "architecture": self.architecture(),
            "model_config": to_dict(self.model_config),
            "special_tokens": self.special_tokens,
            "prompt": to_dict(self.prompt),
            "prefix_ids": self.prefix_ids,
            "preprocess": to_dict(self.preprocess),
            "tensors": self.tensors,
            "generation": self.generation,
            "variants": self.variants,
            "selected": self.selected,
            "files": {name: {"sha256": e.sha256, "size": e.size} for name, e in sorted(self.files.items())},
            "parity": self.parity,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ModelDirError(f"{source} is not a vledge model manifest (format tag {FORMAT!r} missing)")
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelDirError(
                f"{source} has format version {data.get('format_version')!r}; this vledge reads {FORMAT_VERSION}"
            )
        validate_manifest(data, source)
        try:
            files = {name: FileEntry(sha256=str(e["sha256"]), size=int(e["size"])) for name, e in data["files"].items()}
            manifest = cls(
                model_config=from_dict(ModelConfig, data["model_config"]),
                special_tokens={k: int(v) for k, v in data["special_tokens"].items()},
                prefix_ids=[int(i) for i in data["prefix_ids"]],
                num_image_tokens=int(data["architecture"]["image_tokens"]),
                tensors=data["tensors"],
                variants=data["variants"],
                files=files,
                selected=data.get("selected", {}),
                generation=data.get("generation", {}),
                parity=data.get("parity", {}),
                provenance=data.get("provenance", {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
            raise ModelDirError(f"{source} is malformed: {type(exc).__name__}: {exc}") from None
        manifest.check_consistent(data.get("architecture", {}), source)
        return manifest

    def check_consistent(self, architecture: dict[str, Any], source: str) -> None:
        """Numbers stated twice must agree, and every token id must exist in the vocabulary."""
        for key, value in self.architecture().items():
            if key in architecture and architecture[key] != value:
                raise ModelDirError(f"{source} is malformed: architecture.{key} is {architecture[key]!r}, "
                                    f"model_config says {value!r}")
        vocab = self.model_config.language.vocab_size
        if vocab < 1:
            raise ModelDirError(f"{source} is malformed: model_config.language.vocab_size must be set, got {vocab}")
        named = {f"special_tokens.{k}": v for k, v in self.special_tokens.items()}
        named.update({f"prefix_ids[{i}]": v for i, v in enumerate(self.prefix_ids)})
        named.update({f"generation.{k}": self.generation[k] for k in ("eos_token_id", "pad_token_id")
                      if k in self.generation})
        named.update({f"generation.stop_token_ids[{i}]": v
                      for i, v in enumerate(self.generation.get("stop_token_ids") or ())})
        for where, token in named.items():
            if token >= vocab:
                raise ModelDirError(f"{source} is malformed: {where} is {token}, beyond the vocabulary of {vocab}")


# --------------------------------------------------------------------------- reading


def read_manifest(model_dir: str | Path, verify: bool = True) -> Manifest:
    """Open a model directory; with ``verify`` every listed file is hashed and checked."""
    root = Path(model_dir)
    if not root.exists():
        raise ModelDirError(f"model directory not found: {root}")
    if not root.is_dir():
        raise ModelDirError(f"not a model directory (a file): {root}")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ModelDirError(f"{root} has no {MANIFEST_NAME}; is it a directory written by `vledge export`?")
    data = read_json(manifest_path, error=ModelDirError, what="model manifest")  # capped, depth-limited
    manifest = Manifest.from_dict(data, source=str(manifest_path))
    for component, by_precision in manifest.variants.items():
        for precision, relative in by_precision.items():
            if relative not in manifest.files:
                raise ModelDirError(f"{manifest_path}: {component}/{precision} names {relative!r}, which has no hash")
    if TOKENIZER_NAME not in manifest.files:
        raise ModelDirError(f"{manifest_path} does not list {TOKENIZER_NAME}")
    graphs = {path for by_precision in manifest.variants.values() for path in by_precision.values()}
    for relative, entry in manifest.files.items():
        path = resolve_inside(root, relative)
        if not path.is_file():
            raise ModelDirError(f"model directory {root} is missing {relative}")
        if verify:
            verify_file(root, relative, entry, set(manifest.files), graph=relative in graphs)
        elif relative.endswith(".onnx") or relative in graphs:  # unhashed, but what ONNX Runtime would read must still be listed
            check_external_data(root, relative, set(manifest.files))
    return manifest


def verify_file(root: Path, relative: str, entry: FileEntry, listed: set[str] | None = None,
                graph: bool = False) -> Path:
    """Check one listed file's size and sha256, and that its external data stays inside ``root`` and is listed.

    A file is scanned for external data when its name ends in ``.onnx`` or ``graph`` says it is a graph."""
    graph = graph or relative.endswith(".onnx")
    path = resolve_inside(root, relative)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelDirError(f"cannot read {relative} in {root}: {exc.strerror or exc}") from None
    if size != entry.size:
        raise ModelDirError(
            f"{relative} in {root} has {size} bytes, the manifest says {entry.size}: modified or truncated"
        )
    try:
        digest = sha256_of(path)
        locations = external_data_locations(path) if graph else []
    except OSError as exc:  # unreadable (mode 000, another owner), or it vanished after the size check
        raise ModelDirError(f"cannot read {relative} in {root}: {exc.strerror or exc}") from None
    if digest != entry.sha256:
        raise ModelDirError(f"{relative} in {root} does not match its sha256 in {MANIFEST_NAME}: the file was modified")
    if graph:
        check_external_data(root, relative, listed, locations)
    return path


def check_external_data(root: Path, relative: str, listed: set[str] | None,
                        locations: list[str] | None = None) -> None:
    """Every tensor the graph keeps in another file names a file inside ``root`` that the manifest hashes."""
    parent = PurePosixPath(relative).parent
    if locations is None:
        locations = external_data_locations(resolve_inside(root, relative))
    for location in locations:
        if PurePosixPath(location).is_absolute() or ".." in PurePosixPath(location).parts:
            raise ModelDirError(f"{relative} references external data outside the model directory: {location!r}")
        resolved = str(parent / location)
        resolve_inside(root, resolved)
        if listed is not None and resolved not in listed:
            raise ModelDirError(f"{relative} references external data {resolved!r} that the manifest does not hash")
