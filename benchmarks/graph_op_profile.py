"""Time per operator type of one decode step of a bare decoder graph (vledge's or onnxruntime-genai's), one thread.

    python benchmarks/graph_op_profile.py GRAPH.onnx [--past 64] [--steps 40] [--threads 1] [--head-dim 64]

Feeds a decode step (one new token, a random past of ``--past`` positions) built from the graph's own inputs
(``inputs_embeds`` or ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.*``), runs it
``--steps`` times with ONNX Runtime's profiler on, and prints JSON: the median step ms without the profiler, the
node count after optimisation, and microseconds per step by op type. Runs under whichever onnxruntime the Python
running it has (onnxruntime-genai's graphs in its own environment).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict

import numpy as np
import onnxruntime as ort

TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def feeds(session, past: int, head_dim: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for value in session.get_inputs():
        kind = TYPES[value.type]
        if value.name.startswith("past_key_values"):
            shape = [d if isinstance(d, int) else (1, 0, past, head_dim)[i] for i, d in enumerate(value.shape)]
            shape[2] = past
            out[value.name] = (rng.standard_normal(shape) * 0.1).astype(kind)
        elif value.name == "attention_mask":
            out[value.name] = np.ones((1, past + 1), kind)
        elif value.name == "position_ids":
            out[value.name] = np.full((1, 1), past, kind)
        elif value.name == "input_ids":
            out[value.name] = np.full((1, 1), 42, kind)
        elif value.name == "inputs_embeds":
            out[value.name] = (rng.standard_normal((1, 1, value.shape[-1])) * 0.05).astype(kind)
        else:
            raise SystemExit(f"unknown input {value.name}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph")
    parser.add_argument("--past", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64, help="where the cache's last axis is symbolic")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        optimized = os.path.join(tmp, "optimized.onnx")
        options.optimized_model_filepath = optimized
        plain = ort.InferenceSession(args.graph, options, providers=["CPUExecutionProvider"])
        feed = feeds(plain, args.past, args.head_dim)
        for _ in range(3):
            plain.run(None, feed)
        times = []
        for _ in range(args.steps):
            tick = time.perf_counter()
            plain.run(None, feed)
            times.append((time.perf_counter() - tick) * 1e3)
        import onnx

        nodes = len(onnx.load(optimized, load_external_data=False).graph.node)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        profiled = ort.InferenceSession(args.graph, options, providers=["CPUExecutionProvider"])
        for _ in range(args.steps):
            profiled.run(None, feed)
        events = json.load(open(profiled.end_profiling()))
    by_type: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_type[event["args"]["op_name"]] += event["dur"]
    total = sum(by_type.values()) / args.steps
    report = {"graph": args.graph, "onnxruntime": ort.__version__, "past": args.past, "threads": args.threads,
              "step_ms": round(float(np.median(times)), 2), "nodes_after_optimisation": nodes,
              "kernel_ms_per_step": round(total / 1e3, 2),
              "op_us_per_step": {k: round(v / args.steps, 1) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
              "load": os.getloadavg()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
