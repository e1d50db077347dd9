"""The graphs' inputs and outputs against what the manifest promises, checked before anything runs.

Names follow DESIGN's table; ranks are checked always, and widths (hidden, vocabulary, heads,
head_dim, layers, image size) wherever the graph states them as numbers rather than symbols.
A swapped-in or foreign graph, or a manifest edited to say other numbers, stops here with a
ModelDirError instead of failing with a shape error in the middle of a caption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vledge.errors import ModelDirError
from vledge.manifest import Manifest

Shape = tuple[Any, ...]  # an int where the width is fixed, None where any size is fine
INTEGER_INPUTS = ("input_ids", "attention_mask", "position_ids")
# The vision encoder's output: ``image_features`` (transformers.js's name); earlier directories say ``image_embeds``.
IMAGE_OUTPUTS = ("image_features", "image_embeds")


def image_output(manifest: Manifest) -> str:
    """The vision encoder's output name the manifest lists (``image_features`` when it lists neither)."""
    listed = manifest.tensors.get("vision_encoder", {}).get("outputs", [])
    return next((name for name in listed if name in IMAGE_OUTPUTS), IMAGE_OUTPUTS[0])
FLOAT_TYPES = ("tensor(float)", "tensor(float16)")  # every other input and output


def expected_io(manifest: Manifest) -> dict[str, tuple[dict[str, Shape], dict[str, Shape]]]:
    """component -> (inputs, outputs), each name -> shape, from the model config alone."""
    language = manifest.model_config.language
    hidden, vocab, size = language.hidden, language.vocab_size, manifest.preprocess.image_size
    io: dict[str, tuple[dict[str, Shape], dict[str, Shape]]] = {
        "vision_encoder": ({"pixel_values": (None, 3, size, size)},
                           {image_output(manifest): (None, manifest.num_image_tokens, hidden)}),
        "embed_tokens": ({"input_ids": (None, None)}, {"inputs_embeds": (None, None, hidden)}),
    }
    inputs: dict[str, Shape] = {"inputs_embeds": (None, None, hidden)}
    outputs: dict[str, Shape] = {"logits": (None, None, vocab)}
    if language.has_kv_cache:
        inputs.update(attention_mask=(None, None), position_ids=(None, None))
        cache = (None, language.key_value_heads, None, language.head_dim)
        for layer in range(language.layers):
            for part in ("key", "value"):
                inputs[f"past_key_values.{layer}.{part}"] = cache
                outputs[f"present.{layer}.{part}"] = cache
    else:
        state = (language.layers, None, hidden)
        inputs.update(past_hidden=state, past_cell=state)
        outputs.update(present_hidden=state, present_cell=state)
    io["decoder_model_merged"] = (inputs, outputs)
    return io


def check_graph_io(sessions: dict[str, Any], manifest: Manifest, root: Path) -> None:
    """ModelDirError naming the graph and tensor whose name, rank or width is not what the manifest says."""
    for component, (inputs, outputs) in expected_io(manifest).items():
        session = sessions[component]
        listed = manifest.tensors.get(component, {})
        for side, expected, nodes in (("inputs", inputs, session.get_inputs()),
                                      ("outputs", outputs, session.get_outputs())):
            names = [node.name for node in nodes]
            if sorted(listed.get(side, names)) != sorted(names):
                raise ModelDirError(f"{component} in {root} has {side} {names}, the manifest says {listed[side]}")
            if sorted(names) != sorted(expected):
                missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
                raise ModelDirError(
                    f"{component} in {root} does not fit the manifest's model ({manifest.language_kind}, "
                    f"{manifest.model_config.language.layers} layers): {side} missing {missing}, unexpected {extra}"
                )
            for node in nodes:
                _check_shape(component, root, node, _tile_batches(manifest, node, expected[node.name]))


def _tile_batches(manifest: Manifest, node: Any, expected: Shape) -> Shape:
    """A tiled model's ``pixel_values`` is [batch, tiles, 3, S, S] (transformers.js's layout); directories written
    before take the tiles alone, [tiles, 3, S, S], and load as they are (``Graphs.encode_images`` feeds either)."""
    if node.name != "pixel_values" or manifest.preprocess.tiles is None or len(node.shape or []) != 5:
        return expected
    return (None, *expected)


def _check_shape(component: str, root: Path, node: Any, expected: Shape) -> None:
    shape = list(node.shape or [])
    if len(shape) != len(expected):
        raise ModelDirError(f"{component} in {root}: {node.name} has rank {len(shape)} ({shape}), "
                            f"the manifest's model needs rank {len(expected)}")
    for axis, (have, want) in enumerate(zip(shape, expected)):
        if want is not None and isinstance(have, int) and have != want:
            raise ModelDirError(f"{component} in {root}: {node.name} is {have} wide on axis {axis} ({shape}), "
                                f"the manifest's model needs {want} ({_meaning(node.name, axis, len(shape))})")
    if node.name in INTEGER_INPUTS and node.type != "tensor(int64)":
        raise ModelDirError(f"{component} in {root}: {node.name} is {node.type}, expected tensor(int64)")
    if node.name not in INTEGER_INPUTS and node.type not in FLOAT_TYPES:
        raise ModelDirError(f"{component} in {root}: {node.name} is {node.type}, expected tensor(float) or "
                            "tensor(float16)")


def _meaning(name: str, axis: int, rank: int) -> str:
    if name == "logits":
        return "vocabulary size"
    if name.startswith(("past_key_values", "present.")) and axis in (1, 3):
        return "heads" if axis == 1 else "head_dim"
    if name.endswith(("_hidden", "_cell")) and axis == 0:
        return "layers"
    if name == "pixel_values":
        return "channels" if axis == rank - 3 else "image size"
    if name in IMAGE_OUTPUTS and axis == 1:
        return "image tokens"
    return "hidden size"
