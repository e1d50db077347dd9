"""vledge's export of a tiled SmolVLM folder (split on) loaded by transformers.js in Node, against transformers
and vledge.runtime.

transformers.js cuts images into tiles itself, resizing with its own resamplers (no Pillow Lanczos): on a 64 x 64
photo (the folder's longest_edge, 2 x 2 tiles of 32) its four tiles are crops of the photo, equal to transformers'
pixels, while its global view (the photo shrunk to 32 x 32 by a bilinear ONNX Resize) differs from Pillow's
Lanczos. So exactness is asserted from the same pixels: transformers.js's tiles fed to transformers' ``generate``
and to vledge.runtime give transformers.js's tokens. Each library's own pipeline on that photo and on a 512 x 512
one is reported (token agreement). Needs ``node`` and ``tests/js/node_modules``; skipped with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from hf_idefics3_folders import load_model, load_processor, make_idefics3_folder, messages_for  # noqa: E402
from PIL import Image  # noqa: E402
from test_transformers_js import JS, JSON_FILES, agreement, node_or_skip  # noqa: E402

from vledge.decoding import GenerationOptions  # noqa: E402

pytestmark = pytest.mark.slow

SCRIPT = JS / "idefics3_generate.mjs"
QUESTION = "What is in this image?"
NEW_TOKENS = 16
FP32 = {"vision_encoder": "fp32", "embed_tokens": "fp32", "decoder_model_merged": "fp32"}


def until_eos(tokens, eos_id: int) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def run_node(model_dir: Path, images: Path | list[Path], dtype: dict[str, str] | None,
             pixels: Path | None = None) -> dict:
    """transformers.js's greedy answer (ids after the prompt), its prompt ids, tiles grid and, if asked, pixels."""
    images = images if isinstance(images, list) else [images]
    messages = messages_for(len(images), QUESTION)
    command = [node_or_skip(), str(SCRIPT), str(model_dir), json.dumps([str(p) for p in images]),
               json.dumps({"messages": messages}),
               str(NEW_TOKENS), json.dumps(dtype) if dtype else "", str(pixels or "")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=JS)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if pixels is not None:
        result["pixel_values"] = np.fromfile(pixels, dtype="<f4").reshape(result["pixel_dims"])
    return result


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A real photograph at full size (512 x 512), at the folder's longest edge (64 x 64: 2 x 2 tiles), and
    another one 64 x 32 (1 x 2 tiles)."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    image = Image.fromarray(data.astronaut())
    image.save(folder / "astronaut.png")
    image.resize((64, 64), Image.BICUBIC).save(folder / "astronaut-64.png")
    Image.fromarray(data.coffee()).resize((64, 32), Image.BICUBIC).save(folder / "coffee-64x32.png")
    return folder / "astronaut.png", folder / "astronaut-64.png", folder / "coffee-64x32.png"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model dir, SmolVLM folder): ``vledge export HF_DIR`` with every variant."""
    from click.testing import CliRunner

    from vledge.cli import main

    root = tmp_path_factory.mktemp("smolvlm-js")
    folder = make_idefics3_folder(root / "hf", kind="smolvlm", split=True)
    out = root / "model"
    result = CliRunner().invoke(main, ["export", str(folder), "-o", str(out), "--quantize", "auto",
                                       "--parity-samples", "8"])
    assert result.exit_code == 0, result.output
    return out, folder


def hf_generate(folder: Path, input_ids: list[int], pixel_values: np.ndarray) -> list[int]:
    """transformers' greedy tokens for these prompt ids and pixels [tiles, 3, S, S] (one prompt, all tiles real)."""
    model = load_model(folder)
    pixels = torch.as_tensor(pixel_values, dtype=torch.float32)[None]
    feed = {"input_ids": torch.tensor([input_ids]), "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long),
            "pixel_values": pixels,
            "pixel_attention_mask": torch.ones(pixels.shape[:2] + pixels.shape[-2:], dtype=torch.bool)}
    with torch.no_grad():
        out = model.generate(**feed, do_sample=False, max_new_tokens=NEW_TOKENS)
    return out[0, len(input_ids):].tolist()


def hf_pipeline(folder: Path, photos: Path | list[Path]) -> dict:
    """transformers' processor (Pillow) and generate on photo files (one prompt): prompt ids, pixels, tokens."""
    photos = photos if isinstance(photos, list) else [photos]
    processor = load_processor(folder)
    text = processor.apply_chat_template(messages_for(len(photos), QUESTION), add_generation_prompt=True,
                                         tokenize=False)
    images = []
    for photo in photos:
        with Image.open(photo) as image:
            images.append(image.convert("RGB"))
    inputs = processor(text=text, images=[images], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    pixels = inputs["pixel_values"][0].numpy()
    return {"prompt_ids": ids, "pixel_values": pixels, "ids": hf_generate(folder, ids, pixels)}


def test_export_writes_the_idefics3_files_transformers_js_reads(exported):
    import onnx

    out, folder = exported
    manifest = json.loads((out / "vledge.json").read_text())
    for name in JSON_FILES:
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == manifest["files"][name]["sha256"]
    config = json.loads((out / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == source["model_type"] == "smolvlm"
    assert config["architectures"] == ["SmolVLMForConditionalGeneration"]
    assert config["image_token_id"] == source["image_token_id"] == manifest["special_tokens"]["image"]
    assert config["scale_factor"] == source["scale_factor"]
    assert config["text_config"]["num_key_value_heads"] == source["text_config"]["num_key_value_heads"]
    assert config["vision_config"]["model_type"] == source["vision_config"]["model_type"]
    assert config["transformers.js_config"]["dtype"] == manifest["selected"]["cpu"]
    tiles = manifest["preprocess"]["tiles"]
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor == {"processor_class": "SmolVLMProcessor", "image_seq_len": tiles["tokens_per_tile"]}
    image = json.loads((out / "preprocessor_config.json").read_text())
    original = json.loads((folder / "preprocessor_config.json").read_text())
    for key in ("image_processor_type", "size", "max_image_size", "do_image_splitting", "resample", "image_mean",
                "image_std", "rescale_factor"):
        assert image[key] == original[key], key
    size = manifest["architecture"]["image_size"]
    for path in manifest["variants"]["vision_encoder"].values():
        graph = onnx.load(str(out / path), load_external_data=False).graph
        dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch_size", "tiles", 3, size, size], path
        assert [o.name for o in graph.output] == ["image_features"]


@pytest.mark.parametrize("count", (1, 2))
def test_transformers_js_fp32_equals_transformers_and_vledge_runtime_on_the_same_pixels(exported, photos, count,
                                                                                          tmp_path, capsys):
    """64 x 64 (and 64 x 32) photos: the same prompt ids and grid tiles in transformers.js and transformers; from
    transformers.js's pixels all three give the same tokens."""
    from vledge.runtime import load
    from vledge.runtime.idefics3_images import Idefics3Images

    out, folder = exported
    chosen = list(photos[1:1 + count])
    got = run_node(out, chosen, FP32, tmp_path / "pixels.bin")
    reference = hf_pipeline(folder, chosen)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert got["prompt_ids"] == reference["prompt_ids"]  # chat template + tile expansion + tokenizer
    grids = [(2, 2), (1, 2)][:count]
    assert got["rows"] == [[r for r, _ in grids]] and got["cols"] == [[c for _, c in grids]]
    js_pixels = got["pixel_values"][0]
    assert js_pixels.shape == reference["pixel_values"].shape
    images, start, crops, global_view = [], 0, 0.0, 0.0
    for rows, cols in grids:
        tiles = rows * cols + 1
        images.append(Idefics3Images(js_pixels[start:start + tiles], rows, cols))
        diff = np.abs(js_pixels[start:start + tiles] - reference["pixel_values"][start:start + tiles])
        crops, global_view = max(crops, float(diff[:-1].max())), max(global_view, float(diff[-1].max()))
        start += tiles
    assert crops < 1e-6  # the grid tiles are crops of the photo in both
    expected = until_eos(hf_generate(folder, got["prompt_ids"], js_pixels), eos)
    runtime = load(out, precision="fp32", providers="cpu", threads=1)
    ids, _, _ = runtime.tiled_inputs([images], [QUESTION])
    assert ids[0] == got["prompt_ids"]  # vledge's prompt for the same images
    ours = runtime.generate_from_tiles([images], [QUESTION], GenerationOptions(max_new_tokens=NEW_TOKENS))[0]
    assert until_eos(got["ids"], eos) == expected == ours.token_ids
    assert len(expected) >= 4 and len(set(expected)) > 1
    with capsys.disabled():
        print(f"\ntransformers.js pixels vs transformers' ({count} image(s)): grid tiles max |diff| {crops:.2e}, "
              f"global view max |diff| {global_view:.3f}")


def test_transformers_js_agreement_is_reported(exported, photos, record_property, capsys):
    """Each library's own pipeline (its own resizing) and each variant through transformers.js."""
    from vledge.runtime import load

    out, folder = exported
    manifest = json.loads((out / "vledge.json").read_text())
    eos = manifest["special_tokens"]["eos"]
    report = {}
    for photo in photos[:2]:
        reference = until_eos(hf_pipeline(folder, photo)["ids"], eos)
        got = until_eos(run_node(out, photo, FP32)["ids"], eos)
        runtime = load(out, precision="fp32", providers="cpu", threads=1)
        ours = runtime.ask(str(photo), QUESTION, GenerationOptions(max_new_tokens=NEW_TOKENS)).token_ids
        assert got, "transformers.js produced no token"
        with Image.open(photo) as image:
            label = f"fp32, {image.width} x {image.height} photo (each library's own resizing)"
        report[label] = {"agreement_with_transformers": agreement(got, reference),
                         "vledge_runtime_agreement_with_transformers": agreement(ours, reference)}
    photo = photos[1]
    reference = until_eos(hf_pipeline(folder, photo)["ids"], eos)
    for precision in ("fp16", "int8", "q4"):
        dtype = {c: precision if precision in v else "fp32" for c, v in manifest["variants"].items()}
        got = until_eos(run_node(out, photo, dtype)["ids"], eos)
        runtime = load(out, precision=dtype, providers="cpu", threads=1)
        ours = runtime.ask(str(photo), QUESTION, GenerationOptions(max_new_tokens=NEW_TOKENS)).token_ids
        report[f"{precision}, 64 x 64 photo"] = {"dtype": dtype, "agreement_with_transformers_fp32":
                                                 agreement(got, reference),
                                                 "agreement_with_vledge_runtime": agreement(got, ours)}
        assert got, f"{precision}: transformers.js produced no token"
    got = until_eos(run_node(out, photo, None)["ids"], eos)  # config.json's dtype: the gate's selection
    report["config.json dtype " + json.dumps(manifest["selected"]["cpu"])] = {
        "agreement_with_transformers_fp32": agreement(got, reference)}
    record_property("transformers_js_idefics3_agreement", json.dumps(report))
    with capsys.disabled():
        print(f"\ntransformers.js agreement, SmolVLM (split): {json.dumps(report)}")


def _tiles_alone(model_dir: Path, old: Path) -> None:
    """What an export before the batch axis wrote: every vision variant takes [tiles, 3, S, S]."""
    import onnx
    from onnx import helper

    shutil.copytree(model_dir, old)
    manifest = json.loads((old / "vledge.json").read_text())
    for path in manifest["variants"]["vision_encoder"].values():
        graph_model = onnx.load(str(old / path))
        graph = graph_model.graph
        reshape = graph.node[0]
        assert reshape.op_type == "Reshape" and reshape.input[0] == "pixel_values"
        inner = reshape.output[0]
        graph.node.remove(reshape)
        for node in graph.node:
            node.input[:] = ["pixel_values" if name == inner else name for name in node.input]
        dims = graph.input[0].type.tensor_type.shape.dim
        new = helper.make_tensor_value_info("pixel_values", graph.input[0].type.tensor_type.elem_type,
                                            ["tiles", *[d.dim_value for d in dims[2:]]])
        graph.input.remove(graph.input[0])
        graph.input.insert(0, new)
        onnx.save(graph_model, str(old / path))
        manifest["files"][path] = {"sha256": hashlib.sha256((old / path).read_bytes()).hexdigest(),
                                   "size": (old / path).stat().st_size}
    (old / "vledge.json").write_text(json.dumps(manifest, indent=2))


def test_tiled_directories_whose_vision_graph_takes_tiles_alone_still_load(exported, photos, tmp_path):
    from vledge.runtime import load

    out, _ = exported
    old = tmp_path / "old"
    _tiles_alone(out, old)
    answers = []
    for model_dir in (out, old):
        runtime = load(model_dir, precision="fp32", providers="cpu", threads=1)
        assert runtime.graphs.vision_input_rank == (5 if model_dir == out else 4)
        runtime.warmup()
        assert runtime.placement()["vision_encoder"]  # the probe feeds fit the graph's rank
        answers.append(runtime.ask(str(photos[0]), QUESTION, GenerationOptions(max_new_tokens=NEW_TOKENS)).token_ids)
    assert answers[0] == answers[1] and len(answers[0]) >= 4


def test_tile_markers_transformers_js_does_not_write_are_named(exported):
    """transformers.js writes its own tile markers; a model with other ones gets a reason, not files."""
    import dataclasses

    from vledge.export.transformers_js import parent_model_type, unsupported_reason
    from vledge.manifest import read_manifest

    config = read_manifest(exported[0]).model_config
    assert unsupported_reason(config) is None and parent_model_type(config) == "smolvlm"
    spec = config.preprocess
    other = dataclasses.replace(config, preprocess=dataclasses.replace(
        spec, tiles=dataclasses.replace(spec.tiles, global_token="<global>")))
    assert "global_token is '<global>'" in unsupported_reason(other)
    assert "'<global-img>'" in unsupported_reason(other)
