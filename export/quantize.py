"""Graph optimisation and the reduced-precision variants of the exported ONNX graphs.

Every function reads one ONNX file and writes another; none of them touches torch. The
decisions below were measured on this project's 2-core AVX2 (no VNNI) machines with the
``tiny`` and ``small`` presets, single-threaded (see the module's test file for the bounds
the tests hold the variants to):

* ``optimize_graph`` saves ONNX Runtime's *basic* level by default: semantics-preserving
  rewrites of standard ops that run before partitioning, so the file is the same for every
  execution provider. *extended* is allowed with the CPU-only fusions switched off and a check
  that nothing CPU-only was added (``PORTABLE_CONTRIB_OPS``); *all* adds NCHWc layout
  transforms tied to the CPU's instruction set and is never saved. The runtime applies the
  remaining levels online anyway, so offline levels alone buy start-up time, not speed.
* ``fuse_attention`` replaces each layer's attention subgraph (split qkv, reshape/transpose,
  concat with the past, scaled-dot-product with an additive mask) by one
  ``com.microsoft.MultiHeadAttention`` node (CPU and CUDA kernels): 227 -> 99 nodes on the
  small decoder and 25-30 % less time per decode step. ONNX Runtime's transformer optimizer
  (``model_type="gpt2"``/``"bert"``) does not recognise this attention (it fuses only
  SkipLayerNormalization and BiasGelu, which the online optimiser mostly does too), so we
  match our own exporter's pattern and verify every fusion numerically.
* int8 needs ``reduce_range`` on CPUs without VNNI: U8S8 products saturate there and the
  decoder's logits drifted 10-18 % (mean abs / std) instead of about 1 %.
* 4-bit keeps the LM head out (its drift doubles otherwise); LSTM decoders have no other
  MatMul weight, so q4 is refused for them with a clear error.
* fp16 keeps float32 inputs/outputs and runs on the CPU provider (ONNX Runtime inserts casts
  around ops without fp16 CPU kernels), slower than fp32 there: it is meant for CUDA.
* embed_tokens has no int8 variant: a lookup gains no speed from int8, and embeddings are among
  the most sensitive weights; fp16 halves the file with no measurable drift.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from vledge.errors import VledgeError

log = logging.getLogger(__name__)


class QuantizationError(VledgeError):
    """A graph cannot be optimised, quantized or converted as asked."""


COMPONENTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
AVAILABLE: dict[str, tuple[str, ...]] = {
    "vision_encoder": ("fp32", "fp16", "int8"),
    "embed_tokens": ("fp32", "fp16"),
    "decoder_model_merged": ("fp32", "fp16", "int8", "q4"),
}
OPTIMIZATION_LEVELS = ("basic", "extended")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")

# ONNX Runtime's extended-level fusions whose result only the CPU provider can run (or that
# turn QDQ/dynamic-quantized patterns into CPU-only integer kernels).
CPU_ONLY_FUSIONS = (
    "ConvActivationFusion",  # FusedConv: CUDA has it for float and ReLU only
    "GemmActivationFusion",  # FusedGemm: CPU only
    "DynamicQuantizeMatMulFusion",  # DynamicQuantizeMatMul: CPU only
    "MatMulIntegerToFloatFusion",  # MatMulIntegerToFloat: CPU (and DirectML) only
    "QDQSelectorActionTransformer",  # QDQ -> QLinearConv/QLinearAdd/...: CPU only
    "NchwcTransformer",  # NCHWc layout: tied to the CPU's vector width
)
# com.microsoft ops with float kernels in both the CPU and the CUDA provider (ONNX Runtime's
# OperatorKernels.md); anything else an optimisation adds makes the graph provider-specific.
PORTABLE_CONTRIB_OPS = frozenset({
    "Attention", "BiasGelu", "FastGelu", "FusedMatMul", "Gelu", "MatMulNBits", "MultiHeadAttention",
    "QuickGelu", "RotaryEmbedding", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
})
# Standard ops that are CPU-only in practice (integer kernels the CUDA provider lacks).
CPU_ONLY_STANDARD_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger"})

# fp16's largest finite value is 65504; an additive attention mask filled with
# finfo(float32).min would be clipped to -65504, and score + mask then overflows to -inf,
# which turns fully masked (padded) query rows into NaN that spreads through the KV cache.
FP16_SAFE_LIMIT = 32752.0
_FP16_MAX = 65504.0


@dataclass
class QuantizeOptions:
    """Knobs of ``quantize_component``; None means the measured default for the component."""

    calibration_method: str = "minmax"
    # None: per-channel for the vision encoder's convolutions, per-tensor for the decoder's
    # dynamic MatMuls (per-channel gave no accuracy there and cost ~6 % speed).
    per_channel: bool | None = None
    reduce_range: bool | None = None  # None: True unless this CPU has VNNI (see resolve_reduce_range)
    # 16 rather than ONNX Runtime's 32: on a trained small model greedy agreement rose from 92.6 % to 96.1 %.
    block_size: int = 16
    accuracy_level: int = 4
    keep_float: tuple[str, ...] = ("lm_head", "logits")
    keep_bits: int | None = None  # q4 only: None keeps the matched MatMuls float32, 8 stores them 8-bit


# --------------------------------------------------------------------------- small helpers


@contextlib.contextmanager
def _atomic_output(dst: Path) -> Iterator[Path]:
    """A temporary path beside ``dst`` that replaces it only when the block succeeds: nothing half-written."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=".onnx", dir=dst.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


_CHATTY_LOGGERS = ("onnxruntime.quantization", "onnxruntime.transformers")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools print progress and log every node; keep that out of the user's output."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logging.WARNING, logger.level))
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        text = buffer.getvalue().strip()
        if text:
            log.debug("onnxruntime said: %s", text)


def _source(src: Path) -> Path:
    src = Path(src)
    if not src.is_file():
        raise QuantizationError(f"{src}: no such ONNX file")
    return src


def _load(src: Path):
    import onnx

    src = _source(src)
    try:
        return onnx.load(str(src))
    except Exception as exc:  # protobuf decode errors have no common base class
        raise QuantizationError(f"{src}: not a readable ONNX model ({exc})") from exc


def _session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def validate_graph(path: Path, run_on_cpu: bool = True) -> None:
    """onnx's checker plus an ONNX Runtime CPU session, so no variant ships that cannot load."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise QuantizationError(f"{path}: the ONNX checker rejects the graph: {exc}") from exc
    if run_on_cpu:
        try:
            _session(path)
        except Exception as exc:
            raise QuantizationError(f"{path}: ONNX Runtime (CPU) cannot load the graph: {exc}") from exc


def op_types(model) -> set[str]:
    """``domain:op`` names (bare op for the default domain) of a model's top-level nodes."""
    return {f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            for node in model.graph.node}


def non_portable_ops(ops: set[str]) -> set[str]:
    """The ops of ``ops`` that the CUDA provider lacks (it would fall back to the CPU for them)."""
    bad = set()
    for op in ops:
        domain, _, name = op.rpartition(":")
        if domain == "com.microsoft" and name not in PORTABLE_CONTRIB_OPS:
            bad.add(op)
        elif domain not in ("", "com.microsoft") or name in CPU_ONLY_STANDARD_OPS:
            bad.add(op)
    return bad


def cpu_supports_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """True/False from the CPU flags (avx512_vnni, avx_vnni); None where they cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags") or line.startswith("Features"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return None


def resolve_reduce_range(reduce_range: bool | None) -> bool:
    """None means auto: 7-bit weights unless this CPU has VNNI, where U8S8 products cannot saturate.

    The risk lies with the CPU that *runs* the model: a graph quantized without reduce_range on
    a VNNI machine loses accuracy on AVX2-only ones, so pass True when building for others.
    """
    if reduce_range is not None:
        return bool(reduce_range)
    vnni = cpu_supports_vnni()
    resolved = vnni is not True
    log.info("reduce_range auto: VNNI %s -> reduce_range=%s", {True: "found", False: "absent", None: "unknown"}[vnni],
             resolved)
    return resolved


# --------------------------------------------------------------------------- graph optimisation


def optimize_graph(src: Path, dst: Path, level: str = "basic") -> Path:
    """Save ONNX Runtime's offline optimisation of ``src`` at a level every execution provider can run.

    ``basic`` is portable by construction. ``extended`` runs with ``CPU_ONLY_FUSIONS`` disabled
    and fails if it still added an op outside ``PORTABLE_CONTRIB_OPS``. Optimise before
    converting to fp16: fp16 graphs are refused.
    """
    import onnxruntime as ort

    if level not in OPTIMIZATION_LEVELS:
        raise QuantizationError(
            f"unknown optimisation level {level!r}; choose from {OPTIMIZATION_LEVELS} "
            "('all' adds CPU-specific layout transforms and is applied online, never saved)"
        )
    src = _source(src)
    before = _load(src)
    if any(tensor.data_type == 10 for tensor in before.graph.initializer):  # FLOAT16
        raise QuantizationError(
            f"{src}: is an fp16 graph; optimise the fp32 graph and convert afterwards (the CPU provider would "
            "save its fp16->fp32 casts into the graph)"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    options.log_severity_level = 3
    disabled = list(CPU_ONLY_FUSIONS) if level == "extended" else []
    with _atomic_output(Path(dst)) as out:
        options.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        except Exception as exc:
            raise QuantizationError(f"{src}: ONNX Runtime cannot optimise the graph: {exc}") from exc
        after = _load(out)
        added = non_portable_ops(op_types(after) - op_types(before))
        if added:
            raise QuantizationError(
                f"{src}: the {level} level added ops only the CPU provider runs ({sorted(added)}); use level='basic'"
            )
        validate_graph(out)
    log.info("optimised %s (%s): %d -> %d nodes", src.name, level, len(before.graph.node), len(after.graph.node))
    return Path(dst)


def _num_heads(model, num_heads: int | None) -> int:
    if num_heads is not None:
        return int(num_heads)
    for value in model.graph.input:
        if value.name.startswith("past_key_values.") and value.name.endswith(".key"):
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[1].HasField("dim_value"):
                return int(dims[1].dim_value)
    raise QuantizationError("cannot read the number of heads from the past_key_values inputs; pass num_heads")


class _Graph:
    """Producer/consumer lookups over a graph, for matching subgraphs."""

    def __init__(self, graph) -> None:
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {value.name for value in graph.output}

    def parent(self, node, index: int, op: str | tuple[str, ...]):
        """The node producing ``node.input[index]`` if it has op type ``op``, else None."""
        ops = (op,) if isinstance(op, str) else op
        if index >= len(node.input):
            return None
        found = self.producer.get(node.input[index])
        return found if found is not None and found.op_type in ops else None


def _perm(node) -> list[int]:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return []


def _skip_scale(g: _Graph, name: str):
    """The node producing ``name``, looking through the Mul by the attention scale the exporter inserts."""
    node = g.producer.get(name)
    if node is not None and node.op_type == "Mul":
        for index in (0, 1):
            inner = g.parent(node, index, "Transpose")
            if inner is not None:
                return inner, node
    return node, None


def _match_attention(g: _Graph, softmax) -> tuple[dict, list]:
    """One layer's attention around ``softmax``: the MHA inputs/outputs and the nodes it replaces."""
    where = f"attention at {softmax.name or softmax.output[0]}"

    def need(node, what: str):
        if node is None:
            raise QuantizationError(f"{where}: unexpected graph shape ({what} not found); cannot fuse")
        return node

    add = need(g.parent(softmax, 0, "Add"), "mask Add")
    scores = None
    for index in (0, 1):
        scores = g.parent(add, index, "MatMul")
        if scores is not None:
            mask = add.input[1 - index]
            break
    scores = need(scores, "Q·Kᵀ MatMul")
    q_t, q_scale = _skip_scale(g, scores.input[0])
    k_tt, k_scale = _skip_scale(g, scores.input[1])
    if q_t is None or q_t.op_type != "Transpose" or _perm(q_t) != [0, 2, 1, 3]:
        need(None, "query transpose")
    if k_tt is None or k_tt.op_type != "Transpose" or _perm(k_tt) != [0, 1, 3, 2]:
        need(None, "key transpose")
    q_reshape = need(g.parent(q_t, 0, "Reshape"), "query reshape")
    k_concat = need(g.parent(k_tt, 0, "Concat"), "key concat with the past")
    k_t = need(g.parent(k_concat, 1, "Transpose"), "new key transpose")
    k_reshape = need(g.parent(k_t, 0, "Reshape"), "new key reshape")
    after = [node for node in g.consumers.get(softmax.output[0], []) if node.op_type == "MatMul"]
    weighted = need(after[0] if len(after) == 1 else None, "attention·V MatMul")
    v_concat = need(g.parent(weighted, 1, "Concat"), "value concat with the past")
    v_t = need(g.parent(v_concat, 1, "Transpose"), "new value transpose")
    v_reshape = need(g.parent(v_t, 0, "Reshape"), "new value reshape")
    out_t = g.consumers.get(weighted.output[0], [])
    out_t = need(out_t[0] if len(out_t) == 1 and out_t[0].op_type == "Transpose" else None, "output transpose")
    out_reshape = g.consumers.get(out_t.output[0], [])
    out_reshape = need(out_reshape[0] if len(out_reshape) == 1 and out_reshape[0].op_type == "Reshape" else None,
                       "output reshape")
    for concat in (k_concat, v_concat):
        for attribute in concat.attribute:
            if attribute.name == "axis" and attribute.i not in (2, -2):
                raise QuantizationError(f"{where}: the past is concatenated on axis {attribute.i}, not 2")
    replaced = [softmax, add, scores, q_t, k_tt, q_reshape, k_concat, k_t, k_reshape, weighted, v_concat, v_t,
                v_reshape, out_t, out_reshape] + [node for node in (q_scale, k_scale) if node is not None]
    # Tensors used outside the subgraph (other than these three) are caught after pruning (_dangling).
    spec = {
        "inputs": [q_reshape.input[0], k_reshape.input[0], v_reshape.input[0], "", "", mask,
                   k_concat.input[0], v_concat.input[0]],
        "outputs": [out_reshape.output[0], k_concat.output[0], v_concat.output[0]],
        "anchor": out_reshape,
    }
    return spec, replaced


def _prune(model) -> None:
    """Drop nodes whose outputs nothing uses, then initializers and value_info left without a user."""
    graph = model.graph
    live = {value.name for value in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(name in live for name in node.output):
            keep.append(node)
            live.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    initializers = [tensor for tensor in graph.initializer if tensor.name in live]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    produced = {name for node in graph.node for name in node.output}
    infos = [info for info in graph.value_info if info.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _dangling(model) -> set[str]:
    """Tensors some node reads that no node, input or initializer provides (left by a bad rewrite)."""
    graph = model.graph
    known = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    known |= {name for node in graph.node for name in node.output}
    return {name for node in graph.node for name in node.input if name and name not in known}


def fuse_attention(src: Path, dst: Path, num_heads: int | None = None, tolerance: float = 1e-4) -> Path:
    """Replace each transformer layer's attention by one MultiHeadAttention node, checked against ``src``.

    A graph without Softmax (the LSTM decoder) is copied unchanged. The fused graph must give the
    same logits and present keys/values as ``src`` for a padded prefill and a decode step, within
    ``tolerance`` relative to the largest value, or nothing is written.
    """
    from onnx import helper

    src = _source(src)
    model = _load(src)
    softmaxes = [node for node in model.graph.node if node.op_type == "Softmax"]
    if not softmaxes:
        log.info("%s: no attention to fuse; copied unchanged", src.name)
        with _atomic_output(Path(dst)) as out:
            shutil.copyfile(src, out)
        return Path(dst)
    heads = _num_heads(model, num_heads)
    g = _Graph(model.graph)
    replacements: dict[int, object] = {}
    removed: set[int] = set()
    for index, softmax in enumerate(softmaxes):
        spec, replaced = _match_attention(g, softmax)
        fused = helper.make_node("MultiHeadAttention", spec["inputs"], spec["outputs"], domain="com.microsoft",
                                 name=f"MultiHeadAttention_{index}", num_heads=heads)
        replacements[id(spec["anchor"])] = fused
        removed.update(id(node) for node in replaced)
    nodes = [replacements.get(id(node), node) for node in model.graph.node
             if id(node) in replacements or id(node) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _prune(model)
    missing = _dangling(model)
    if missing:
        raise QuantizationError(f"{src}: attention tensors {sorted(missing)[:4]} are used outside the attention; "
                                "cannot fuse")
    with _atomic_output(Path(dst)) as out:
        import onnx

        onnx.save(model, str(out))
        validate_graph(out)
        _check_same_decoder(src, out, tolerance, Path(dst))
    log.info("fused %d attention layers in %s (%d heads)", len(softmaxes), src.name, heads)
    return Path(dst)


def decoder_probe(session, seed: int = 0) -> list[list[np.ndarray]]:
    """Outputs of a left-padded prefill (past length 0) and one decode step, to compare two decoders."""
    rng = np.random.default_rng(seed)
    inputs = {value.name: value for value in session.get_inputs()}
    hidden = inputs["inputs_embeds"].shape[2]
    if not isinstance(hidden, int):
        raise QuantizationError("the decoder's inputs_embeds has no fixed hidden size; cannot probe it")
    batch, seq = 2, 3
    output_names = [value.name for value in session.get_outputs()]

    def embeds(length: int) -> np.ndarray:
        return rng.standard_normal((batch, length, hidden)).astype(np.float32)

    if "past_hidden" in inputs:
        layers = inputs["past_hidden"].shape[0]
        state = np.zeros((layers, batch, hidden), np.float32)
        first = session.run(None, {"inputs_embeds": embeds(seq), "past_hidden": state, "past_cell": state})
        second = session.run(None, {"inputs_embeds": embeds(1), "past_hidden": first[1], "past_cell": first[2]})
        return [first, second]
    past_names = [name for name in inputs if name.startswith("past_key_values.")]
    feeds = {name: np.zeros((batch, inputs[name].shape[1], 0, inputs[name].shape[3]), np.float32)
             for name in past_names}
    mask = np.ones((batch, seq), np.int64)
    mask[0, 0] = 0
    steps = []
    x = embeds(seq)
    for _ in range(2):
        positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, -x.shape[1]:]
        result = session.run(None, {"inputs_embeds": x, "attention_mask": mask, "position_ids": positions, **feeds})
        steps.append(result)
        feeds = {name.replace("present.", "past_key_values.", 1): value
                 for name, value in zip(output_names[1:], result[1:])}
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        x = embeds(1)
    return steps


def _check_same_decoder(reference: Path, candidate: Path, tolerance: float, label: Path) -> None:
    """Raise unless ``candidate`` reproduces ``reference``'s outputs (``label`` names it in the message)."""
    want = decoder_probe(_session(reference))
    try:
        got = decoder_probe(_session(candidate))
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(
            f"{label}: the fused graph differs from {reference.name}: it fails to run ({exc})"
        ) from exc
    for step, (a, b) in enumerate(zip(want, got)):
        for index, (x, y) in enumerate(zip(a, b)):
            if x.shape != y.shape:
                raise QuantizationError(f"{label}: output {index} has shape {y.shape}, expected {x.shape}")
            scale = max(1.0, float(np.abs(x).max()))
            error = float(np.abs(x - y).max())
            if not error <= tolerance * scale:
                raise QuantizationError(
                    f"{label}: the fused graph differs from {reference.name} at step {step}, output {index} "
                    f"(max abs diff {error:.3g} > {tolerance * scale:.3g})"
                )


def optimize_component(component: str, src: Path, dst: Path, level: str = "basic", fuse: bool = True,
                       language_kind: str | None = None) -> Path:
    """The recommended offline optimisation of one graph: ``level`` for all, attention fusion for the decoder
    (the fusion that fits ``language_kind``'s attention; the built-in transformer's by default)."""
    if component not in COMPONENTS:
        raise QuantizationError(f"unknown component {component!r}; choose from {COMPONENTS}")
    optimize_graph(src, dst, level)
    if fuse and component == "decoder_model_merged":
        if language_kind == "llama":
            from vledge.export.fusion_llama import fuse_llama_attention

            fuse_llama_attention(dst, dst)
        else:
            fuse_attention(dst, dst)
    return Path(dst)


# --------------------------------------------------------------------------- int8


def _input_shape(model, name: str) -> list[int | None]:
    for value in model.graph.input:
        if value.name == name:
            return [dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim]
    raise QuantizationError(f"the graph has no input named {name!r}")


def check_calibration(calibration, expected: list[int | None] | None = None) -> np.ndarray:
    """Calibration pixels as float32 [N, 3, H, W] with N > 0, or a typed error saying what is wrong."""
    if not isinstance(calibration, np.ndarray):
        raise QuantizationError(f"calibration must be a numpy array [N, 3, H, W], got {type(calibration).__name__}")
    if calibration.ndim != 4 or calibration.shape[1] != 3:
        raise QuantizationError(f"calibration must have shape [N, 3, H, W], got {list(calibration.shape)}")
    if calibration.shape[0] == 0:
        raise QuantizationError("the calibration set is empty; static int8 needs representative images")
    if not np.issubdtype(calibration.dtype, np.floating):
        raise QuantizationError(f"calibration must hold preprocessed float pixels, got dtype {calibration.dtype}")
    if expected is not None:
        for axis in (2, 3):
            if expected[axis] is not None and calibration.shape[axis] != expected[axis]:
                raise QuantizationError(
                    f"calibration images are {calibration.shape[2]}x{calibration.shape[3]}, "
                    f"the vision encoder expects {expected[2]}x{expected[3]}"
                )
    pixels = np.ascontiguousarray(calibration, dtype=np.float32)
    if not np.isfinite(pixels).all():
        raise QuantizationError("calibration pixels contain NaN or infinity")
    return pixels


def _calibration_reader(pixels: np.ndarray, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class PixelBatches(CalibrationDataReader):
        """Feeds the calibration pixels to the encoder in batches."""

        def __init__(self) -> None:
            self.index = 0

        def get_next(self):
            if self.index >= len(pixels):
                return None
            batch = pixels[self.index:self.index + batch_size]
            self.index += batch_size
            return {"pixel_values": batch}

        def rewind(self) -> None:
            self.index = 0

    return PixelBatches()


def quantize_vision_int8(src: Path, dst: Path, calibration: np.ndarray, method: str = "minmax",
                         per_channel: bool = True, reduce_range: bool | None = None, batch_size: int = 8) -> Path:
    """Static QDQ int8 of the vision encoder (CNN + projector), calibrated on preprocessed pixels.

    Plain 3x3 conv stacks ran 1.8x faster than fp32 here; ``reduce_range`` (auto on non-VNNI
    CPUs) cut the drift from ~10 % to ~2 % (mean abs diff / std of the embeddings).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"unknown calibration method {method!r}; choose from {CALIBRATION_METHODS}")
    if batch_size < 1:
        raise QuantizationError(f"batch_size must be at least 1, got {batch_size}")
    src = _source(src)
    model = _load(src)
    pixels = check_calibration(calibration, _input_shape(model, "pixel_values"))
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                        "percentile": CalibrationMethod.Percentile}[method]
    reduce = resolve_reduce_range(reduce_range)
    with tempfile.TemporaryDirectory(prefix="vledge-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:  # shape inference + folding so every tensor gets a type and a calibrated range
            with _quiet():
                quant_pre_process(str(src), str(prepared))
        except Exception as exc:
            log.warning("quantization pre-processing of %s failed (%s); quantizing the graph as it is", src.name, exc)
            shutil.copyfile(src, prepared)
        with _atomic_output(Path(dst)) as out:
            try:
                with _quiet():
                    quantize_static(
                        str(prepared), str(out), _calibration_reader(pixels, batch_size),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=per_channel, reduce_range=reduce, calibrate_method=calibrate_method,
                    )
            except QuantizationError:
                raise
            except Exception as exc:
                raise QuantizationError(f"{src}: static int8 quantization failed: {exc}") from exc
            validate_graph(out)
    log.info("int8 vision encoder %s: %s calibration on %d images, per_channel=%s, reduce_range=%s",
             Path(dst).name, method, len(pixels), per_channel, reduce)
    return Path(dst)


def quantize_decoder_int8(src: Path, dst: Path, reduce_range: bool | None = None, per_channel: bool = False,
                          keep_float: tuple[str, ...] = ("lm_head", "logits")) -> Path:
    """Dynamic int8 of the decoder's weight MatMuls (and Gemm); an LSTM becomes DynamicQuantizeLSTM.

    Activations are quantized per call, so no calibration is needed; activation-by-activation
    MatMuls (attention scores) stay float. ``reduce_range`` (auto: no VNNI) matters: without it
    the small decoder's logits drifted ~11 % of their std, with it ~1 %. The LM head (MatMuls
    matching ``keep_float``) stays float: on a trained ``small`` model (400 held-out questions)
    greedy-token agreement with PyTorch was 88.1 % with it in int8 and 98.7 % without.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = _source(src)
    source_model = _load(src)
    excluded = [node.name for node in _weight_matmuls(source_model) if _matches(node, keep_float)]
    reduce = resolve_reduce_range(reduce_range)
    with _atomic_output(Path(dst)) as out:
        try:
            with _quiet():
                quantize_dynamic(
                    str(src), str(out), op_types_to_quantize=["MatMul", "Gemm", "LSTM"], per_channel=per_channel,
                    nodes_to_exclude=excluded,
                    reduce_range=reduce, weight_type=QuantType.QInt8,
                    # contrib ops (MultiHeadAttention) stop ONNX shape inference; their outputs are float
                    extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
                )
        except Exception as exc:
            raise QuantizationError(f"{src}: dynamic int8 quantization failed: {exc}") from exc
        quantized = _load(out)
        integer_ops = {"MatMulInteger", "com.microsoft:DynamicQuantizeLSTM", "com.microsoft:DynamicQuantizeMatMul"}
        if not op_types(quantized) & integer_ops:
            raise QuantizationError(f"{src}: no MatMul, Gemm or LSTM weight was quantized")
        validate_graph(out)
    log.info("int8 decoder %s: per_channel=%s, reduce_range=%s", Path(dst).name, per_channel, reduce)
    return Path(dst)


# --------------------------------------------------------------------------- 4-bit


def _weight_matmuls(model) -> list:
    """MatMul nodes whose second input is a 2-D initializer (the ones MatMulNBits can replace)."""
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type == "MatMul" and len(shapes.get(node.input[1], [])) == 2]


def _matches(node, patterns: tuple[str, ...]) -> bool:
    names = [node.name, *node.input, *node.output]
    return any(pattern and pattern in name for pattern in patterns for name in names)


def quantize_decoder_q4(src: Path, dst: Path, block_size: int = 16, accuracy_level: int = 4,
                        keep_float: tuple[str, ...] = ("lm_head", "logits"), keep_bits: int | None = None) -> Path:
    """4-bit block-wise weight-only MatMulNBits for the decoder, keeping the LM head out.

    ``keep_float`` patterns are substrings of a MatMul's node, input or output names (the head
    is ``/lm_head/MatMul`` producing ``logits``). Kept MatMuls stay float32, or become 8-bit
    MatMulNBits with ``keep_bits=8`` (same drift as float, a quarter of the head's bytes).
    ``accuracy_level=4`` (int8 compute) is about 4x faster than 0 on CPUs. Raises for graphs
    with no other MatMul weight (LSTM decoders: their LSTM weights cannot be 4-bit, so q4 would
    only copy the file; use int8 there).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizationError(f"block_size must be a power of two of at least 16, got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantizationError(f"accuracy_level must be 0-4, got {accuracy_level}")
    if keep_bits not in (None, 8):
        raise QuantizationError(f"keep_bits must be None (float) or 8, got {keep_bits}")
    src = _source(src)
    model = _load(src)
    candidates = _weight_matmuls(model)
    kept = [node.name for node in candidates if _matches(node, keep_float)]
    if len(kept) == len(candidates):
        what = "an LSTM decoder" if any(node.op_type == "LSTM" for node in model.graph.node) else "this graph"
        raise QuantizationError(
            f"{src}: q4 is not applicable to {what}: no MatMul weight outside the kept {list(keep_float)} "
            f"({len(candidates)} weight MatMuls in all); use int8 instead"
        )
    if any(not node.name for node in candidates):
        raise QuantizationError(f"{src}: MatMul nodes without names cannot be excluded by name")
    try:
        with _quiet():
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False,
                                             accuracy_level=accuracy_level, nodes_to_exclude=kept,
                                             op_types_to_quantize=("MatMul",))
            quantizer.process()
            result = quantizer.model.model
            if keep_bits == 8 and kept:
                quantizer = MatMulNBitsQuantizer(result, bits=8, block_size=block_size, is_symmetric=False,
                                                 accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
                quantizer.process()
                result = quantizer.model.model
    except Exception as exc:
        raise QuantizationError(f"{src}: 4-bit quantization failed: {exc}") from exc
    with _atomic_output(Path(dst)) as out:
        import onnx

        onnx.save(result, str(out))
        validate_graph(out)
    log.info("q4 decoder %s: %d MatMuls 4-bit (block %d, accuracy_level %d), kept %s as %s",
             Path(dst).name, len(candidates) - len(kept), block_size, accuracy_level, kept,
             "float32" if keep_bits is None else f"{keep_bits}-bit")
    return Path(dst)


# --------------------------------------------------------------------------- fp16


def _clamp_for_fp16(model) -> int:
    """Bring float constants beyond fp16's range (the attention mask fill) to ±FP16_SAFE_LIMIT; returns how many."""
    from onnx import numpy_helper

    def clamp(tensor) -> bool:
        if tensor.data_type != 1:  # FLOAT
            return False
        array = numpy_helper.to_array(tensor)
        if array.size == 0 or np.abs(array).max() <= _FP16_MAX:
            return False
        fixed = np.clip(np.nan_to_num(array, posinf=FP16_SAFE_LIMIT, neginf=-FP16_SAFE_LIMIT),
                        -FP16_SAFE_LIMIT, FP16_SAFE_LIMIT).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(fixed, tensor.name))
        return True

    count = sum(clamp(tensor) for tensor in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            count += sum(clamp(attribute.t) for attribute in node.attribute if attribute.name == "value")
    return count


def convert_fp16(src: Path, dst: Path, keep_io_types: bool = True, op_block_list: list[str] | None = None) -> Path:
    """fp16 weights and compute with float32 inputs/outputs; runs on CPU (via inserted casts), fast on CUDA."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    src = _source(src)
    model = _load(src)
    clamped = _clamp_for_fp16(model)
    if clamped:
        log.info("%s: %d float constants beyond the fp16 range clamped to ±%g", src.name, clamped, FP16_SAFE_LIMIT)
    try:
        with _quiet():
            converted = convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=op_block_list)
            wrapped = OnnxModel(converted)
            wrapped.topological_sort()  # keep_io_types appends its Cast nodes at the end
    except Exception as exc:
        raise QuantizationError(f"{src}: fp16 conversion failed: {exc}") from exc
    with _atomic_output(Path(dst)) as out:
        onnx.save(wrapped.model, str(out))
        validate_graph(out)
    log.info("fp16 %s written (keep_io_types=%s)", Path(dst).name, keep_io_types)
    return Path(dst)


# --------------------------------------------------------------------------- dispatcher


def quantize_component(component: str, precision: str, src: Path, dst: Path,
                       calibration: np.ndarray | None = None, options: QuantizeOptions | None = None,
                       language_kind: str | None = None) -> Path:
    """Write the ``precision`` variant of one exported graph; ``AVAILABLE`` lists what exists.

    ``language_kind`` ("transformer"/"lstm") lets a caller that knows the model refuse LSTM q4
    before reading the graph; without it the graph itself tells.
    """
    options = options or QuantizeOptions()
    if component not in AVAILABLE:
        raise QuantizationError(f"unknown component {component!r}; choose from {COMPONENTS}")
    if precision not in AVAILABLE[component]:
        why = {
            ("embed_tokens", "int8"): "a lookup gains no speed from int8 and embeddings are among the most "
                                      "sensitive weights; use fp16 to halve the file",
            ("embed_tokens", "q4"): "embeddings are among the most sensitive weights; use fp16",
            ("vision_encoder", "q4"): "4-bit weight-only quantization covers MatMul, not convolutions; use int8",
        }.get((component, precision), "")
        raise QuantizationError(
            f"no {precision} variant of {component}; it has {AVAILABLE[component]}" + (f" ({why})" if why else "")
        )
    if (component, precision, language_kind) == ("decoder_model_merged", "q4", "lstm"):
        raise QuantizationError("q4 is not applicable to an LSTM decoder: its only MatMul weight is the LM head, "
                                "which stays float; use int8 instead")
    src = _source(src)
    if calibration is not None and (component, precision) != ("vision_encoder", "int8"):
        log.warning("calibration data is only used for the int8 vision encoder; ignored for %s %s",
                    component, precision)
    if precision == "fp32":
        with _atomic_output(Path(dst)) as out:
            shutil.copyfile(src, out)
            validate_graph(out)
        return Path(dst)
    if precision == "fp16":
        return convert_fp16(src, dst)
    if precision == "int8" and component == "vision_encoder":
        if calibration is None:
            raise QuantizationError("the int8 vision encoder needs calibration images ([N, 3, H, W] pixels)")
        return quantize_vision_int8(src, dst, calibration, method=options.calibration_method,
                                    per_channel=True if options.per_channel is None else options.per_channel,
                                    reduce_range=options.reduce_range)
    if precision == "int8":
        return quantize_decoder_int8(src, dst, reduce_range=options.reduce_range,
                                     per_channel=bool(options.per_channel), keep_float=options.keep_float)
    return quantize_decoder_q4(src, dst, block_size=options.block_size, accuracy_level=options.accuracy_level,
                               keep_float=options.keep_float, keep_bits=options.keep_bits)
