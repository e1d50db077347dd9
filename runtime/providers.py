"""Execution providers and sessions: ask for what you want, learn what you really got.

ONNX Runtime quietly falls back to the CPU when a GPU provider cannot start (no
driver, missing CUDA libraries). Here a provider that was asked for explicitly
and is not active after session creation is an error; with ``"auto"`` the
fallback is allowed but logged and reported by ``active``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from vledge.bounds import MAX_THREADS, check_count
from vledge.errors import ConfigError, ModelDirError, ProviderError

log = logging.getLogger(__name__)

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Node types that must not run on the CPU when a GPU provider was chosen (strict mode).
HEAVY_OPS = ("MatMul", "Gemm", "Conv", "Attention", "MultiHeadAttention", "MatMulNBits", "MatMulInteger",
             "QLinearConv", "QLinearMatMul", "LSTM", "FusedMatMul", "FusedConv")


@dataclass(frozen=True)
class SessionConfig:
    """How sessions are created; one config is shared by all graphs of a model."""

    providers: str | tuple[str, ...] = "auto"  # "auto", "cpu", "cuda", "tensorrt", or a tuple of those
    device_id: int = 0
    threads: int | None = None  # intra-op threads; None: ONNX Runtime's default (physical cores)
    optimization: str = "all"
    spin: bool = False  # busy-wait between ops: off by default, it made 2-thread captions slower than 1 thread
    strict: bool = False  # fail when heavy nodes run on the CPU under a GPU provider

    def __post_init__(self) -> None:
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ConfigError(f"unknown graph optimisation level {self.optimization!r}; "
                              f"choose from {sorted(OPTIMIZATION_LEVELS)}")
        if self.threads is not None:
            check_count("threads", self.threads, 1, MAX_THREADS)
        resolve_providers(self.providers)  # validate names early


def resolve_providers(requested: str | Sequence[str]) -> tuple[list[str], bool]:
    """Provider names in priority order, and whether the user named a GPU provider explicitly."""
    if isinstance(requested, str):
        requested = (requested,)
    if list(requested) == ["auto"]:
        available = ort.get_available_providers()
        chosen = [p for p in ("CUDAExecutionProvider",) if p in available] + ["CPUExecutionProvider"]
        return chosen, False
    names = []
    for item in requested:
        name = ALIASES.get(item.lower(), item) if isinstance(item, str) else item
        if name not in ort.get_all_providers():
            raise ConfigError(f"unknown execution provider {item!r}; choose from auto, "
                              f"{', '.join(sorted(ALIASES))} or a full ONNX Runtime provider name")
        if name not in names:
            names.append(name)
    explicit_gpu = any(n in GPU_PROVIDERS for n in names)
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")  # ops a GPU provider lacks still need a home
    return names, explicit_gpu


# --------------------------------------------------------------------------- is a GPU provider really usable?

_probe_lock = threading.Lock()
_probe_results: dict[tuple[str, int], "GpuStatus"] = {}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class GpuStatus:
    """Whether ONNX Runtime can really start a GPU provider here, and if not, why (from its own log)."""

    provider: str
    device_id: int
    usable: bool
    reason: str = ""


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb_field(number: int, payload: int | str | bytes) -> bytes:
    if isinstance(payload, int):
        return _pb_varint(number << 3) + _pb_varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _pb_varint(number << 3 | 2) + _pb_varint(len(data)) + data


def _identity_model() -> bytes:
    """A one-node ONNX model (float[1] -> Identity), written as protobuf bytes: the runtime has no onnx package."""
    shape = _pb_field(1, _pb_field(1, 1))  # TensorShapeProto.dim { dim_value: 1 }
    value_type = _pb_field(1, _pb_field(1, 1) + _pb_field(2, shape))  # TypeProto.tensor_type { FLOAT, shape }

    def value_info(name: str) -> bytes:
        return _pb_field(1, name) + _pb_field(2, value_type)

    node = _pb_field(1, "x") + _pb_field(2, "y") + _pb_field(4, "Identity")
    graph = _pb_field(1, node) + _pb_field(2, "vledge-probe") + _pb_field(11, value_info("x")) + _pb_field(
        12, value_info("y"))
    return _pb_field(1, 8) + _pb_field(7, graph) + _pb_field(8, _pb_field(2, 17))  # ir_version 8, opset 17


class _CapturedStderr:
    """Send file descriptor 2 to a temporary file for a moment: ONNX Runtime's C++ logger writes there."""

    def __enter__(self) -> "_CapturedStderr":
        self.text = ""
        self._saved = None
        try:
            sys.stderr.flush()
            self._file = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreters): just run
            self._saved = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self._saved is None:
            return
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = _ANSI.sub("", self._file.read().decode("utf-8", "replace"))
        self._file.close()


def _failure_reason(provider: str, log_text: str, error: str = "") -> str:
    library = re.search(r"Failed to load library (\S+) with error: ([^\n]+)", log_text)
    requirement = re.search(r"Require ([^.\n]+(?:\.\*[^.\n]*)*)\.", log_text)
    if library:
        reason = f"{os.path.basename(library.group(1))} cannot be loaded: {library.group(2).strip()}"
    elif error:
        reason = error.strip().splitlines()[-1]
    else:
        errors = [line.split("] ", 1)[-1].strip() for line in log_text.splitlines() if "[E:" in line]
        reason = errors[-1] if errors else "ONNX Runtime did not say why"
    if requirement:
        reason += f" (onnxruntime {ort.__version__} needs {requirement.group(1).strip()})"
    return reason


def gpu_status(provider: str = "CUDAExecutionProvider", device_id: int = 0) -> GpuStatus:
    """Try to start ``provider`` once per process on a one-node graph; ONNX Runtime's noise goes to the log.

    ``onnxruntime-gpu`` lists the CUDA provider as available even where its libraries are missing and
    then silently runs everything on the CPU; this asks the real question, and keeps the answer.
    """
    provider = ALIASES.get(provider.lower(), provider)
    key = (provider, device_id)
    with _probe_lock:
        if key in _probe_results:
            return _probe_results[key]
        if provider not in ort.get_available_providers():
            status = GpuStatus(provider, device_id, False,
                               f"this onnxruntime build ({ort.__version__}) has no {provider}; "
                               f"install onnxruntime-gpu for CUDA")
        else:
            error = ""
            active: list[str] = []
            options = ort.SessionOptions()
            options.log_severity_level = 3
            with _CapturedStderr() as captured:
                try:
                    session = ort.InferenceSession(
                        _identity_model(), sess_options=options,
                        providers=_provider_entries([provider, "CPUExecutionProvider"],
                                                    SessionConfig(device_id=device_id)))
                    active = session.get_providers()
                except Exception as exc:  # onnxruntime's own exception classes
                    error = str(exc)
            if captured.text.strip():
                log.debug("onnxruntime output while starting %s: %s", provider, captured.text.strip())
            usable = provider in active
            status = GpuStatus(provider, device_id, usable,
                               "" if usable else _failure_reason(provider, captured.text, error))
        _probe_results[key] = status
        if not status.usable:
            log.debug("%s (device %d) is not usable: %s", provider, device_id, status.reason)
        return status


def _provider_entries(names: list[str], config: SessionConfig) -> list:
    entries: list = []
    for name in names:
        if name == "CUDAExecutionProvider":
            entries.append((name, {"device_id": config.device_id}))
        elif name == "TensorrtExecutionProvider":
            entries.append((name, {"device_id": config.device_id, "trt_fp16_enable": True}))
        else:
            entries.append(name)
    return entries


def session_options(config: SessionConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[config.optimization]
    if config.threads is not None:
        options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin else "0")
    options.log_severity_level = 3  # ONNX Runtime's own warnings become our log lines or errors
    return options


def usable_providers(config: SessionConfig) -> tuple[list[str], str]:
    """The providers sessions will really be created with, and why a requested GPU provider was dropped.

    An explicitly requested GPU provider that cannot start raises ProviderError naming the reason; under
    ``"auto"`` it is dropped (logged, and reported by ``model.info()``).
    """
    names, explicit_gpu = resolve_providers(config.providers)
    dropped = []
    for name in [n for n in names if n in GPU_PROVIDERS]:
        status = gpu_status(name, config.device_id)
        if status.usable:
            continue
        if explicit_gpu:
            raise ProviderError(f"{name} was requested (device {config.device_id}) but ONNX Runtime cannot "
                                f"start it on this machine: {status.reason}. Use providers='cpu' or 'auto'")
        names.remove(name)
        dropped.append(f"{name}: {status.reason}")
    return names, "; ".join(dropped)


def create_session(path: str | Path, config: SessionConfig) -> ort.InferenceSession:
    """A session on the providers ``config`` asks for; an explicit GPU request that fell back is an error."""
    names, explicit_gpu = resolve_providers(config.providers)
    names, _ = usable_providers(config)
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(config),
                                       providers=_provider_entries(names, config))
    except Exception as exc:  # onnxruntime raises its own exception classes (Fail, InvalidGraph, ...)
        if explicit_gpu:
            raise ProviderError(f"cannot create a session for {Path(path).name} on {names[0]}: {exc}") from None
        raise ModelDirError(f"ONNX Runtime cannot load {path}: {type(exc).__name__}: {exc}") from None
    active = session.get_providers()
    wanted_gpu = [n for n in names if n in GPU_PROVIDERS]
    if wanted_gpu and not any(n in active for n in wanted_gpu):
        message = (f"{', '.join(wanted_gpu)} requested for {Path(path).name} but ONNX Runtime runs it on "
                   f"{', '.join(active)} (no usable GPU, driver or CUDA/cuDNN libraries)")
        if explicit_gpu:
            raise ProviderError(message)
        log.info("%s; using the CPU", message)
    return session


def primary_provider(session: ort.InferenceSession) -> str:
    return session.get_providers()[0]


@dataclass
class Placement:
    """Which provider ran each node type of a graph, from one profiled run."""

    by_provider: dict[str, Counter] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {provider: dict(sorted(counts.items())) for provider, counts in self.by_provider.items()}


def profile_placement(path: str | Path, config: SessionConfig, feeds: dict) -> Placement:
    """Run ``feeds`` once with profiling on and read each node's provider from the trace."""
    names, _ = usable_providers(config)
    options = session_options(config)
    with tempfile.TemporaryDirectory(prefix="vledge-profile-") as folder:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "trace")
        session = ort.InferenceSession(str(path), sess_options=options, providers=_provider_entries(names, config))
        session.run(None, feeds)
        trace = session.end_profiling()
        with open(trace, encoding="utf-8") as handle:
            events = json.load(handle)
    placement = Placement()
    seen: set[str] = set()
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") != "Node" or "provider" not in args or event["name"] in seen:
            continue
        seen.add(event["name"])
        placement.by_provider.setdefault(args["provider"], Counter())[args.get("op_name", "?")] += 1
    return placement
