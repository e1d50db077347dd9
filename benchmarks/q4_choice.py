"""Which 4-bit decoder to ship for a Llama-family LM: drift, perplexity and decode speed per packing, measured.

    python benchmarks/q4_choice.py HF_FOLDER [--work DIR] [--tokens 256] [--steps 30] [--json OUT]

Exports the merged decoder of the Hugging Face LM folder the way ``vledge export`` does (fp32, optimised, fused),
then writes 4-bit (and, for comparison, 8-bit) MatMulNBits variants of it, all with ``accuracy_level`` 4:

* ``ort-b16-asym`` / ``ort-b32-asym`` / ``ort-b32-sym``: ONNX Runtime's ``MatMulNBitsQuantizer`` (its asymmetric
  blocks are stretched to include zero; symmetric block 32 is what onnxruntime-genai's builder writes);
* ``minmax-b32``: ``vledge.export.nbits`` min/max blocks of 32 (llama.cpp's Q4_1 grid) with the exact offset
  correction, and ``minmax-b32-nocorr`` without it (the zero point rounded, each block off by up to half a step);
* the LM head as ``h8`` (8-bit symmetric, vledge's packer: ``d = max|w| / 127``), ``h8ort`` (ONNX Runtime's 8-bit),
  ``h4`` (the body's 4-bit packing) or ``hf`` (float32).

For each, against the fp32 graph, on the first ``--tokens`` tokens of ``benchmarks/text/public_domain_english.txt``
fed through the KV cache: top-1 next-token agreement, mean KL(fp32 || variant) in nats, perplexity; then the median
ms of one decode step at past 64 and 512, one thread, variants interleaved round by round; and the file size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TEXT = HERE / "text" / "public_domain_english.txt"
HEAD = ("lm_head", "logits")
# name -> (body, head); body/head: "ort-b16-asym", "ort-b32-asym", "ort-b32-sym", "minmax", "minmax-nocorr",
# "own8", "ort8", "float"
VARIANTS = {
    "ort-b16-asym-h8ort": ("ort-b16-asym", "ort8"),  # the exporter's q4 before this measurement
    "ort-b32-asym-h8ort": ("ort-b32-asym", "ort8"),
    "ort-b32-sym-h8ort": ("ort-b32-sym", "ort8"),
    "ort-b32-sym-h4": ("ort-b32-sym", "ort-b32-sym"),
    "minmax-b32-nocorr-h8": ("minmax-nocorr", "own8"),
    "minmax-b32-h8": ("minmax", "own8"),
    "minmax-b32-hf": ("minmax", "float"),
    "minmax-b32-h4": ("minmax", "minmax"),
    "minmax-b32-h8ort": ("minmax", "ort8"),
    "nbits8-ort-b32-sym": ("ort8", "ort8"),  # the exporter's int8
    "nbits8-own-b32-sym": ("own8", "own8"),
}


def _ort(model, bits: int, block: int, symmetric: bool, exclude: list[str]):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=4,
                                     nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model


def quantize(src: Path, dst: Path, body: str, head: str) -> None:
    from vledge.export.nbits import replace_matmuls
    from vledge.export.onnx_files import load_graph, save_graph
    from vledge.export.quantize import _matches, _weight_matmuls

    model = load_graph(src)
    matmuls = _weight_matmuls(model)
    heads = {node.name for node in matmuls if _matches(node, HEAD)}
    others = {node.name for node in matmuls} - heads
    for names, how in ((others, body), (heads, head)):
        if how == "float":
            continue
        if how.startswith("minmax"):
            replace_matmuls(model, "minmax4", names, offset_correction=how == "minmax")
        elif how == "own8":
            replace_matmuls(model, "symmetric8", names)
        else:
            keep = [node.name for node in _weight_matmuls(model) if node.name not in names]
            bits, block, symmetric = {"ort-b16-asym": (4, 16, False), "ort-b32-asym": (4, 32, False),
                                      "ort-b32-sym": (4, 32, True), "ort8": (8, 32, True)}[how]
            model = _ort(model, bits, block, symmetric, keep)
    save_graph(model, dst, dst)


def session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def forced(sess, config, embed: np.ndarray, ids: list[int], vocab: int) -> np.ndarray:
    """Log-probabilities [len(ids), vocab] of the text fed token by token through the KV cache (the graph returns
    the last position's logits only)."""
    from weight_only_choice import forced_log_probs

    from vledge.decoding import log_softmax

    rows = forced_log_probs(sess, config, embed, ids)
    return np.stack([log_softmax(row[:vocab].astype(np.float64)) for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--work", type=Path, default=Path("bench-q4-choice"))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import weight_only_choice

    args.work.mkdir(parents=True, exist_ok=True)
    weight_only_choice.VARIANTS = {}
    _, pretrained = weight_only_choice.build(args.folder, args.work)  # the fp32 graph (cached)
    names = [name for name in args.variants.split(",") if name]
    paths = {"fp32": args.work / "fp32.onnx", **{name: args.work / f"q4c-{name}.onnx" for name in names}}
    for name in names:
        if not paths[name].exists():
            tick = time.perf_counter()
            quantize(paths["fp32"], paths[name], *VARIANTS[name])
            print(f"{name}: written in {time.perf_counter() - tick:.0f} s", file=sys.stderr)
    config = pretrained.config
    embed = pretrained.state_dict["embed_tokens.weight"].float().numpy()
    import transformers

    vocab = json.loads((args.folder / "config.json").read_text())["vocab_size"]
    ids = transformers.AutoTokenizer.from_pretrained(args.folder)(TEXT.read_text())["input_ids"][:args.tokens]
    report: dict[str, dict] = {}
    reference = None
    for name, path in paths.items():  # one session at a time for quality (memory)
        ours = forced(session(path), config, embed, ids, vocab)
        reference = ours if reference is None else reference
        kl = (np.exp(reference) * (reference - ours)).sum(-1)
        nll = -ours[np.arange(len(ids) - 1), ids[1:]]
        report[name] = {"top1": round(float((ours.argmax(-1) == reference.argmax(-1)).mean()), 4),
                        "mean_kl": float(kl.mean()), "perplexity": round(float(np.exp(nll.mean())), 3),
                        "mb": round(path.stat().st_size / 1e6, 1)}
        print(name, report[name], file=sys.stderr)
    from weight_only_choice import time_decode_steps, write_report

    sessions = {name: session(path) for name, path in paths.items()}
    time_decode_steps(sessions, config, args.steps, report, "ms_past{past}")
    write_report(report, args, len(ids))


if __name__ == "__main__":
    main()
