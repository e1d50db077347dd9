"""A tiled model's vision graph in transformers.js's layout: ``pixel_values`` [batch, tiles, 3, S, S].

Idefics3 / SmolVLM image processors (transformers' and transformers.js's) hand the model a batch of prompts, each
with its tiles: ``pixel_values`` [batch, tiles, 3, S, S]. transformers.js feeds that tensor to the vision graph as
it is and places the ``image_features`` it returns, flattened to rows of ``hidden``, on the image tokens in order.
So a tiled model's shipped vision graph starts with one Reshape to [batch * tiles, 3, S, S], and its output
``image_features`` is [batch * tiles, tokens per tile, hidden] (axis ``total_tiles``).

The graph is traced, optimised and quantized with the tiles alone ([tiles, 3, S, S]): the static int8
calibration feeds tiles, and every pass sees the same graph a LLaVA model's encoder has. The Reshape is put in
front of each variant as it is made (``vledge.export.export``), before the parity gate measures it, so the gate
measures the files that ship. vledge's runtime feeds either rank (``Graphs.encode_images``), so directories
written before (tiles alone) load too.
"""

from __future__ import annotations

from pathlib import Path

from vledge.errors import QuantizationError
from vledge.export.onnx_files import atomic_output, load_graph, save_graph, validate_graph

INPUT = "pixel_values"
INNER = "pixel_values_tiles"  # the flattened tiles, what the traced graph took as its input
BATCH, TILES, TOTAL = "batch_size", "tiles", "total_tiles"


def batch_tiles(src: Path, dst: Path) -> Path:
    """Write ``src`` (a vision graph taking [tiles, 3, S, S]) to ``dst`` taking [batch, tiles, 3, S, S]."""
    from onnx import TensorProto, helper

    model = load_graph(src)
    graph = model.graph
    found = [value for value in graph.input if value.name == INPUT]
    if not found:
        raise QuantizationError(f"{src}: the vision graph has no input named {INPUT!r}")
    old = found[0]
    dims = old.type.tensor_type.shape.dim
    if len(dims) != 4 or not all(dim.HasField("dim_value") for dim in dims[1:]):
        raise QuantizationError(f"{src}: {INPUT} must be [tiles, 3, S, S] with fixed channels and size to take "
                                f"batches of tiles, got rank {len(dims)}")
    channels, height, width = (dim.dim_value for dim in dims[1:])
    for node in graph.node:
        node.input[:] = [INNER if name == INPUT else name for name in node.input]
    new = helper.make_tensor_value_info(INPUT, old.type.tensor_type.elem_type,
                                        [BATCH, TILES, channels, height, width])
    graph.input.remove(old)
    graph.input.insert(0, new)
    shape = helper.make_tensor(f"{INNER}_shape", TensorProto.INT64, [4], [-1, channels, height, width])
    graph.initializer.append(shape)
    graph.node.insert(0, helper.make_node("Reshape", [INPUT, shape.name], [INNER], name="flatten_tile_batches"))
    for output in graph.output:
        output_dims = output.type.tensor_type.shape.dim
        if output_dims:
            output_dims[0].Clear()
            output_dims[0].dim_param = TOTAL
    with atomic_output(Path(dst)) as out:
        save_graph(model, out, Path(dst))
        validate_graph(out)
    return Path(dst)

