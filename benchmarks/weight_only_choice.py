"""Which weight-only quantization to ship for a Llama-family decoder: drift and decode speed, measured.

    python benchmarks/weight_only_choice.py HF_FOLDER [--work DIR] [--tokens 64] [--steps 20] [--json OUT]

Exports the merged decoder of the Hugging Face LM folder the way ``vledge export`` does (fp32, optimised, the
family's fusion passes), then writes variants of it: dynamic int8 (MatMulInteger, the exporter's ``int8``) and
MatMulNBits with 8 and 4 bits, block 16 and 32, symmetric and not, ``accuracy_level`` 4 (int8 compute) and 0
(float compute) for some, the LM head kept 8-bit
for 4-bit variants (as the exporter's ``q4``). For each it measures, against the fp32 graph:

* drift: the text in ``benchmarks/text/public_domain_english.txt`` fed token by token through the KV cache
  (``--tokens`` positions): top-1 next-token agreement and mean KL(fp32 || variant) in nats;
* speed: median ms of one decode step at past 64 and 512, one thread, variants interleaved round by round;
* file size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

TEXT = Path(__file__).parent / "text" / "public_domain_english.txt"
# name -> (bits, block, symmetric); "int8-dynamic" is the exporter's MatMulInteger variant
VARIANTS = {"int8-dynamic": None, "nbits8-b32-asym": (8, 32, False), "nbits8-b32-sym": (8, 32, True),
            "nbits8-b16-asym": (8, 16, False), "q4-b16-asym": (4, 16, False), "q4-b32-asym": (4, 32, False),
            "q4-b32-sym": (4, 32, True), "nbits8-b32-sym-acc0": (8, 32, True, 0), "q4-b32-asym-acc0": (4, 32, False, 0)}


def build(folder: Path, work: Path) -> tuple[dict[str, Path], object]:
    import torch

    from vledge.config import ModelConfig, preset
    from vledge.export.graphs import export_graphs
    from vledge.export.optimize import optimize_component
    from vledge.hf.language_model import load_pretrained_lm
    from vledge.models.vlm import VisionLanguageModel

    pretrained = load_pretrained_lm(folder)
    paths = {"fp32": work / "fp32.onnx", **{name: work / f"{name}.onnx" for name in VARIANTS}}
    if not paths["fp32"].exists():
        tiny, _ = preset("tiny")
        config = ModelConfig(vision=tiny.vision, projector=tiny.projector, preprocess=tiny.preprocess,
                             language=pretrained.config)
        model = VisionLanguageModel(config, image_token_id=0).eval()
        model.language.load_state_dict({k[9:]: v for k, v in pretrained.state_dict.items()
                                         if k.startswith("language.")})
        raw = export_graphs(model, work / "raw")["decoder_model_merged"]
        optimize_component("decoder_model_merged", raw, paths["fp32"], language_kind=pretrained.config.kind)
    for name, spec in VARIANTS.items():
        if not paths[name].exists():
            quantize(paths["fp32"], paths[name], spec)
    return paths, pretrained


def quantize(src: Path, dst: Path, spec) -> None:
    from vledge.export.onnx_files import load_graph, save_graph
    from vledge.export.quantize import _matches, _weight_matmuls, quantize_decoder_int8

    if spec is None:
        quantize_decoder_int8(src, dst)
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits, block, symmetric, level = (*spec, 4)[:4]
    model = load_graph(src)
    head = [node.name for node in _weight_matmuls(model) if _matches(node, ("lm_head", "logits"))]
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=level,
                                     nodes_to_exclude=head if bits == 4 else [], op_types_to_quantize=("MatMul",))
    quantizer.process()
    result = quantizer.model.model
    if bits == 4:  # the head 8-bit, as the exporter's q4
        quantizer = MatMulNBitsQuantizer(result, bits=8, block_size=block, is_symmetric=symmetric,
                                         accuracy_level=level, op_types_to_quantize=("MatMul",))
        quantizer.process()
        result = quantizer.model.model
    save_graph(result, dst, dst)


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(config, embeds: np.ndarray, past: dict, total: int) -> dict:
    return {"inputs_embeds": embeds, "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.asarray([[total - embeds.shape[1] + i for i in range(embeds.shape[1])]], np.int64),
            **past}


def _empty_past(config, length: int = 0, rng=None) -> dict:
    shape = (1, config.key_value_heads, length, config.head_dim)
    make = (lambda: np.zeros(shape, np.float32)) if rng is None else (
        lambda: rng.standard_normal(shape).astype(np.float32))
    return {f"past_key_values.{i}.{kind}": make() for i in range(config.layers) for kind in ("key", "value")}


def forced_log_probs(sess, config, embed: np.ndarray, ids: list[int]) -> np.ndarray:
    from vledge.decoding import log_softmax

    names = [value.name for value in sess.get_outputs()]
    past = _empty_past(config)
    out = []
    for position, token in enumerate(ids):
        result = sess.run(None, _feeds(config, embed[[token]][None], past, position + 1))
        out.append(log_softmax(result[0][0, -1]))
        past = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names[1:], result[1:])}
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--work", type=Path, default=Path("bench-weight-only"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths, pretrained = build(args.folder, args.work)
    print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    config = pretrained.config
    embed = pretrained.state_dict["embed_tokens.weight"].float().numpy()
    import transformers

    ids = transformers.AutoTokenizer.from_pretrained(args.folder)(TEXT.read_text())["input_ids"][:args.tokens]
    sessions = {name: session(path) for name, path in paths.items()}
    reference = forced_log_probs(sessions["fp32"], config, embed, ids)
    report: dict[str, dict] = {}
    for name, sess in sessions.items():
        ours = forced_log_probs(sess, config, embed, ids)
        kl = (np.exp(reference) * (reference - ours)).sum(-1)
        report[name] = {"top1": float((ours.argmax(-1) == reference.argmax(-1)).mean()), "mean_kl": float(kl.mean()),
                        "mb": round(paths[name].stat().st_size / 1e6, 1)}
    time_decode_steps(sessions, config, args.steps, report, "decode_ms_past{past}")
    write_report(report, args, len(ids))


def time_decode_steps(sessions: dict, config, steps: int, report: dict, key: str) -> None:
    """Median ms of one decode step per session at past 64 and 512 (sessions interleaved), into ``report``."""
    rng = np.random.default_rng(0)
    for past_len in (64, 512):
        feeds = _feeds(config, rng.standard_normal((1, 1, config.hidden)).astype(np.float32) * 0.05,
                       _empty_past(config, past_len, rng), past_len + 1)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for sess in sessions.values():
            sess.run(None, feeds)
        for _ in range(steps):  # interleaved rounds
            for name, sess in sessions.items():
                tick = time.perf_counter()
                sess.run(None, feeds)
                times[name].append((time.perf_counter() - tick) * 1e3)
        for name in sessions:
            report[name][key.format(past=past_len)] = round(float(np.median(times[name])), 2)


def write_report(report: dict, args, tokens: int) -> None:
    """The report with the run's facts, printed and (with ``--json``) written."""
    report["_meta"] = {"folder": str(args.folder), "tokens": tokens, "steps": args.steps,
                       "load": os.getloadavg(), "threads": 1}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
