"""Idefics3 / SmolVLM preprocessing against transformers' own PIL-backend processors, on real photographs."""

from __future__ import annotations

import numpy as np
import PIL
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil  # noqa: E402
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil  # noqa: E402
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string  # noqa: E402

from vledge.errors import ConfigError, DataError, ImageError  # noqa: E402
from vledge.runtime.idefics3_images import (  # noqa: E402
    Idefics3ImageOptions, expand_prompt, image_prompt, preprocess, split_image)
from vledge.runtime.pil_resize import pil_resize  # noqa: E402

# The installed Pillow is the reference; its release decides the order of the two resampling passes.
PASS_ORDER = "pillow13" if int(PIL.__version__.split(".")[0]) >= 13 else "pillow12"


def _photos() -> dict[str, np.ndarray]:
    astronaut = skimage_data.astronaut()
    return {"astronaut": astronaut, "coffee": skimage_data.coffee(), "chelsea": skimage_data.chelsea(),
            "rocket": skimage_data.rocket(), "tall": astronaut[:, 150:330], "wide": astronaut[200:303],
            "small": np.ascontiguousarray(astronaut[::9, ::11])}


PHOTOS = _photos()
SMALL = {"size": {"longest_edge": 4 * 64}, "max_image_size": {"longest_edge": 64}}


def _reference(processor, rgb: np.ndarray) -> tuple[np.ndarray, int, int]:
    out = processor(images=[rgb], return_row_col_info=True)
    return np.asarray(out["pixel_values"])[0], out["rows"][0][0], out["cols"][0][0]


def _check_against(processor_class, config: dict, name: str) -> None:
    rgb = PHOTOS[name]
    expected, rows, cols = _reference(processor_class(**config), rgb)
    options = Idefics3ImageOptions.from_config(config, pass_order=PASS_ORDER)
    got = preprocess(rgb, options)
    assert (got.rows, got.cols) == (rows, cols)
    assert got.pixel_values.shape == expected.shape and got.pixel_values.dtype == np.float32
    # In 0-255 space (undoing normalisation and rescaling): within 1 grey level ...
    values = expected.astype(np.float64)
    if options.do_normalize:
        values = values * np.asarray(options.image_std)[:, None, None] + np.asarray(options.image_mean)[:, None, None]
    levels = np.rint(values / options.rescale_factor if options.do_rescale else values).astype(np.int64)
    tiles, _, _ = split_image(rgb, options)
    assert np.abs(tiles.transpose(0, 3, 1, 2).astype(np.int64) - levels).max() <= 1
    # ... and in fact bit for bit, normalised floats included.
    np.testing.assert_array_equal(got.pixel_values, expected)


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("splitting", [True, False])
def test_tiles_grid_and_pixels_equal_idefics3_processor(name, splitting):
    _check_against(Idefics3ImageProcessorPil, {**SMALL, "do_image_splitting": splitting}, name)


@pytest.mark.parametrize("name", ["tall", "coffee"])
def test_smolvlm_processor_and_other_filters_and_norms(name):
    _check_against(SmolVLMImageProcessorPil, {**SMALL, "image_mean": [0.48, 0.45, 0.4],
                                              "image_std": [0.26, 0.26, 0.27]}, name)
    _check_against(Idefics3ImageProcessorPil, {**SMALL, "resample": 3}, name)  # bicubic
    _check_against(Idefics3ImageProcessorPil, {**SMALL, "resample": 2, "do_normalize": False}, name)


def test_smaller_than_one_tile_is_not_split():
    # longest_edge == tile: every image fits one tile, so only the global image, rows = cols = 0.
    config = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 64}}
    _check_against(Idefics3ImageProcessorPil, config, "small")
    _check_against(Idefics3ImageProcessorPil, {**config, "do_resize": False}, "small")
    assert preprocess(PHOTOS["small"], Idefics3ImageOptions.from_config(config)).pixel_values.shape == (1, 3, 64, 64)


def test_the_real_smolvlm_config_once():
    config = {"do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
              "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
              "image_processor_type": "Idefics3ImageProcessor", "image_std": [0.5, 0.5, 0.5],
              "max_image_size": {"longest_edge": 512}, "processor_class": "Idefics3Processor", "resample": 1,
              "rescale_factor": 1 / 255, "size": {"longest_edge": 2048}}
    _check_against(Idefics3ImageProcessorPil, config, "wide")
    got = preprocess(PHOTOS["wide"], Idefics3ImageOptions.from_config(config, pass_order=PASS_ORDER))
    assert (got.rows, got.cols, got.pixel_values.shape) == (1, 4, (5, 3, 512, 512))


@pytest.mark.parametrize("resample", [1, 2, 3])
def test_pil_resize_is_pillow_bit_for_bit(resample):
    rng = np.random.default_rng(resample)
    rgb = PHOTOS["chelsea"]
    # Up, down, one axis only, both ways at once, and the tall shrinks where Pillow 13 goes vertical first.
    sizes = [(600, 900), (37, 61), (300, 200), (150, 451), (90, 700), (31, 440), (299, 450)]
    sizes += [tuple(int(v) for v in rng.integers(3, 500, 2)) for _ in range(4)]
    for height, width in sizes:
        expected = np.asarray(Image.fromarray(rgb).resize((width, height), resample))
        np.testing.assert_array_equal(pil_resize(rgb, height, width, resample, PASS_ORDER), expected,
                                      err_msg=f"{width}x{height} resample={resample}")


def test_pass_order_matters_where_pillow_13_goes_vertical_first():
    rgb = PHOTOS["chelsea"]  # 451x300 -> 440x200: the height loses 100 rows, over twice the 11 columns lost
    assert not np.array_equal(pil_resize(rgb, 200, 440, 1, "pillow13"), pil_resize(rgb, 200, 440, 1, "pillow12"))
    # 451x300 -> 300x200: 100 rows against 151 columns, horizontal first in both releases
    assert np.array_equal(pil_resize(rgb, 200, 300, 1, "pillow13"), pil_resize(rgb, 200, 300, 1, "pillow12"))


def _tokenizer():
    special = (["<unk>", "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
               + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["User: What is in this image?\nAssistant: a cat on a sofa.\n\n"] * 4, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_prompt_expansion_and_input_ids_equal_the_processor():
    tokenizer = _tokenizer()
    processor = transformers.Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**SMALL),
                                               tokenizer=tokenizer, image_seq_len=5)
    options = Idefics3ImageOptions.from_config(SMALL, pass_order=PASS_ORDER)
    text = "User:<image>What is in this image?<image>\nAssistant:"
    images = [PHOTOS["tall"], PHOTOS["wide"]]
    expected = processor(text=[text], images=[images])
    done = [preprocess(rgb, options) for rgb in images]
    expanded = expand_prompt(text, [(d.rows, d.cols) for d in done], 5)
    assert tokenizer(expanded)["input_ids"] == list(expected["input_ids"][0])
    assert expanded.count("<image>") == 5 * sum(d.pixel_values.shape[0] for d in done)
    np.testing.assert_array_equal(np.concatenate([d.pixel_values for d in done]),
                                  np.asarray(expected["pixel_values"])[0])
    for rows, cols in [(0, 0), (1, 4), (3, 2), (6, 6)]:
        reference = get_image_prompt_string(rows, cols, 7, "<fake_token_around_image>", "<image>", "<global-img>")
        assert image_prompt(rows, cols, 7) == reference
        assert processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0) == image_prompt(rows, cols, 5)


@pytest.mark.parametrize("change, field", [
    ({"do_convert_rgb": False}, "do_convert_rgb"),
    ({"resample": 4}, "resample"),
    ({"resample": 5}, "resample"),
    ({"size": {"height": 100, "width": 100}}, "size"),
    ({"size": {"longest_edge": 256, "height": 100}}, "size"),
    ({"max_image_size": {"longest_edge": 0}}, "max_image_size.longest_edge"),
    ({"size": {"longest_edge": 4096}}, "max_image_size.longest_edge"),  # 4096 / 64 tiles a side
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"do_image_splitting": "yes"}, "do_image_splitting"),
    ({"do_pad": 1}, "do_pad"),
    ({"rescale_factor": -1}, "rescale_factor"),
    ({"image_processor_type": "CLIPImageProcessor"}, "image_processor_type"),
])
def test_what_is_not_reproduced_is_a_one_line_config_error(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as error:
        Idefics3ImageOptions.from_config({**SMALL, **change})
    assert "\n" not in str(error.value)


def test_bad_inputs_are_typed_errors():
    options = Idefics3ImageOptions.from_config(SMALL)
    with pytest.raises(ImageError, match="RGB uint8"):
        preprocess(PHOTOS["astronaut"][..., 0], options)
    with pytest.raises(ImageError, match="RGB uint8"):
        preprocess(PHOTOS["astronaut"].astype(np.float32), options)
    with pytest.raises(ConfigError, match="pass_order"):
        Idefics3ImageOptions(pass_order="pillow9")
    with pytest.raises(DataError, match="2 <image> tokens but 1 images"):
        expand_prompt("<image><image>", [(0, 0)], 4)
    with pytest.raises(ConfigError, match="rows"):
        image_prompt(0, 3, 4)


def test_size_dicts_may_list_their_other_forms_as_null():
    config = {"size": {"longest_edge": 256, "height": None, "width": None},
              "max_image_size": {"longest_edge": 64, "shortest_edge": None}}
    assert Idefics3ImageOptions.from_config(config) == Idefics3ImageOptions(longest_edge=256, tile=64)
