"""Quantization: the int8, 4-bit and fp16 variants of the exported ONNX graphs, and the dispatcher.

Every function reads one ONNX file and writes another; none of them touches torch. The
decisions below were measured on this project's 2-core AVX2 (no VNNI) machines with the
``tiny`` and ``small`` presets, single-threaded (see the module's test file for the bounds
the tests hold the variants to):

* optimisation (``optimize``) and attention fusion (``fusion``) run before these, on fp32.
* int8 needs ``reduce_range`` on CPUs without VNNI: U8S8 products saturate there and the
  decoder's logits drifted 10-18 % (mean abs / std) instead of about 1 %.
* 4-bit keeps the LM head out (its drift doubles otherwise); LSTM decoders have no other
  MatMul weight, so q4 is refused for them with a clear error.
* fp16 keeps float32 inputs/outputs and runs on the CPU provider (ONNX Runtime inserts casts
  around ops without fp16 CPU kernels), slower than fp32 there: it is meant for CUDA.
* embed_tokens' int8 is the token table as 8-bit ``GatherBlockQuantized`` (symmetric blocks of 32 along the hidden
  axis): a lookup gains no speed from it, but the file and the session's memory shrink to 28 % of float32. There is
  no q4 table: 4 bits drifted more than the whole q4 decoder (``quantize_embed``).
* the Llama family's q4 is ``vledge.export.nbits``' min/max blocks of 32 with the exact block offset (the family's
  ``q4_scheme``), not ONNX Runtime's packer; see ``quantize_decoder_q4``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vledge.errors import QuantizationError
from vledge.families import language_family
from vledge.export.onnx_files import (atomic_output, copy_graph, load_graph, op_types, quiet, save_graph,
                                      source_graph, validate_graph)
from vledge.export.calibration import (calibration_reader, calibration_within_memory, input_shape,
                                       check_calibration)
from vledge.export.fp16 import FP16_SAFE_LIMIT, _clamp_for_fp16, convert_fp16  # noqa: F401 (part of this module's API)
from vledge.export.optimize import COMPONENTS

__all__ = ["AVAILABLE", "CALIBRATION_METHODS", "COMPONENTS", "FP16_SAFE_LIMIT", "Q4_SCHEMES", "QuantizationError",
           "QuantizeOptions", "check_calibration", "convert_fp16", "cpu_supports_vnni", "quantize_component",
           "quantize_decoder_int8", "quantize_decoder_int8_weight_only", "quantize_decoder_q4", "quantize_embed",
           "quantize_vision_int8", "resolve_reduce_range"]

log = logging.getLogger(__name__)

AVAILABLE: dict[str, tuple[str, ...]] = {
    "vision_encoder": ("fp32", "fp16", "int8"),
    "embed_tokens": ("fp32", "fp16", "int8"),
    "decoder_model_merged": ("fp32", "fp16", "int8", "q4"),
}
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# How q4 packs the decoder's 4-bit weights: ONNX Runtime's MatMulNBitsQuantizer (asymmetric, the range stretched to
# include zero) or vledge.export.nbits' min/max blocks with their exact offset.
Q4_SCHEMES = ("onnxruntime", "minmax")



@dataclass(frozen=True)
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
    calibration_batch_size: int = 8  # images per calibration run of the int8 vision encoder
    # The decoder's int8: "dynamic" (MatMulInteger, activations quantized per call, LM head float) or
    # "matmulnbits" (8-bit block-wise weight-only MatMulNBits, LM head included; a family chooses it, see
    # quantize_decoder_int8_weight_only for the measurements).
    int8_weights: str = "dynamic"
    int8_block_size: int = 32
    int8_symmetric: bool = True
    q4_scheme: str | None = None  # None: the language family's q4_scheme where the caller names it, else onnxruntime

    def __post_init__(self) -> None:
        if self.calibration_method not in CALIBRATION_METHODS:
            raise QuantizationError(f"unknown calibration method {self.calibration_method!r}; "
                                    f"choose from {CALIBRATION_METHODS}")
        for name in ("per_channel", "reduce_range"):
            if getattr(self, name) not in (None, True, False):
                raise QuantizationError(f"{name} must be True, False or None (auto), got {getattr(self, name)!r}")
        if (isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 16
                or self.block_size & (self.block_size - 1)):
            raise QuantizationError(f"block_size must be a power of two of at least 16, got {self.block_size}")
        if isinstance(self.accuracy_level, bool) or self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QuantizationError(f"accuracy_level must be 0-4, got {self.accuracy_level}")
        if not isinstance(self.keep_float, tuple) or not all(isinstance(p, str) for p in self.keep_float):
            raise QuantizationError(f"keep_float must be a tuple of name patterns, got {self.keep_float!r}")
        if self.keep_bits not in (None, 8) or isinstance(self.keep_bits, bool):
            raise QuantizationError(f"keep_bits must be None (float) or 8, got {self.keep_bits}")
        if self.int8_weights not in ("dynamic", "matmulnbits"):
            raise QuantizationError(f"int8_weights must be 'dynamic' or 'matmulnbits', got {self.int8_weights!r}")
        if (isinstance(self.int8_block_size, bool) or not isinstance(self.int8_block_size, int)
                or self.int8_block_size < 16 or self.int8_block_size & (self.int8_block_size - 1)):
            raise QuantizationError(f"int8_block_size must be a power of two of at least 16, got "
                                    f"{self.int8_block_size}")
        if self.q4_scheme is not None and self.q4_scheme not in Q4_SCHEMES:
            raise QuantizationError(f"q4_scheme must be one of {Q4_SCHEMES} (or None: the family's), got "
                                    f"{self.q4_scheme!r}")
        if not isinstance(self.int8_symmetric, bool):
            raise QuantizationError(f"int8_symmetric must be True or False, got {self.int8_symmetric!r}")
        if (isinstance(self.calibration_batch_size, bool) or not isinstance(self.calibration_batch_size, int)
                or self.calibration_batch_size < 1):
            raise QuantizationError(f"batch_size must be at least 1, got {self.calibration_batch_size}")


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



# --------------------------------------------------------------------------- int8


def quantize_vision_int8(src: Path, dst: Path, calibration: np.ndarray, method: str = "minmax",
                         per_channel: bool = True, reduce_range: bool | None = None, batch_size: int = 8) -> Path:
    """Static QDQ int8 of the vision encoder (CNN + projector), calibrated on preprocessed pixels.

    Plain 3x3 conv stacks ran 1.8x faster than fp32 here; ``reduce_range`` (auto on non-VNNI
    CPUs) cut the drift from ~10 % to ~2 % (mean abs diff / std of the embeddings).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    QuantizeOptions(calibration_method=method, per_channel=per_channel, reduce_range=reduce_range,
                    calibration_batch_size=batch_size)  # validates the arguments
    src = source_graph(src)
    model = load_graph(src)
    pixels = check_calibration(calibration, input_shape(model, "pixel_values"))
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                        "percentile": CalibrationMethod.Percentile}[method]
    reduce = resolve_reduce_range(reduce_range)
    with tempfile.TemporaryDirectory(prefix="vledge-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:  # shape inference + folding so every tensor gets a type and a calibrated range
            with quiet():
                quant_pre_process(str(src), str(prepared))
        except Exception as exc:
            log.warning("quantization pre-processing of %s failed (%s); quantizing the graph as it is", src.name, exc)
            shutil.copyfile(src, prepared)
        pixels, batch_size = calibration_within_memory(prepared, pixels, batch_size, method)
        with atomic_output(Path(dst)) as out:
            try:
                with quiet():
                    quantize_static(
                        str(prepared), str(out), calibration_reader(pixels, batch_size),
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

    src = source_graph(src)
    source_model = load_graph(src)
    excluded = [node.name for node in _weight_matmuls(source_model) if _matches(node, keep_float)]
    reduce = resolve_reduce_range(reduce_range)
    with atomic_output(Path(dst)) as out:
        try:
            with quiet():
                quantize_dynamic(
                    str(src), str(out), op_types_to_quantize=["MatMul", "Gemm", "LSTM"], per_channel=per_channel,
                    nodes_to_exclude=excluded,
                    reduce_range=reduce, weight_type=QuantType.QInt8,
                    # contrib ops (MultiHeadAttention) stop ONNX shape inference; their outputs are float
                    extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
                )
        except Exception as exc:
            raise QuantizationError(f"{src}: dynamic int8 quantization failed: {exc}") from exc
        quantized = load_graph(out)
        integer_ops = {"MatMulInteger", "com.microsoft:DynamicQuantizeLSTM", "com.microsoft:DynamicQuantizeMatMul"}
        if not op_types(quantized) & integer_ops:
            raise QuantizationError(f"{src}: no MatMul, Gemm or LSTM weight was quantized")
        validate_graph(out)
    log.info("int8 decoder %s: per_channel=%s, reduce_range=%s", Path(dst).name, per_channel, reduce)
    return Path(dst)


def quantize_decoder_int8_weight_only(src: Path, dst: Path, block_size: int = 32, symmetric: bool = True,
                                      accuracy_level: int = 4) -> Path:
    """8-bit block-wise weight-only MatMulNBits for every weight MatMul of the decoder, the LM head included.

    Measured on SmolLM2-135M-Instruct (64 tokens of real text fed through the KV cache, against the fp32
    graph; ``benchmarks/weight_only_choice.py``): dynamic int8 (MatMulInteger) agreed on the next token at
    56 % of positions with a mean KL of 0.89 nats, 8-bit MatMulNBits block 32 symmetric at 94 % with 0.0097
    nats, and it decoded faster (25 vs 36 ms per step at past 64, one thread) in a smaller file (152 vs 220 MB).
    Block 16 drifted a little less (0.0068 nats) but ran slower (33 ms); asymmetric block 32 drifted more.
    """
    QuantizeOptions(int8_block_size=block_size, int8_symmetric=symmetric, accuracy_level=accuracy_level)
    src = source_graph(src)
    model = load_graph(src)
    candidates = _weight_matmuls(model)
    if not candidates:
        raise QuantizationError(f"{src}: no MatMul weight to quantize 8-bit weight-only")
    try:
        with quiet():
            result = _matmul_nbits(model, 8, block_size, symmetric, accuracy_level)
    except Exception as exc:
        raise QuantizationError(f"{src}: 8-bit weight-only quantization failed: {exc}") from exc
    with atomic_output(Path(dst)) as out:
        save_graph(result, out, Path(dst))
        validate_graph(out)
    log.info("int8 decoder %s: %d MatMuls 8-bit weight-only (block %d, %s, accuracy_level %d)", Path(dst).name,
             len(candidates), block_size, "symmetric" if symmetric else "asymmetric", accuracy_level)
    return Path(dst)


# --------------------------------------------------------------------------- 4-bit


def _matmul_nbits(model, bits: int, block_size: int, symmetric: bool, accuracy_level: int,
                  exclude: tuple[str, ...] = ()):
    """``model`` with its weight MatMuls (but the nodes named in ``exclude``) as ``bits``-bit MatMulNBits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, nodes_to_exclude=list(exclude),
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model


def _weight_matmuls(model) -> list:
    """MatMul nodes whose second input is a 2-D initializer (the ones MatMulNBits can replace)."""
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type == "MatMul" and len(shapes.get(node.input[1], [])) == 2]


def _matches(node, patterns: tuple[str, ...]) -> bool:
    names = [node.name, *node.input, *node.output]
    return any(pattern and pattern in name for pattern in patterns for name in names)


def quantize_decoder_q4(src: Path, dst: Path, block_size: int = 16, accuracy_level: int = 4,
                        keep_float: tuple[str, ...] = ("lm_head", "logits"), keep_bits: int | None = None,
                        scheme: str = "onnxruntime") -> Path:
    """4-bit block-wise weight-only MatMulNBits for the decoder, keeping the LM head out.

    ``keep_float`` patterns are substrings of a MatMul's node, input or output names (the head
    is ``/lm_head/MatMul`` producing ``logits``). Kept MatMuls stay float32, or become 8-bit
    MatMulNBits with ``keep_bits=8`` (same drift as float, a quarter of the head's bytes).
    ``accuracy_level=4`` (int8 compute) is about 4x faster than 0 on CPUs. Raises for graphs
    with no other MatMul weight (LSTM decoders: their LSTM weights cannot be 4-bit, so q4 would
    only copy the file; use int8 there).

    ``scheme="minmax"`` packs with ``vledge.export.nbits``: min/max blocks of 32 whose offset the whole-number zero
    point cannot hold is added back exactly (the kept head, with ``keep_bits=8``, as symmetric 8-bit ``max|w| / 127``
    blocks). On SmolLM2-135M-Instruct (``benchmarks/q4_choice.py``, 256 tokens of English through the KV cache,
    against the fp32 graph): top-1 94.9 %, mean KL 0.013 nats, perplexity 16.96 (fp32 16.90) in 104 MB at the speed
    of ONNX Runtime's symmetric block 32, where ONNX Runtime's packer gave 57-66 % top-1 and perplexity 21.8-28.5 at
    block 16 or 32, symmetric or not. ``block_size`` applies to the ``onnxruntime`` scheme and to weights ``minmax``
    cannot take (rows not a multiple of 32).
    """
    QuantizeOptions(block_size=block_size, accuracy_level=accuracy_level, keep_float=tuple(keep_float),
                    keep_bits=keep_bits, q4_scheme=scheme)  # validates the arguments
    src = source_graph(src)
    model = load_graph(src)
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
        with quiet():
            if scheme == "minmax":
                result = _minmax_q4(model, candidates, kept, keep_bits, block_size, accuracy_level)
            else:
                result = _matmul_nbits(model, 4, block_size, False, accuracy_level, exclude=tuple(kept))
                if keep_bits == 8 and kept:  # the kept MatMuls are the only float ones left
                    result = _matmul_nbits(result, 8, block_size, False, accuracy_level)
    except Exception as exc:
        raise QuantizationError(f"{src}: 4-bit quantization failed: {exc}") from exc
    with atomic_output(Path(dst)) as out:
        save_graph(result, out, Path(dst))
        validate_graph(out)
    log.info("q4 decoder %s: %d MatMuls 4-bit (%s, block %d, accuracy_level %d), kept %s as %s",
             Path(dst).name, len(candidates) - len(kept), scheme, 32 if scheme == "minmax" else block_size,
             accuracy_level, kept, "float32" if keep_bits is None else f"{keep_bits}-bit")
    return Path(dst)


def _minmax_q4(model, candidates: list, kept: list[str], keep_bits: int | None, block_size: int,
               accuracy_level: int):
    """The ``minmax`` q4: vledge's packing where the rows allow it, ONNX Runtime's for the rest."""
    from vledge.export.nbits import replace_matmuls

    rank = len(input_shape(model, "inputs_embeds")) if "inputs_embeds" in {v.name for v in model.graph.input} else 3
    body = {node.name for node in candidates} - set(kept)
    replace_matmuls(model, "minmax4", body, accuracy_level=accuracy_level, input_rank=rank)
    if keep_bits == 8 and kept:
        replace_matmuls(model, "symmetric8", set(kept), accuracy_level=accuracy_level)
    left = [node.name for node in _weight_matmuls(model) if node.name in body]
    if left:  # rows that are not whole blocks of 32
        others = [node.name for node in _weight_matmuls(model) if node.name not in left]
        model = _matmul_nbits(model, 4, block_size, False, accuracy_level, exclude=tuple(others))
    return model


# --------------------------------------------------------------------------- token table


def quantize_embed(src: Path, dst: Path, bits: int, block_size: int = 32) -> Path:
    """The token table as ``GatherBlockQuantized`` with ``bits`` (8 or 4) bits, symmetric blocks along the hidden axis.

    Measured on SmolLM2-135M-Instruct (the fp32 decoder fed the dequantized table, 256 tokens of English through the
    KV cache, against the float table): 8-bit reproduces its table exactly (it ships as llama.cpp ``Q8_0``), top-1
    100 %, 113 -> 32 MB; 4-bit (18 MB) kept 91.4 % top-1 with a mean KL of 0.031 nats and perplexity +1.9 %, more
    than the whole q4 decoder drifts (0.013 nats), so the exporter's ``int8`` table is 8-bit and there is no q4 one.
    """
    from vledge.export.nbits import replace_gather

    src = source_graph(src)
    model = load_graph(src)
    try:
        replaced = replace_gather(model, bits, block_size)
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(f"{src}: {bits}-bit token table failed: {exc}") from exc
    if not replaced:
        raise QuantizationError(f"{src}: no Gather of a float token table whose width is a multiple of {block_size}")
    with atomic_output(Path(dst)) as out:
        save_graph(model, out, Path(dst))
        validate_graph(out)
    log.info("%d-bit token table %s (GatherBlockQuantized, block %d)", bits, Path(dst).name, block_size)
    return Path(dst)


# --------------------------------------------------------------------------- dispatcher


def quantize_component(component: str, precision: str, src: Path, dst: Path,
                       calibration: np.ndarray | None = None, options: QuantizeOptions | None = None,
                       language_kind: str | None = None) -> Path:
    """Write the ``precision`` variant of one exported graph; ``AVAILABLE`` lists what exists.

    ``language_kind`` (a language model family's name) lets a caller that knows the model refuse a variant its
    family rules out (q4 of an LSTM) before reading the graph; without it the graph itself tells.
    """
    options = options if options is not None else QuantizeOptions()
    if not isinstance(options, QuantizeOptions):
        raise QuantizationError(f"options must be QuantizeOptions, got {type(options).__name__}")
    if component not in AVAILABLE:
        raise QuantizationError(f"unknown component {component!r}; choose from {COMPONENTS}")
    if precision not in AVAILABLE[component]:
        why = {
            ("embed_tokens", "q4"): "a 4-bit token table drifted more than a whole q4 decoder; use int8 (8-bit)",
            ("vision_encoder", "q4"): "4-bit weight-only quantization covers MatMul, not convolutions; use int8",
        }.get((component, precision), "")
        raise QuantizationError(
            f"no {precision} variant of {component}; it has {AVAILABLE[component]}" + (f" ({why})" if why else "")
        )
    q4_scheme = options.q4_scheme
    if (component, precision) == ("decoder_model_merged", "q4") and language_kind is not None:
        refusal = language_family(language_kind).q4_refusal
        if refusal:
            raise QuantizationError(refusal)
        q4_scheme = q4_scheme or language_family(language_kind).q4_scheme
    src = source_graph(src)
    if calibration is not None and (component, precision) != ("vision_encoder", "int8"):
        log.warning("calibration data is only used for the int8 vision encoder; ignored for %s %s",
                    component, precision)
    if precision == "fp32":
        with atomic_output(Path(dst)) as out:
            copy_graph(src, out, Path(dst))
            validate_graph(out)
        return Path(dst)
    if precision == "fp16":
        return convert_fp16(src, dst)
    if component == "embed_tokens":
        return quantize_embed(src, dst, 8)
    if precision == "int8" and component == "vision_encoder":
        if calibration is None:
            raise QuantizationError("the int8 vision encoder needs calibration images ([N, 3, H, W] pixels)")
        return quantize_vision_int8(src, dst, calibration, method=options.calibration_method,
                                    per_channel=True if options.per_channel is None else options.per_channel,
                                    reduce_range=options.reduce_range, batch_size=options.calibration_batch_size)
    if precision == "int8" and options.int8_weights == "matmulnbits":
        return quantize_decoder_int8_weight_only(src, dst, block_size=options.int8_block_size,
                                                 symmetric=options.int8_symmetric,
                                                 accuracy_level=options.accuracy_level)
    if precision == "int8":
        return quantize_decoder_int8(src, dst, reduce_range=options.reduce_range,
                                     per_channel=bool(options.per_channel), keep_float=options.keep_float)
    return quantize_decoder_q4(src, dst, block_size=options.block_size, accuracy_level=options.accuracy_level,
                               keep_float=options.keep_float, keep_bits=options.keep_bits,
                               scheme=q4_scheme or "onnxruntime")
