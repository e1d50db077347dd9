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
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from vledge.errors import ConfigError, ProviderError

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
    spin: bool = True  # busy-wait between ops: faster for one session, wasteful when sessions share cores
    strict: bool = False  # fail when heavy nodes run on the CPU under a GPU provider

    def __post_init__(self) -> None:
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ConfigError(f"unknown graph optimisation level {self.optimization!r}; "
                              f"choose from {sorted(OPTIMIZATION_LEVELS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
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


def create_session(path: str | Path, config: SessionConfig) -> ort.InferenceSession:
    """A session on the providers ``config`` asks for; an explicit GPU request that fell back is an error."""
    names, explicit_gpu = resolve_providers(config.providers)
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(config),
                                       providers=_provider_entries(names, config))
    except Exception as exc:  # onnxruntime raises its own exception classes (Fail, InvalidGraph, ...)
        if explicit_gpu:
            raise ProviderError(f"cannot create a session for {Path(path).name} on {names[0]}: {exc}") from None
        raise
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

    def heavy_on_cpu(self) -> list[str]:
        cpu = self.by_provider.get("CPUExecutionProvider", Counter())
        return sorted(op for op in cpu if op in HEAVY_OPS)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {provider: dict(sorted(counts.items())) for provider, counts in self.by_provider.items()}


def profile_placement(path: str | Path, config: SessionConfig, feeds: dict) -> Placement:
    """Run ``feeds`` once with profiling on and read each node's provider from the trace."""
    names, _ = resolve_providers(config.providers)
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
