"""Where a decode step's time goes: step by step after a prefill, the bare graph, and per op type.

    python benchmarks/decode_profile.py --model MODEL_DIR [--precision fp32] [--repeats 30] [--steps 24]

One thread. Prints (and writes with ``--out``) JSON with:

* ``step_ms_by_index``: the median time of decode step i after a prefill of the caption prompt
  (``OrtTransformerSteps.step``, what ``generate()`` calls), so cold first steps show;
* ``steady_step_ms``: the median of steps 8.. ; ``caption_avg_step_ms``: the mean of the first 12 medians;
* ``bare_run_ms``: ``InferenceSession.run`` with prebuilt numpy feeds at the same past length
  (the graph alone), and ``empty_run_ms`` for a one-node graph (the call overhead);
* ``nodes_file`` / ``nodes_session``: node counts in the file and after ``ORT_ENABLE_ALL``;
* ``op_us``: ONNX Runtime's profiler (``enable_profiling``), microseconds per step by op type.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def _options(threads: int = 1) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def _feeds(runtime, steps) -> dict[str, np.ndarray]:
    graphs = runtime.graphs
    past = {name: value.numpy().copy() for name, value in zip(steps.past_names, steps.past_values)}
    length = steps.past_length
    return {"inputs_embeds": np.zeros((1, 1, graphs.hidden), graphs.float_type),
            "attention_mask": np.ones((1, length + 1), np.int64),
            "position_ids": np.full((1, 1), length, np.int64), **past}


def _median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        call()
        times.append((time.perf_counter() - tick) * 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from vledge.prompt import CAPTION_PROMPT, question_ids
    from vledge.runtime import load

    runtime = load(args.model, precision=args.precision, providers="cpu", threads=1)
    prompt = question_ids(runtime.tokenizer, runtime.manifest.model_config.prompt, CAPTION_PROMPT)
    size = runtime.manifest.preprocess.image_size
    embeds = runtime.encode_images(np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32))
    from vledge.decoding import GenerationOptions

    options = GenerationOptions(max_new_tokens=args.steps + 1)
    by_index: list[list[float]] = [[] for _ in range(args.steps)]
    for _ in range(3 + args.repeats):
        steps, _ = runtime.prefill(embeds, [prompt], options)
        token = np.argmax(steps.first_logits, axis=-1)
        for i in range(args.steps):
            tick = time.perf_counter()
            logits = steps.step(token)
            by_index[i].append((time.perf_counter() - tick) * 1e3)
            token = np.argmax(logits, axis=-1)
    medians = [float(np.median(times[3:])) for times in by_index]
    steady = float(np.median([t for times in by_index[8:] for t in times[3:]]))

    decoder_path = runtime.model_dir / runtime.manifest.variants["decoder_model_merged"][runtime.precisions[
        "decoder_model_merged"]]
    steps, _ = runtime.prefill(embeds, [prompt], options)
    for _ in range(8):
        steps.step(np.zeros(1, np.int64))
    feeds = _feeds(runtime, steps)
    bare = ort.InferenceSession(str(decoder_path), _options(), providers=["CPUExecutionProvider"])
    bare_ms = _median_ms(lambda: bare.run(None, feeds), 400)

    with tempfile.TemporaryDirectory() as work:
        empty_path = Path(work) / "empty.onnx"
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "empty", [x], [y])
        onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9), empty_path)
        empty = ort.InferenceSession(str(empty_path), _options(), providers=["CPUExecutionProvider"])
        one = {"x": np.zeros(1, np.float32)}
        empty_ms = _median_ms(lambda: empty.run(None, one), 2000)

        optimized = _options()
        optimized.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        ort.InferenceSession(str(decoder_path), optimized, providers=["CPUExecutionProvider"])
        session_ops = Counter(node.op_type for node in onnx.load(optimized.optimized_model_filepath).graph.node)

        profiled = _options()
        profiled.enable_profiling = True
        profiled.profile_file_prefix = str(Path(work) / "profile")
        session = ort.InferenceSession(str(decoder_path), profiled, providers=["CPUExecutionProvider"])
        runs = 200
        for _ in range(runs):
            session.run(None, feeds)
        trace = json.loads(Path(session.end_profiling()).read_text())
    node_us: dict[tuple[str, str], list[float]] = defaultdict(list)  # (op, node) -> one duration per run
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node_us[(event["args"]["op_name"], event["name"])].append(event["dur"])
    op_us: dict[str, float] = defaultdict(float)
    for (op, _), durations in node_us.items():  # medians: the profiler's own first runs are slow
        op_us[op] += float(np.median(durations))
    file_ops = Counter(node.op_type for node in onnx.load(str(decoder_path)).graph.node)
    result = {
        "model": str(args.model), "precision": args.precision, "past_length": int(steps.past_length),
        "loadavg": os.getloadavg(),
        "step_ms_by_index": [round(m, 4) for m in medians],
        "steady_step_ms": steady,
        "caption_avg_step_ms": float(np.mean(medians[:12])),
        "bare_run_ms": bare_ms, "empty_run_ms": empty_ms,
        "python_around_run_ms": steady - bare_ms,
        "nodes_file": sum(file_ops.values()), "nodes_session": sum(session_ops.values()),
        "session_ops": dict(session_ops.most_common()),
        "op_us": {k: round(v, 2) for k, v in sorted(op_us.items(), key=lambda kv: -kv[1])},
        "kernel_us_total": round(sum(op_us.values()), 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
