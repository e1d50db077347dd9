"""The three ONNX graphs of a model directory, traced from the PyTorch model.

A tiled model's (Idefics3 / SmolVLM) vision graph is traced mapping tiles ``pixel_values`` [tiles, 3, S, S] to
``image_features`` [tiles, tokens per tile, hidden] (first axis ``tiles``); each variant that ships takes
[batch, tiles, 3, S, S] instead (``vledge.export.tile_batches``).

We use the TorchScript-based exporter (``dynamo=False``) on purpose: the
torch.export-based one specialises size-0 and size-1 dimensions, so a graph traced
with a past would not accept the empty past of a prefill. Tracing with a non-empty
past and batch > 1 and declaring every axis dynamic gives one merged decoder that
serves prefill (past length 0) and every decode step, without an ``If`` node.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from vledge.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MAX_OPSET = 20  # the newest the TorchScript exporter (torch.onnx.export(dynamo=False)) writes
# ONNX stores a model above 2 GB in external data files; stay well clear of the protobuf limit.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# The batch axis's name: transformers.js sizes the empty cache of a prefill by the symbols it knows
# (``batch_size``) and gives every other symbolic axis length 0 (the past).
BATCH = "batch_size"
TILES = "tiles"


def tensor_names(model: VisionLanguageModel) -> dict[str, dict[str, list[str]]]:
    """Input and output names of every graph, as the manifest lists them."""
    names = {
        "vision_encoder": {"inputs": ["pixel_values"], "outputs": ["image_features"]},
        "embed_tokens": {"inputs": ["input_ids"], "outputs": ["inputs_embeds"]},
    }
    if model.is_transformer:
        layers = range(model.config.language.layers)
        past = [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]
        present = [f"present.{i}.{kind}" for i in layers for kind in ("key", "value")]
        names["decoder_model_merged"] = {
            "inputs": ["inputs_embeds", "attention_mask", "position_ids", *past],
            "outputs": ["logits", *present],
        }
    else:
        names["decoder_model_merged"] = {
            "inputs": ["inputs_embeds", "past_hidden", "past_cell"],
            "outputs": ["logits", "present_hidden", "present_cell"],
        }
    return names


class VisionEncoderGraph(nn.Module):
    def __init__(self, model: VisionLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class EmbedTokensGraph(nn.Module):
    def __init__(self, model: VisionLanguageModel) -> None:
        super().__init__()
        self.embed = model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class TransformerDecoderGraph(nn.Module):
    """Flat past/present tensors in and out; logits for the last position only (prefill needs no more).

    Serves every LM with a KV cache (the built-in transformer, the Llama family): each one's
    forward takes ``last_only``.
    """

    def __init__(self, model: VisionLanguageModel) -> None:
        super().__init__()
        self.lm = model.language

    def forward(self, inputs_embeds, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * index], past_flat[2 * index + 1]) for index in range(len(past_flat) // 2)]
        logits, presents = self.lm(inputs_embeds, attention_mask, position_ids, past, last_only=True)
        return (logits, *[tensor for pair in presents for tensor in pair])


class LSTMDecoderGraph(nn.Module):
    def __init__(self, model: VisionLanguageModel) -> None:
        super().__init__()
        self.lm = model.language

    def forward(self, inputs_embeds, past_hidden, past_cell):
        output, (hidden, cell) = self.lm.lstm(inputs_embeds, (past_hidden, past_cell))
        return self.lm.lm_head(output[:, -1:]), hidden, cell


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic_axes: dict[str, dict[int, str]], opset: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()  # a fresh wrapper starts in training mode: BatchNorm would update its statistics
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; we choose it deliberately (module docstring).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic_axes,
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    return path


def export_graphs(model: VisionLanguageModel, out_dir: Path, opset: int = DEFAULT_OPSET) -> dict[str, Path]:
    """Write the fp32 graphs to ``out_dir`` (``vision_encoder.onnx``, ``embed_tokens.onnx``, ``decoder_model_merged.onnx``)."""
    # Trace a copy: tracing runs the model, and the caller's model must stay the reference it was.
    model = copy.deepcopy(model).eval().float().cpu()
    names = tensor_names(model)
    size = model.config.preprocess.image_size
    hidden = model.config.language.hidden
    # A tiled model's vision graph takes every tile of every image at once (its first axis counts tiles).
    images = TILES if model.fills_image_tokens else BATCH
    paths: dict[str, Path] = {}
    with torch.no_grad():
        paths["vision_encoder"] = _export(
            VisionEncoderGraph(model), (torch.randn(2, 3, size, size),), out_dir / "vision_encoder.onnx",
            **names["vision_encoder"], dynamic_axes={"pixel_values": {0: images}, "image_features": {0: images}},
            opset=opset,
        )
        paths["embed_tokens"] = _export(
            EmbedTokensGraph(model), (torch.ones(2, 3, dtype=torch.long),), out_dir / "embed_tokens.onnx",
            **names["embed_tokens"],
            dynamic_axes={"input_ids": {0: BATCH, 1: "sequence"}, "inputs_embeds": {0: BATCH, 1: "sequence"}},
            opset=opset,
        )
        batch, seq, past = 2, 3, 4
        embeds = torch.randn(batch, seq, hidden)
        decoder_names = names["decoder_model_merged"]
        if model.is_transformer:
            lang = model.config.language
            past_tensors = [torch.randn(batch, lang.key_value_heads, past, lang.head_dim)
                            for _ in range(2 * lang.layers)]
            mask = torch.ones(batch, past + seq, dtype=torch.long)
            positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
            axes = {"inputs_embeds": {0: BATCH, 1: "sequence"},
                    "attention_mask": {0: BATCH, 1: "total_sequence"},
                    "position_ids": {0: BATCH, 1: "sequence"},
                    "logits": {0: BATCH}}
            for name in decoder_names["inputs"][3:]:
                axes[name] = {0: BATCH, 2: "past_sequence"}
            for name in decoder_names["outputs"][1:]:
                axes[name] = {0: BATCH, 2: "total_sequence"}
            args = (embeds, mask, positions, *past_tensors)
            module: nn.Module = TransformerDecoderGraph(model)
        else:
            lang = model.config.language
            state = torch.randn(lang.layers, batch, hidden)
            args = (embeds, state, state.clone())
            axes = {"inputs_embeds": {0: BATCH, 1: "sequence"}, "past_hidden": {1: BATCH},
                    "past_cell": {1: BATCH}, "logits": {0: BATCH}, "present_hidden": {1: BATCH},
                    "present_cell": {1: BATCH}}
            module = LSTMDecoderGraph(model)
        paths["decoder_model_merged"] = _export(
            module, args, out_dir / "decoder_model_merged.onnx", **decoder_names, dynamic_axes=axes, opset=opset
        )
        fix_logits_shape(paths["decoder_model_merged"])
        if model.is_transformer and model.config.language.family.attention_op == "GroupQueryAttention":
            from vledge.export.gqa import export_gqa_decoder, grouped_query_attention

            def export_grouped(path: Path) -> None:
                with grouped_query_attention(module):
                    _export(module, args, path, **decoder_names, dynamic_axes=axes, opset=opset)
                fix_logits_shape(path)

            export_gqa_decoder(export_grouped, paths["decoder_model_merged"])
    return paths


def fix_logits_shape(path: Path) -> None:
    """The decoder returns logits for one position; say so in the graph instead of a traced dim name."""
    import onnx

    graph_model = onnx.load(str(path), load_external_data=False)
    for output in graph_model.graph.output:
        if output.name == "logits":
            dim = output.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_value = 1
    onnx.save(graph_model, str(path))


def check_graph(path: Path) -> None:
    """onnx's full check (with strict shape inference), so a malformed graph never ships."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)
