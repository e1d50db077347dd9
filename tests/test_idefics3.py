"""Idefics3 / SmolVLM folders end to end: convert, export behind the parity gate, and run, against transformers.

Two tiny random folders (``hf_idefics3_folders``), built once for the module: a SmolVLM folder that splits
images into tiles (converted by ``vledge convert``, then exported from the checkpoint) and an Idefics3 folder
that does not (exported straight from the folder by ``vledge export HF_DIR``). The runtime's greedy tokens
through the fp32 graphs, and those of a plain onnxruntime loop written from docs/model-directory.md alone,
must equal transformers' ``generate`` for one and for two images in a prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

from hf_idefics3_folders import (  # noqa: E402
    make_idefics3_folder,
    reference_generate,
    reference_image_features,
)

pytestmark = pytest.mark.slow

QUESTION = "What is in this image?"
NEW_TOKENS = 16
KINDS = ("smolvlm-split", "idefics3-unsplit")


def photos() -> list[np.ndarray]:
    """Two scikit-image photographs, downscaled (RGB uint8): a square one and a wide one."""
    return [np.ascontiguousarray(skimage_data.astronaut()[::7, ::5]),
            np.ascontiguousarray(skimage_data.coffee()[::9, ::6])]


def until_eos(tokens, eos_id: int) -> list[int]:
    """transformers keeps the stop token it generated; vledge stops before it."""
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """kind -> (folder, model directory, checkpoint or None): both exported with fp32, int8 and q4 variants."""
    from click.testing import CliRunner

    from vledge.cli import main

    root = tmp_path_factory.mktemp("idefics3")
    runner = CliRunner()
    out = {}
    # SmolVLM, splitting: vledge convert, then export the checkpoint through the Python API.
    folder = make_idefics3_folder(root / "smolvlm", kind="smolvlm", split=True)
    ckpt = root / "smolvlm.pt"
    result = runner.invoke(main, ["convert", str(folder), "-o", str(ckpt)])
    assert result.exit_code == 0, result.output
    from vledge.export import ExportOptions, export

    text = root / "text.txt"
    text.write_text("A small cat sits on a red mat near the door. " * 8)
    export(ckpt, root / "smolvlm-model", ExportOptions(quantize=("int8", "q4"), parity_samples=8,
                                                       calibration_samples=8, parity_text=text,
                                                       parity_text_tokens=64))
    out["smolvlm-split"] = (folder, root / "smolvlm-model", ckpt)
    # Idefics3, no splitting: vledge export HF_DIR straight from the folder.
    folder = make_idefics3_folder(root / "idefics3", kind="idefics3", split=False)
    model = root / "idefics3-model"
    result = runner.invoke(main, ["export", str(folder), "-o", str(model), "--quantize", "int8,q4",
                                  "--parity-samples", "8"])
    assert result.exit_code == 0, result.output
    out["idefics3-unsplit"] = (folder, model, None)
    return out


@pytest.fixture(scope="module")
def references(built):
    """(kind, image count) -> transformers' greedy generation for the module's photos."""
    images = photos()
    return {(kind, count): reference_generate(built[kind][0], images[:count], QUESTION, NEW_TOKENS)
            for kind in KINDS for count in (1, 2)}


def test_convert_keeps_the_tiles(built):
    from vledge.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(built["smolvlm-split"][2])
    spec = checkpoint.model_config.preprocess
    assert spec.resize == "tiles" and spec.tiles.split and spec.tiles.tokens_per_tile == 4
    assert spec.image_size == 32 and spec.tiles.longest_edge == 64


@pytest.mark.parametrize("kind", KINDS)
def test_export_passes_the_gate_with_variants(built, kind):
    folder, model, _ = built[kind]
    manifest = json.loads((model / "vledge.json").read_text())
    fp32 = manifest["parity"]["variants"]["fp32"]
    assert fp32["image_embeds"]["within_fp32_tolerance"] and fp32["prefill_logits"]["within_fp32_tolerance"]
    assert fp32["generation"]["token_agreement"] >= 0.99
    assert "int8" in manifest["variants"]["vision_encoder"]
    assert {"int8", "q4"} <= set(manifest["variants"]["decoder_model_merged"])
    measured = set(manifest["parity"]["variants"]) | set(manifest["parity"]["not_measured"])
    assert {"vision_encoder:int8", "decoder_model_merged:int8", "decoder_model_merged:q4"} <= measured
    tiles = manifest["preprocess"]["tiles"]
    assert manifest["preprocess"]["resize"] == "tiles"
    assert tiles["split"] == (kind == "smolvlm-split") and tiles["tokens_per_tile"] == 4
    config = json.loads((model / "config.json").read_text())  # transformers.js's files (its idefics3 / smolvlm)
    assert config["model_type"] == json.loads((folder / "config.json").read_text())["model_type"]
    forced = fp32["teacher_forced"]
    assert forced["answers"]["top1_agreement"] == 1.0 and forced["answers"]["positions"] > 0
    if kind == "smolvlm-split":  # --parity-text: the text forced after the first image's expanded prompt
        assert forced["text"]["positions"] == 64 and forced["text"]["top1_agreement"] == 1.0
    import onnx

    graph = onnx.load(str(model / "onnx" / "vision_encoder.onnx"), load_external_data=False).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", "tiles", 3, 32, 32]  # transformers.js's layout: the tiles of each prompt


@pytest.mark.parametrize("kind", KINDS)
def test_vision_graph_matches_get_image_features(built, references, kind):
    import onnxruntime as ort

    folder, model, _ = built[kind]
    pixels = references[(kind, 2)]["pixel_values"]
    session = ort.InferenceSession(str(model / "onnx" / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"pixel_values": pixels[None].astype(np.float32)})[0]  # one prompt's tiles
    expected = reference_image_features(folder, pixels)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("count", (1, 2))
@pytest.mark.parametrize("kind", KINDS)
def test_runtime_matches_transformers(built, references, kind, count):
    import vledge.runtime
    from vledge.decoding import GenerationOptions

    _, model, _ = built[kind]
    runtime = vledge.runtime.load(model, precision="fp32", providers="cpu")
    reference = references[(kind, count)]
    images = photos()[:count]
    result = runtime.generate([images], QUESTION, GenerationOptions(max_new_tokens=NEW_TOKENS),
                              channel_order="RGB")[0]
    expected = until_eos(reference["generated"], runtime.tokenizer.eos_id)
    assert len(expected) >= 4  # the comparison means something
    assert result.token_ids == expected
    ids, pixels, counts = runtime.tiled_inputs([[runtime.preprocessor.tiles(im, "RGB") for im in images]],
                                               [QUESTION])
    assert ids[0] == reference["input_ids"].tolist()
    assert np.abs(pixels - reference["pixel_values"]).max() <= 2 / 255 + 1e-6  # 1 grey level (std 0.5)


def plain_onnxruntime_generate(model: Path, images: list[tuple[np.ndarray, int, int]], question: str,
                               max_new_tokens: int) -> list[int]:
    """Greedy decoding from docs/model-directory.md only: numpy, onnxruntime and tokenizers."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    manifest = json.loads((model / "vledge.json").read_text())
    arch, special, p = manifest["architecture"], manifest["special_tokens"], manifest["prompt"]
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))

    def session(name):
        return ort.InferenceSession(str(model / "onnx" / f"{name}.onnx"), providers=["CPUExecutionProvider"])

    vision, embed, decoder = session("vision_encoder"), session("embed_tokens"), session("decoder_model_merged")

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    tiles = manifest["preprocess"]["tiles"]
    image_text, n = tok.id_to_token(special["image"]), tiles["tokens_per_tile"]

    def expansion(rows, cols):
        single = tiles["fake_token"] + tiles["global_token"] + image_text * n + tiles["fake_token"]
        if rows == 0:
            return single
        grid = "".join("".join(f"{tiles['fake_token']}<row_{r}_col_{c}>" + image_text * n
                               for c in range(1, cols + 1)) + "\n" for r in range(1, rows + 1))
        return grid + "\n" + single

    ids = manifest["prefix_ids"] + [special["image"]] * len(images) + enc(p["image_separator"]) \
        + enc(question) + enc(p["assistant"])
    expanded, k = [], 0
    for token in ids:
        if token == special["image"]:
            expanded += enc(expansion(images[k][1], images[k][2]))
            k += 1
        else:
            expanded.append(token)
    features = vision.run(None, {"pixel_values": np.concatenate([im[0] for im in images])[None]})[0]
    x = embed.run(None, {"input_ids": np.array([expanded], dtype=np.int64)})[0]
    x[0, np.array(expanded) == special["image"]] = features.reshape(-1, x.shape[-1])
    mask = np.ones((1, x.shape[1]), np.int64)
    past = {f"past_key_values.{i}.{kind}": np.zeros((1, arch["kv_heads"], 0, arch["head_dim"]), np.float32)
            for i in range(arch["layers"]) for kind in ("key", "value")}
    stops = manifest["generation"].get("stop_token_ids") or [special["eos"]]
    out: list[int] = []
    while len(out) < max_new_tokens:
        feeds = {"inputs_embeds": x, "attention_mask": mask,
                 "position_ids": (np.cumsum(mask, 1) - 1)[:, -x.shape[1]:], **past}
        logits, *presents = decoder.run(None, feeds)
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        out.append(token)
        past = dict(zip(past, presents))
        x = embed.run(None, {"input_ids": np.array([[token]], dtype=np.int64)})[0]
        mask = np.concatenate([mask, [[1]]], axis=1)
    return out


@pytest.mark.parametrize("count", (1, 2))
@pytest.mark.parametrize("kind", KINDS)
def test_plain_onnxruntime_loop_from_the_docs(built, references, kind, count):
    _, model, _ = built[kind]
    reference = references[(kind, count)]
    pixels, spans, start = reference["pixel_values"], [], 0
    for rows, cols in zip(reference["rows"], reference["cols"]):  # the processor's pixels, as the doc says
        tiles = rows * cols + 1
        spans.append((pixels[start:start + tiles].astype(np.float32), int(rows), int(cols)))
        start += tiles
    tokens = plain_onnxruntime_generate(model, spans, QUESTION, NEW_TOKENS)
    eos = json.loads((model / "vledge.json").read_text())["special_tokens"]["eos"]
    assert tokens == until_eos(reference["generated"], eos)


@pytest.mark.parametrize("field, value", [("video_token_id", 7), ("perceiver_config", {"resampler_depth": 3})])
def test_unsupported_config_fields_are_one_line_errors(tmp_path, field, value):
    from vledge.errors import ConfigError
    from vledge.export import ExportOptions, export_folder

    folder = make_idefics3_folder(tmp_path / "folder", kind="idefics3", split=False)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=field) as caught:
        export_folder(folder, tmp_path / "model", ExportOptions(quantize=("none",)))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "model").exists()


def test_unreproducible_processor_and_backend_are_one_line_errors(tmp_path):
    from click.testing import CliRunner

    from vledge.cli import main
    from vledge.errors import ConfigError
    from vledge.hf.fusion_folders import convert_folder

    folder = make_idefics3_folder(tmp_path / "folder", kind="smolvlm", split=True)
    with pytest.raises(ConfigError, match="pil") as caught:
        convert_folder(folder, tmp_path / "a.pt", backend="torchvision")
    assert "\n" not in str(caught.value)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor["resample"] = 0  # nearest: not reproduced
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    result = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "b.pt")])
    assert result.exit_code != 0 and "resample" in result.output
    assert not (tmp_path / "b.pt").exists()


def test_a_malformed_tiles_spec_is_refused(built, tmp_path):
    import shutil

    import vledge.runtime
    from vledge.errors import ModelDirError

    model = shutil.copytree(built["smolvlm-split"][1], tmp_path / "model")
    manifest = json.loads((model / "vledge.json").read_text())
    manifest["preprocess"]["tiles"]["split"] = "yes"
    (model / "vledge.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="preprocess.tiles.split"):
        vledge.runtime.load(model)
