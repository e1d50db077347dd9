"""Probing for CUDA on a machine without it is silent: the answer goes to the debug log and the bench's machine."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

PROBE = """
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="LOG %(levelname)s %(name)s %(message)s")
from vledge.benchmark.machine import describe_machine
from vledge.benchmark.run import default_engines
engines = [spec.name for spec in default_engines(Path(sys.argv[1]))]
print("RESULT " + json.dumps({"engines": engines, "machine": describe_machine()}))
"""


def test_the_bench_probe_writes_nothing_to_stderr_and_records_the_answer(tiny_model_dir):
    done = subprocess.run([sys.executable, "-c", PROBE, str(tiny_model_dir)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "onnxruntime" not in done.stderr and "Failed to load library" not in done.stderr, done.stderr
    assert done.stderr.strip() == ""
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    cuda = result["machine"]["cuda"]
    assert isinstance(cuda["usable"], bool)
    assert any(name.startswith("ort-cuda") for name in result["engines"]) == cuda["usable"]
    if not cuda["usable"]:
        assert cuda["reason"]  # why not, in words, for the report
        assert any(line.startswith("LOG DEBUG") and "CUDAExecutionProvider" in line
                   for line in done.stdout.splitlines())
