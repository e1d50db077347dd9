"""The engines a benchmark compares, behind one small interface.

``pytorch`` is the original model in eager mode under ``inference_mode``;
``pytorch-int8`` is PyTorch's own dynamic int8 quantization of its Linear/LSTM
layers, the fair quantized baseline on the PyTorch side; ``pytorch-compile`` is the
original through ``torch.compile`` (inductor, dynamic shapes); ``ort-<provider>-<precision>``
is the exported model through ``vledge.runtime``; ``openvino-cpu-<precision>`` is OpenVINO
on the same ONNX files. Every engine answers the same calls with numpy outputs, so stage
timings and parity are measured identically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vledge.decoding import GenerationOptions
from vledge.generation import generate, generate_from_pixels, split_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    kind: str  # "pytorch" | "onnxruntime" | "openvino"
    precision: str  # pytorch: fp32 | int8 | compile; onnxruntime: fp32 | fp16 | int8 | q4 | auto; openvino: fp32 | int8 | q4
    provider: str = "cpu"  # onnxruntime: cpu | cuda; openvino: cpu

    @property
    def name(self) -> str:
        if self.kind == "pytorch":
            return "pytorch" if self.precision == "fp32" else f"pytorch-{self.precision}"
        prefix = "ort" if self.kind == "onnxruntime" else "openvino"
        return f"{prefix}-{self.provider}-{self.precision}"

    @property
    def missing(self) -> str | None:
        """Why this engine cannot run here (an optional package is not installed), or None."""
        if self.kind == "openvino":
            from vledge.benchmark.openvino_engine import openvino_available

            return None if openvino_available() else "the openvino package is not installed (pip install 'vledge[bench]')"
        if self.kind == "pytorch" and self.precision == "compile":
            import shutil

            return None if shutil.which("cc") or shutil.which("gcc") else "torch.compile needs a C compiler (cc)"
        return None

    @classmethod
    def parse(cls, text: str) -> "EngineSpec":
        """``pytorch``, ``pytorch-int8``, ``pytorch-compile``, ``ort-cpu-int8``, ``ort-cuda-fp16``, ``openvino-cpu-q4`` ..."""
        parts = text.split("-")
        if parts[0] == "pytorch" and len(parts) <= 2 and (len(parts) == 1 or parts[1] in ("fp32", "int8", "compile")):
            return cls("pytorch", parts[1] if len(parts) == 2 else "fp32")
        if parts[0] == "ort" and len(parts) == 3:
            return cls("onnxruntime", parts[2], parts[1])
        if parts[0] == "openvino" and len(parts) == 3 and parts[1] == "cpu" and parts[2] in ("fp32", "int8", "q4"):
            return cls("openvino", parts[2], "cpu")
        from vledge.errors import ConfigError

        raise ConfigError(f"unknown engine {text!r}; use pytorch, pytorch-int8, pytorch-compile, "
                          "ort-<cpu|cuda>-<precision> or openvino-cpu-<fp32|int8|q4>")


class _BenchEngine:
    """What both benchmark engines share. Each holds a ``vledge.generation.Engine`` (``self.engine``) and is
    one itself, so parity and timings go through ``vledge.generation`` like every other caller."""

    name: str
    tiled = False  # a tiled model (Idefics3 / SmolVLM): preprocess() gives each image's tiles and grid

    def _threads(self) -> None:
        """Set the engine's thread count before it computes (PyTorch's is per process)."""

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def encode_images(self, pixel_values) -> np.ndarray:
        self._threads()
        return self.engine.encode_images(pixel_values)

    def prefill(self, image_embeds: np.ndarray, prompts: Sequence[Sequence[int]], options: GenerationOptions):
        self._threads()
        return self.engine.prefill(image_embeds, prompts, options)

    def start(self, image_embeds: np.ndarray, prompts: Sequence[Sequence[int]]):
        """Prefill; returns a step model with ``first_logits`` (numpy) and ``step(tokens)``."""
        return self.prefill(image_embeds, prompts, GenerationOptions(max_new_tokens=64))[0]

    def prefill_logits(self, image_embeds: np.ndarray, prompts) -> np.ndarray:
        return self.start(image_embeds, prompts).first_logits

    def greedy_tokens(self, image_embeds: np.ndarray, prompts, max_new_tokens: int) -> list[list[int]]:
        results = generate(self, image_embeds, prompts, GenerationOptions(max_new_tokens=max_new_tokens))
        return [r.token_ids for r in results]

    def caption(self, images: Sequence[Path], prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """End to end: decode + preprocess + vision + prefill + decode, as an app would call it."""
        prepared = self.preprocess(images)
        options = GenerationOptions(max_new_tokens=max_new_tokens)
        if not self.tiled:
            results = generate_from_pixels(self, prepared, prompts, options)
        else:
            results = generate_from_pixels(self, self.pixels(prepared), self.tiled_prompts(prepared, prompts), options,
                                           tiles_per_row=[len(image.pixel_values) for image in prepared])
        return [r.token_ids for r in results]

    # A tiled model's preprocessing gives one ``Idefics3Images`` per image (its tiles, then the global view):
    # the vision encoder takes every tile, each prompt's image token becomes its image's tiles' tokens.

    def pixels(self, prepared) -> np.ndarray:
        """What the vision encoder takes: ``prepared`` itself, or every image's tiles one after the other."""
        return np.concatenate([image.pixel_values for image in prepared]) if self.tiled else prepared

    def tiled_prompts(self, prepared, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        from vledge.image_tiles import expand_image_ids

        return [expand_image_ids(self.tokenizer, self.tiles_spec, prompt, [(image.rows, image.cols)])
                for image, prompt in zip(prepared, prompts)]

    def rows(self, prepared, image_embeds: np.ndarray, prompts: Sequence[Sequence[int]]):
        """(prefill's image embeddings, prompts) for one image per prompt."""
        if not self.tiled:
            return image_embeds, prompts
        return (split_rows(image_embeds, [len(image.pixel_values) for image in prepared]),
                self.tiled_prompts(prepared, prompts))


class TorchEngine(_BenchEngine):
    """The PyTorch original (optionally dynamically quantized), on the CPU."""

    def __init__(self, spec: EngineSpec, ckpt: Path, threads: int) -> None:
        self.spec, self.ckpt, self.threads = spec, ckpt, threads
        self.name = spec.name

    def load(self) -> None:
        import torch

        from vledge.checkpoint import load_checkpoint
        from vledge.models.generate import TorchEngine as TorchModelEngine

        checkpoint = load_checkpoint(self.ckpt)
        self.config = checkpoint.model_config
        model = checkpoint.build_model()
        if self.spec.precision == "int8":
            from torch.ao.quantization import quantize_dynamic

            model = quantize_dynamic(model, {torch.nn.Linear, torch.nn.LSTM}, dtype=torch.qint8)
        elif self.spec.precision == "compile":
            # Inductor with dynamic shapes, so the growing cache does not recompile at every step; the
            # compilation itself happens in the first calls (the benchmark's warm-up, reported apart).
            # The modules keep their types (the engine checks them), their forwards are compiled.
            model.vision.forward = torch.compile(model.vision.forward, dynamic=True)
            model.language.forward = torch.compile(model.language.forward, dynamic=True)
        elif self.spec.precision != "fp32":
            from vledge.errors import ConfigError

            raise ConfigError(f"PyTorch engines are fp32, int8 or compile, not {self.spec.precision}")
        self.model = model.eval()
        self.engine = TorchModelEngine(self.model, checkpoint.tokenizer())

    def _threads(self) -> None:
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def preprocess(self, images: Sequence[Path]):
        import torch

        from vledge.data.images import preprocess

        return torch.stack([preprocess(path, self.config.preprocess) for path in images])

    def size_bytes(self) -> int:
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(self.model.state_dict(), buffer)
        return buffer.tell()


class OrtEngine(_BenchEngine):
    """An exported model directory through the torch-free runtime."""

    def __init__(self, spec: EngineSpec, model_dir: Path, threads: int) -> None:
        self.spec, self.model_dir, self.threads = spec, model_dir, threads
        self.name = spec.name

    def load(self) -> None:
        from vledge.runtime import load

        self.runtime = self.engine = load(self.model_dir, precision=self.spec.precision, providers=self.spec.provider,
                                          threads=self.threads)
        self.precisions = dict(self.runtime.precisions)
        self.tiled = self.runtime.preprocessor.tiled
        self.tiles_spec = self.runtime.manifest.preprocess.tiles

    def preprocess(self, images: Sequence[Path]):
        if self.tiled:
            return [self.runtime.preprocessor.tiles(path) for path in images]
        return self.runtime.preprocessor.batch(list(images))

    def size_bytes(self) -> int:
        from vledge.manifest import resolve_inside

        manifest = self.runtime.manifest
        return sum(resolve_inside(self.model_dir, manifest.variants[c][p]).stat().st_size
                   for c, p in self.precisions.items())


class OpenVinoBenchEngine(_BenchEngine):
    """The same ONNX files through OpenVINO (``vledge.benchmark.openvino_engine``); the runtime's preprocessing."""

    def __init__(self, spec: EngineSpec, model_dir: Path, threads: int) -> None:
        self.spec, self.model_dir, self.threads = spec, model_dir, threads
        self.name = spec.name

    def load(self) -> None:
        from vledge.benchmark.openvino_engine import OpenVinoEngine
        from vledge.runtime.preprocess import ImagePreprocessor

        self.engine = OpenVinoEngine(self.model_dir, self.spec.precision, self.threads)
        self.precisions = dict(self.engine.precisions)
        self.preprocessor = ImagePreprocessor(self.engine.manifest.preprocess)

    def preprocess(self, images: Sequence[Path]) -> np.ndarray:
        return self.preprocessor.batch(list(images))

    def size_bytes(self) -> int:
        return self.engine.size_bytes()


def make_engine(spec: EngineSpec, ckpt: Path, model_dir: Path, threads: int):
    if spec.kind == "pytorch":
        return TorchEngine(spec, ckpt, threads)
    if spec.kind == "openvino":
        return OpenVinoBenchEngine(spec, model_dir, threads)
    return OrtEngine(spec, model_dir, threads)
