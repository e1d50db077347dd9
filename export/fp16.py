"""fp16 variants: float16 weights and compute with float32 inputs and outputs (meant for CUDA; on a CPU ONNX Runtime
inserts casts around ops without fp16 kernels, which is slower than fp32)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vledge.errors import QuantizationError
from vledge.export.onnx_files import atomic_output, load_graph, quiet, save_graph, source_graph, validate_graph

__all__ = ["FP16_SAFE_LIMIT", "convert_fp16"]

log = logging.getLogger(__name__)

# fp16's largest finite value is 65504; an additive attention mask filled with
# finfo(float32).min would be clipped to -65504, and score + mask then overflows to -inf,
# which turns fully masked (padded) query rows into NaN that spreads through the KV cache.
FP16_SAFE_LIMIT = 32752.0
_FP16_MAX = 65504.0


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
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    src = source_graph(src)
    model = load_graph(src)
    clamped = _clamp_for_fp16(model)
    if clamped:
        log.info("%s: %d float constants beyond the fp16 range clamped to ±%g", src.name, clamped, FP16_SAFE_LIMIT)
    try:
        with quiet():
            converted = convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=op_block_list)
            wrapped = OnnxModel(converted)
            wrapped.topological_sort()  # keep_io_types appends its Cast nodes at the end
    except Exception as exc:
        raise QuantizationError(f"{src}: fp16 conversion failed: {exc}") from exc
    with atomic_output(Path(dst)) as out:
        save_graph(wrapped.model, out, Path(dst))
        validate_graph(out)
    log.info("fp16 %s written (keep_io_types=%s)", Path(dst).name, keep_io_types)
    return Path(dst)
