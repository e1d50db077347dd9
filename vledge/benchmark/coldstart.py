"""One engine in a fresh process: load time, first caption time, peak resident memory.

    python -m vledge.benchmark.coldstart ENGINE CKPT MODEL_DIR IMAGE PROMPT_IDS_JSON THREADS MAX_NEW_TOKENS

Prints one JSON line. A fresh process is the only honest way to measure a cold
start and the peak memory of one engine without the others' allocations.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _peak_rss_kb() -> float:
    """VmHWM: the peak of this process alone (ru_maxrss survives exec and would report the parent's peak)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main(argv: list[str]) -> None:
    name, ckpt, model_dir, image, prompt, threads, max_new = argv
    started = time.perf_counter()
    from vledge.benchmark.engines import EngineSpec, make_engine

    engine = make_engine(EngineSpec.parse(name), Path(ckpt), Path(model_dir), int(threads))
    engine.load()
    loaded = time.perf_counter()
    engine.caption([Path(image)], [json.loads(prompt)], int(max_new))
    first = time.perf_counter()
    peak_kb = _peak_rss_kb()
    print(json.dumps({
        "import_and_load_ms": (loaded - started) * 1e3,
        "first_caption_ms": (first - loaded) * 1e3,
        "peak_rss_mb": peak_kb / 1024,
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
