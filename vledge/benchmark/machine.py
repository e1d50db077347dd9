"""What the numbers were measured on: CPU, cores, instruction sets, library versions, providers."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model.strip("x86_64 "):
                    model = value.strip()
                elif key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def _physical_cores() -> int | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            pairs = set()
            physical = core = None
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not key and physical is not None and core is not None:
                    pairs.add((physical, core))
                    physical = core = None
            return len(pairs) or None
    except OSError:
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict:
    import onnxruntime

    from vledge.runtime.providers import gpu_status

    model, flags = _cpu_model_and_flags()
    interesting = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "f16c", "neon", "asimd")
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "cpu_flags": sorted(f for f in interesting if f in flags),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in (
            "vledge", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "opencv-python-headless", "openvino")},
        "providers_available": onnxruntime.get_available_providers(),
        # "available" above is what the build offers; this is whether CUDA really starts here, and why not
        "cuda": {"usable": (cuda := gpu_status("cuda")).usable, "reason": cuda.reason},
    }


def _cpu_seconds_busy() -> float | None:
    """Seconds all cores spent busy since boot (``/proc/stat``), or None off Linux."""
    try:
        with open("/proc/stat", encoding="utf-8") as handle:
            fields = [float(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class LoadMonitor:
    """How busy the machine was during a run, and how much of that was other processes.

    Other processes' CPU is all busy CPU time (``/proc/stat``) minus this process's and its finished
    children's (every benchmark worker is waited for before :meth:`stop`), in cores on average.
    """

    def __init__(self) -> None:
        self.load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        self._busy, self._own, self._wall = _cpu_seconds_busy(), _own_cpu_seconds(), time.perf_counter()

    def stop(self) -> dict:
        wall = time.perf_counter() - self._wall
        busy = _cpu_seconds_busy()
        own = _own_cpu_seconds() - self._own
        result = {
            "loadavg_before": list(self.load_before) if self.load_before else None,
            "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "seconds": wall,
            "benchmark_cpu_cores": own / wall if wall > 0 else None,
            "other_processes_cpu_cores": None,
        }
        if busy is not None and self._busy is not None and wall > 0:
            result["other_processes_cpu_cores"] = max(busy - self._busy - own, 0.0) / wall
        return result
