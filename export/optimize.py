"""Offline graph optimisation that every execution provider can run (ONNX Runtime's basic/extended levels).

``basic`` is saved by default: semantics-preserving rewrites of standard ops that run before
partitioning, so the file is the same for every execution provider. ``extended`` is allowed with
the CPU-only fusions switched off and a check that nothing CPU-only was added
(``PORTABLE_CONTRIB_OPS``); ``all`` adds NCHWc layout transforms tied to the CPU's instruction set
and is never saved. The runtime applies the remaining levels online anyway, so offline levels
alone buy start-up time, not speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vledge.errors import QuantizationError
from vledge.families import language_family
from vledge.export.fusion import fuse_attention
from vledge.export.layer_fusion import fuse_layers
from vledge.export.llama_fusion import fuse_llama
from vledge.export.onnx_files import atomic_output, load_graph, op_types, source_graph, validate_graph

log = logging.getLogger(__name__)

COMPONENTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
OPTIMIZATION_LEVELS = ("basic", "extended")

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
    src = source_graph(src)
    before = load_graph(src)
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
    with atomic_output(Path(dst)) as out:
        options.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        except Exception as exc:
            raise QuantizationError(f"{src}: ONNX Runtime cannot optimise the graph: {exc}") from exc
        after = load_graph(out)
        added = non_portable_ops(op_types(after) - op_types(before))
        if added:
            raise QuantizationError(
                f"{src}: the {level} level added ops only the CPU provider runs ({sorted(added)}); use level='basic'"
            )
        validate_graph(out)
    log.info("optimised %s (%s): %d -> %d nodes", src.name, level, len(before.graph.node), len(after.graph.node))
    return Path(dst)



# The decoder fusion passes a family may name (LanguageFamily.decoder_fusions), in the order they run.
DECODER_FUSIONS = {"attention": fuse_attention, "layers": fuse_layers, "llama": fuse_llama}


def optimize_component(component: str, src: Path, dst: Path, level: str = "basic", fuse: bool = True,
                       language_kind: str = "transformer") -> Path:
    """The recommended offline optimisation of one graph: ``level`` for all; for a decoder also the fusion passes
    its language model family names (the built-in transformer's: attention fusion, residual + LayerNorm fusion and
    the mask inside attention, ``vledge.export.layer_fusion``). A family that names none keeps ONNX Runtime's
    session-time optimisations only."""
    if component not in COMPONENTS:
        raise QuantizationError(f"unknown component {component!r}; choose from {COMPONENTS}")
    optimize_graph(src, dst, level)
    if fuse and component == "decoder_model_merged":
        for name in language_family(language_kind).decoder_fusions:
            if name not in DECODER_FUSIONS:
                raise QuantizationError(f"the {language_kind} family names an unknown fusion pass {name!r}; "
                                        f"known: {', '.join(DECODER_FUSIONS)}")
            DECODER_FUSIONS[name](dst, dst)
    return Path(dst)

