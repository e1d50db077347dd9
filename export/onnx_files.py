"""ONNX file helpers for optimisation and quantization: read, check and atomically write graphs."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Iterator

from vledge.errors import OutputError, QuantizationError
from vledge.files import atomic_path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[Path]:
    """A temporary ``.onnx`` path beside ``dst`` that replaces it only when the block succeeds (``vledge.files``)."""
    with atomic_path(dst, suffix=".onnx") as temp:
        yield temp


def save_graph(model, path: Path, label: Path) -> None:
    """``onnx.save`` with a typed error: too large for one protobuf, or the disk refuses the write."""
    import onnx

    try:
        onnx.save(model, str(path))
    except OSError as exc:
        raise OutputError(f"cannot write {label}: {exc.strerror or exc}") from None
    except Exception as exc:  # protobuf's size limit and encoding errors have no common base class
        raise QuantizationError(f"{label}: the graph cannot be saved: {exc}") from exc


def copy_graph(src: Path, path: Path, label: Path) -> None:
    """Copy an ONNX file, as an OutputError when the disk refuses."""
    try:
        shutil.copyfile(src, path)
    except OSError as exc:
        raise OutputError(f"cannot write {label}: {exc.strerror or exc}") from None


_CHATTY_LOGGERS = ("onnxruntime.quantization", "onnxruntime.transformers")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools print progress and log every node; keep that out of the user's output."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logging.WARNING, logger.level))
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        text = buffer.getvalue().strip()
        if text:
            log.debug("onnxruntime said: %s", text)


def source_graph(src: Path) -> Path:
    src = Path(src)
    if not src.is_file():
        raise QuantizationError(f"{src}: no such ONNX file")
    return src


def load_graph(src: Path):
    import onnx

    src = source_graph(src)
    try:
        return onnx.load(str(src))
    except Exception as exc:  # protobuf decode errors have no common base class
        raise QuantizationError(f"{src}: not a readable ONNX model ({exc})") from exc


def cpu_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def validate_graph(path: Path, run_on_cpu: bool = True) -> None:
    """onnx's checker plus an ONNX Runtime CPU session, so no variant ships that cannot load."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise QuantizationError(f"{path}: the ONNX checker rejects the graph: {exc}") from exc
    if run_on_cpu:
        try:
            cpu_session(path)
        except Exception as exc:
            raise QuantizationError(f"{path}: ONNX Runtime (CPU) cannot load the graph: {exc}") from exc


def op_types(model) -> set[str]:
    """``domain:op`` names (bare op for the default domain) of a model's top-level nodes."""
    return {f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            for node in model.graph.node}

