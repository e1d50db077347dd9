"""The ONNX tools' warnings a user cannot act on, kept in the debug log while an export runs.

onnx and ONNX Runtime's Python tools (symbolic shape inference, quantization, fp16 conversion)
warn, through their own loggers, the root logger and ``warnings.warn``, about things the export
deals with itself: a symbolic dimension shape inference cannot compare, "consider pre-processing"
(the export does pre-process), a per-channel axis out of range (that weight is quantized per
tensor), fp16 notices. In a terminal they read like errors. Where an export measures fp16 variants on
the CPU (a machine whose CUDA provider works), the runtime warns that fp16 is slow there. During an
export all of these go to the debug log (``vledge -vv export`` shows them), and what is worth
knowing is said once, in plain words, through the export's progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

_TOOL_FOLDERS = tuple(f"{os.sep}{name}{os.sep}" for name in ("onnxruntime", "onnx", "onnx_ir", "onnxconverter_common"))
# vledge's own notices that an export causes by design (logger name, start of the message).
_BY_DESIGN = (("vledge.runtime.loader", "%s: fp16 on the CPU provider"),
              ("vledge.export.quantize", "calibration data is only used for the int8 vision encoder"))
FP16_NOTE = ("the fp16 variants are made for GPUs (CUDA); on this CPU they run through type casts, so their "
             "timings here are slow and say nothing about a GPU")


def _from_tools(path: str) -> bool:
    return any(folder in path for folder in _TOOL_FOLDERS)


def _by_design(record: logging.LogRecord) -> bool:
    return any(record.name == name and str(record.msg).startswith(start) for name, start in _BY_DESIGN)


class _ToDebugLog(logging.Filter):
    """Takes the tools' warnings (not their errors, nor what they say at other levels) off a handler and
    logs them at debug level instead."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, logging.LogRecord] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not (_from_tools(record.pathname) or _by_design(record)):
            return True
        if id(record) not in self.seen:  # a record reaches every handler; log it once
            self.seen[id(record)] = record
            log.debug("%s said: %s", record.name, record.getMessage())
        return False


@contextlib.contextmanager
def tool_warnings_to_debug_log(say: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, the tools' warnings go to the debug log; at its end ``say`` tells the user,
    once, what is worth knowing from them."""
    divert = _ToDebugLog()
    handlers = [*logging.getLogger().handlers, logging.lastResort]
    handlers = [h for h in handlers if h is not None]
    for handler in handlers:
        handler.addFilter(divert)

    def show(message, category, filename, lineno, file=None, line=None, _original=warnings.showwarning):
        if _from_tools(filename):
            log.debug("%s:%d %s: %s", filename, lineno, category.__name__, message)
        else:
            _original(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(divert)
    if any(_by_design(record) and record.name == "vledge.runtime.loader" for record in divert.seen.values()):
        say(FP16_NOTE)
    if divert.seen:
        log.info("%d warning(s) of the ONNX tools kept in the debug log (-vv shows them)", len(divert.seen))
