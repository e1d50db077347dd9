"""What the numbers were measured on: CPU, cores, instruction sets, library versions, providers."""

from __future__ import annotations

import os
import platform
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
            "vledge", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "opencv-python-headless")},
        "providers_available": onnxruntime.get_available_providers(),
        # "available" above is what the build offers; this is whether CUDA really starts here, and why not
        "cuda": {"usable": (cuda := gpu_status("cuda")).usable, "reason": cuda.reason},
    }
