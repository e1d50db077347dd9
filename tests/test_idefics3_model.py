"""Idefics3 / SmolVLM folders read into vledge's PyTorch model, checked against transformers on the same folder.

The tower (with its bucketed positions), the pixel-shuffle connector, the tiled pixels, the expanded prompt ids and
greedy tokens from the PyTorch engine are compared with transformers' own code; the ONNX side is in
tests/test_idefics3.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_idefics3_folders import make_idefics3_folder, reference_generate, reference_image_features  # noqa: E402
from skimage import data  # noqa: E402

from vledge.config import ImageTiles, PreprocessSpec, ProjectorConfig  # noqa: E402
from vledge.decoding import GenerationOptions  # noqa: E402
from vledge.errors import ConfigError, DataError  # noqa: E402
from vledge.generation import generate_from_pixels  # noqa: E402
from vledge.hf.fusion_folders import folder_checkpoint, folder_format  # noqa: E402
from vledge.image_tiles import expand_image_ids, tiled_question, tiles_per_row  # noqa: E402
from vledge.models.generate import TorchEngine  # noqa: E402
from vledge.models.projector import pixel_shuffle  # noqa: E402
from vledge.models.vit import bucketed_position_ids  # noqa: E402
from vledge.runtime.preprocess import ImagePreprocessor  # noqa: E402

QUESTION = "What is this?"
PHOTOS = {"astronaut": data.astronaut()[::7, ::5].copy(), "coffee": data.coffee()[::9, ::6].copy()}


@pytest.fixture(scope="module", params=[("smolvlm", True), ("idefics3", False)], ids=["smolvlm-split", "idefics3"])
def imported(request, tmp_path_factory):
    kind, split = request.param
    folder = make_idefics3_folder(tmp_path_factory.mktemp(kind) / "hf", kind=kind, split=split)
    checkpoint = folder_checkpoint(folder)
    return folder, checkpoint, checkpoint.build_model().eval(), checkpoint.tokenizer()


@pytest.mark.parametrize("photos", [["astronaut"], ["astronaut", "coffee"]], ids=["1-image", "2-images"])
def test_pixels_features_ids_and_greedy_tokens_equal_transformers(imported, photos):
    folder, checkpoint, model, tokenizer = imported
    images = [PHOTOS[name] for name in photos]
    reference = reference_generate(folder, images, QUESTION)
    preprocessor = ImagePreprocessor(checkpoint.model_config.preprocess)
    tiles = [preprocessor.tiles(image, "RGB") for image in images]
    pixels = np.concatenate([t.pixel_values for t in tiles])
    np.testing.assert_array_equal(pixels, reference["pixel_values"])
    with torch.no_grad():
        features = model.encode_images(torch.as_tensor(pixels)).numpy()
    expected = reference_image_features(folder, reference["pixel_values"])
    np.testing.assert_allclose(features.reshape(expected.shape), expected, atol=1e-5)
    ids = tiled_question(tokenizer, checkpoint.model_config.prompt, checkpoint.model_config.preprocess.tiles,
                         QUESTION, tiles)
    assert ids == reference["input_ids"].tolist()
    results = generate_from_pixels(TorchEngine(model, tokenizer), pixels, [ids], GenerationOptions(max_new_tokens=16),
                                   tiles_per_row=tiles_per_row([[(t.rows, t.cols) for t in tiles]]))
    assert results[0].token_ids == reference["generated"].tolist()
    assert len(set(results[0].token_ids)) > 2  # a varied answer, not one repeated token


def test_batched_rows_with_different_tile_counts_equal_single_rows(imported):
    """Left-padded rows of 1 and 2 images decode as each row alone does (filled in row order)."""
    folder, checkpoint, model, tokenizer = imported
    spec = checkpoint.model_config.preprocess
    preprocessor = ImagePreprocessor(spec)
    rows = [[preprocessor.tiles(PHOTOS["coffee"], "RGB")],
            [preprocessor.tiles(PHOTOS["astronaut"], "RGB"), preprocessor.tiles(PHOTOS["coffee"], "RGB")]]
    ids = [tiled_question(tokenizer, checkpoint.model_config.prompt, spec.tiles, QUESTION, row) for row in rows]
    pixels = np.concatenate([t.pixel_values for row in rows for t in row])
    counts = tiles_per_row([[(t.rows, t.cols) for t in row] for row in rows])
    engine = TorchEngine(model, tokenizer)
    options = GenerationOptions(max_new_tokens=8)
    together = generate_from_pixels(engine, pixels, ids, options, tiles_per_row=counts)
    offset = 0
    for row, count in enumerate(counts):
        alone = generate_from_pixels(engine, pixels[offset:offset + count], [ids[row]], options,
                                     tiles_per_row=[count])
        assert together[row].token_ids == alone[0].token_ids
        offset += count


def test_folder_config_is_read_into_a_tiled_spec(imported):
    folder, checkpoint, model, _ = imported
    config = checkpoint.model_config
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert config.preprocess.resize == "tiles"
    assert config.preprocess.image_size == processor["max_image_size"]["longest_edge"]
    assert config.preprocess.tiles.longest_edge == processor["size"]["longest_edge"]
    assert config.preprocess.tiles.split == processor["do_image_splitting"]
    assert config.preprocess.tiles.tokens_per_tile == model.num_image_tokens == 4
    assert config.projector == ProjectorConfig("pixel_shuffle", scale_factor=2)
    assert config.vision.backbone == "idefics3"


def test_bucketed_positions_and_pixel_shuffle_follow_transformers():
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionEmbeddings

    vision = transformers.Idefics3VisionConfig(hidden_size=8, image_size=70, patch_size=5)  # 14 x 14 positions
    embeddings = Idefics3VisionEmbeddings(vision)
    seen = {}
    embeddings.position_embedding.register_forward_hook(lambda m, i, o: seen.update(ids=i[0]))
    embeddings(torch.zeros(1, 3, 70, 70), torch.ones(1, 14, 14, dtype=torch.bool))
    assert torch.equal(seen["ids"][0], bucketed_position_ids(14, 14, 14))

    config = transformers.Idefics3Config(vision_config={"hidden_size": 6}, text_config={"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2},
                                         scale_factor=3)
    connector = Idefics3Connector(config)
    tokens = torch.randn(2, 36, 6)
    assert torch.equal(pixel_shuffle(tokens, 3), connector.pixel_shuffle(tokens, 3))


def test_expansion_refuses_a_wrong_image_count(imported):
    _, checkpoint, _, tokenizer = imported
    with pytest.raises(DataError, match="2 image tokens for 1 images"):
        expand_image_ids(tokenizer, checkpoint.model_config.preprocess.tiles,
                         [tokenizer.image_id, tokenizer.image_id], [(0, 0)])


@pytest.mark.parametrize("field,value,message", [
    ("video_token_id", 7, "video_token_id is set"),
    ("perceiver_config", {"resampler_n_latents": 64}, "perceiver_config is set"),
    ("architectures", ["Idefics2ForConditionalGeneration"], "not a vision-language model vledge reads"),
    ("scale_factor", 3, "scale_factor 3 does not divide"),
])
def test_unsupported_folders_are_one_line_errors(tmp_path, field, value, message):
    folder = make_idefics3_folder(tmp_path / "hf", kind="smolvlm", split=False)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message) as caught:
        folder_checkpoint(folder)
    assert "\n" not in str(caught.value)


def test_unreproducible_processor_and_backend_are_refused(tmp_path):
    folder = make_idefics3_folder(tmp_path / "hf", kind="idefics3", split=True)
    with pytest.raises(ConfigError, match="Pillow image processor only"):
        folder_checkpoint(folder, backend="torchvision")
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor["max_image_size"] = {"longest_edge": 48}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ConfigError, match="max_image_size.longest_edge 48 differs"):
        folder_checkpoint(folder)
    processor["max_image_size"] = {"height": 32, "width": 32}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ConfigError, match="max_image_size must be"):
        folder_checkpoint(folder)
    assert folder_format(folder) == "vledge.hf.idefics3"


def test_tiled_configs_are_checked_by_field():
    with pytest.raises(ConfigError, match="ImageTiles.tokens_per_tile"):
        ImageTiles(tokens_per_tile=0)
    with pytest.raises(ConfigError, match="ImageTiles.resample"):
        ImageTiles(resample=0)
    with pytest.raises(ConfigError, match="tiles is set exactly when resize is 'tiles'"):
        PreprocessSpec(resize="tiles")
    with pytest.raises(ConfigError, match="scale_factor applies to the pixel_shuffle projector only"):
        ProjectorConfig("linear", scale_factor=2)
    with pytest.raises(ConfigError, match=r"use tiles\(\)"):
        ImagePreprocessor(PreprocessSpec(image_size=32, resize="tiles", tiles=ImageTiles(longest_edge=64))).preprocess(
            np.zeros((8, 8, 3), np.uint8))
