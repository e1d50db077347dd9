"""Idefics3 / SmolVLM image preprocessing and prompt expansion, torch-free and exact.

Reproduces transformers' PIL-backend ``Idefics3ImageProcessor`` (``Idefics3ImageProcessorPil`` in
transformers 5; ``SmolVLMImageProcessor`` is the same algorithm) for one image: resize so the longest
edge is ``size["longest_edge"]``, then, with splitting, resize up to multiples of the tile size
``max_image_size["longest_edge"]`` and cut it into tiles row by row followed by the whole image
resized to one tile (the "global" image); without splitting, only that square global image. Every
resize is Pillow's, reproduced bit for bit by :mod:`vledge.runtime.pil_resize`. Then rescale and
normalise in the processor's float arithmetic, and expand the prompt the way ``Idefics3Processor`` /
``SmolVLMProcessor`` do. The image sizes are the processor's own integer arithmetic, so tile counts
and the rows/cols grid are identical.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vledge.errors import ConfigError, ImageError
from vledge.image_tiles import expand_prompt, image_prompt  # noqa: F401 (re-exported)
from vledge.runtime.pil_resize import PASS_ORDERS, RESAMPLE_NAMES, pil_resize

logger = logging.getLogger(__name__)

# transformers' idefics3/smolvlm ``MAX_IMAGE_SIZE``: the first resize never exceeds this side.
MAX_IMAGE_SIZE = 4096
MAX_GRID_SIDE = 32  # tiles per row or column; a config asking for more is refused
PROCESSOR_TYPES = tuple(f"{family}ImageProcessor{suffix}" for family in ("Idefics3", "SmolVLM")
                        for suffix in ("", "Pil", "Fast"))
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # the processors' default mean and std


@dataclass(frozen=True)
class Idefics3ImageOptions:
    """What an Idefics3 / SmolVLM ``preprocessor_config.json`` asks for; validated on construction."""

    longest_edge: int = 4 * 364  # size["longest_edge"]
    tile: int = 364  # max_image_size["longest_edge"]
    do_resize: bool = True
    do_image_splitting: bool = True
    resample: int = 1  # Pillow's LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD
    image_std: tuple[float, float, float] = IMAGENET_STANDARD
    pass_order: str = "pillow13"  # which Pillow release's order of resampling passes to reproduce

    def __post_init__(self) -> None:
        for name in ("do_resize", "do_image_splitting", "do_rescale", "do_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, value in (("size.longest_edge", self.longest_edge), ("max_image_size.longest_edge", self.tile)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2 * MAX_IMAGE_SIZE:
                raise ConfigError(f"{name} must be an integer 1..{2 * MAX_IMAGE_SIZE}, got {value!r}")
        side = min(self.longest_edge, MAX_IMAGE_SIZE)
        if self.do_resize and self.do_image_splitting and math.ceil(side / self.tile) > MAX_GRID_SIDE:
            raise ConfigError(f"max_image_size.longest_edge {self.tile} would split a {side}-pixel side into more "
                              f"than {MAX_GRID_SIDE} tiles")
        if self.resample not in RESAMPLE_NAMES:
            raise ConfigError(f"resample {self.resample!r} is not reproduced; supported: "
                              + ", ".join(f"{k} ({v})" for k, v in RESAMPLE_NAMES.items()))
        if (isinstance(self.rescale_factor, bool) or not isinstance(self.rescale_factor, (int, float))
                or not math.isfinite(self.rescale_factor) or self.rescale_factor <= 0):
            raise ConfigError(f"rescale_factor must be a positive number, got {self.rescale_factor!r}")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if (not isinstance(values, tuple) or len(values) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in values)):
                raise ConfigError(f"{name} must be 3 finite numbers, got {values!r}")
        if any(v == 0 for v in self.image_std):
            raise ConfigError(f"image_std must not contain 0, got {self.image_std!r}")
        if self.pass_order not in PASS_ORDERS:
            raise ConfigError(f"pass_order must be one of {PASS_ORDERS}, got {self.pass_order!r}")

    @classmethod
    def from_spec(cls, spec) -> Idefics3ImageOptions:
        """Options from a tiled ``PreprocessSpec`` (``resize == "tiles"``), as a model directory records them."""
        tiles = spec.tiles
        return cls(longest_edge=tiles.longest_edge, tile=spec.image_size, do_resize=tiles.do_resize,
                   do_image_splitting=tiles.split, resample=tiles.resample, do_rescale=tiles.rescale_factor != 1.0,
                   rescale_factor=tiles.rescale_factor, do_normalize=True, image_mean=tuple(spec.mean),
                   image_std=tuple(spec.std), pass_order=tiles.pass_order)

    @classmethod
    def from_config(cls, config: Mapping, pass_order: str = "pillow13") -> Idefics3ImageOptions:
        """Options from a ``preprocessor_config.json`` dict; what is not reproduced exactly is a ConfigError."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"preprocessor config must be a JSON object, got {type(config).__name__}")
        kind = config.get("image_processor_type")
        if kind is not None and kind not in PROCESSOR_TYPES:
            raise ConfigError(f"image_processor_type {kind!r} is not an Idefics3 / SmolVLM image processor")
        if config.get("do_convert_rgb", True) is not True:
            raise ConfigError("do_convert_rgb: only true is reproduced (images are converted to RGB)")
        if not isinstance(config.get("do_pad", True), bool):
            raise ConfigError(f"do_pad must be true or false, got {config['do_pad']!r}")
        return cls(longest_edge=_edge(config, "size", 4 * 364), tile=_edge(config, "max_image_size", 364),
                   do_resize=config.get("do_resize", True),
                   do_image_splitting=config.get("do_image_splitting", True),
                   resample=config.get("resample", 1), do_rescale=config.get("do_rescale", True),
                   rescale_factor=config.get("rescale_factor", 1 / 255),
                   do_normalize=config.get("do_normalize", True),
                   image_mean=_triple(config, "image_mean"), image_std=_triple(config, "image_std"),
                   pass_order=pass_order)


def _edge(config: Mapping, key: str, default: int) -> int:
    value = config.get(key, {"longest_edge": default})
    if isinstance(value, Mapping):  # a saved size dict may list its other forms as null
        value = {k: v for k, v in value.items() if v is not None}
    if not isinstance(value, Mapping) or set(value) != {"longest_edge"}:
        raise ConfigError(f"{key} must be {{\"longest_edge\": N}} (other forms are not reproduced), got {value!r}")
    return value["longest_edge"]


def _triple(config: Mapping, key: str) -> tuple:
    value = config.get(key, IMAGENET_STANDARD)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,) * 3
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a number or 3 numbers, got {value!r}")
    return tuple(value)


def resized_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) after the first resize: longest edge to ``longest_edge``, the other even, then
    at most ``MAX_IMAGE_SIZE`` (the processor's ``get_resize_output_image_size``, same arithmetic)."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def tiled_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of ``tile`` (the processor's ``resize_for_vision_encoder``)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect)
        width = math.ceil(width / tile) * tile
    return height, width


@dataclass(frozen=True)
class Idefics3Images:
    """One image, preprocessed: what the vision tower takes and what the prompt needs."""

    pixel_values: np.ndarray  # float32 [tiles, 3, tile, tile]: the row-major tiles, then the global image
    rows: int  # 0 and 0 when the image was not split (then there is only the global image)
    cols: int


def split_image(rgb: np.ndarray, options: Idefics3ImageOptions) -> tuple[np.ndarray, int, int]:
    """RGB uint8 [H, W, 3] -> (uint8 [tiles, tile, tile, 3], rows, cols), before rescaling."""
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            and rgb.size):
        got = (f"<array shape={tuple(rgb.shape)} dtype={rgb.dtype}>" if isinstance(rgb, np.ndarray)
               else type(rgb).__name__)
        raise ImageError(f"Idefics3 preprocessing needs an RGB uint8 HxWx3 array, got {got}")
    tile, resample, order = options.tile, options.resample, options.pass_order
    image = rgb
    if options.do_resize:
        image = pil_resize(image, *resized_size(*image.shape[:2], options.longest_edge), resample, order)
    if not options.do_image_splitting:
        return pil_resize(image, tile, tile, resample, order)[None], 0, 0
    height, width = tiled_size(*image.shape[:2], tile)
    if max(height, width) > MAX_GRID_SIDE * tile:
        raise ImageError(f"cannot split a {rgb.shape[1]}x{rgb.shape[0]} image: its aspect ratio is too extreme "
                         f"({width}x{height} is over {MAX_GRID_SIDE} tiles a side)")
    image = pil_resize(image, height, width, resample, order)
    if height <= tile and width <= tile:
        return image[None], 0, 0
    rows, cols = (height - tile) // tile + 1, (width - tile) // tile + 1
    tiles = [image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    tiles.append(pil_resize(image, tile, tile, resample, order))
    return np.stack(tiles), rows, cols


def normalise(tiles: np.ndarray, options: Idefics3ImageOptions) -> np.ndarray:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W], rescaled and normalised in the processor's arithmetic
    (the product in float64 then cast to float32; the mean and std subtracted and divided in float32)."""
    chw = tiles.transpose(0, 3, 1, 2)
    values = (chw.astype(np.float64) * options.rescale_factor).astype(np.float32) if options.do_rescale \
        else chw.astype(np.float32)
    if options.do_normalize:
        mean = np.asarray(options.image_mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(options.image_std, dtype=np.float32)[None, :, None, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32)


def preprocess(rgb: np.ndarray, options: Idefics3ImageOptions) -> Idefics3Images:
    """RGB uint8 [H, W, 3] -> the image's tiles as the processor returns them, and its grid."""
    tiles, rows, cols = split_image(rgb, options)
    logger.debug("idefics3 image %dx%d -> %d tiles (%d rows, %d cols)", rgb.shape[1], rgb.shape[0],
                 len(tiles), rows, cols)
    return Idefics3Images(pixel_values=normalise(tiles, options), rows=rows, cols=cols)
