"""How a decoded RGB image becomes the model's pixels: the PreprocessSpec every part follows exactly.

Kept apart from ``vledge.config`` (which re-exports it) so that module holds the model and training
configurations; torch-free, and round-trips through plain dicts like every config.
"""

from __future__ import annotations

from dataclasses import dataclass

from vledge.config_fields import require_finite, require_positive
from vledge.errors import ConfigError
from vledge.families.hf_config import MAX_IMAGE_SIZE

INTERPOLATIONS = ("bilinear", "bicubic", "bilinear_pil", "bicubic_pil")
PASS_ORDERS = ("pillow13", "pillow12")  # which Pillow release's order of resize passes tiles reproduce
TILE_RESAMPLES = (1, 2, 3)  # Pillow's LANCZOS, BILINEAR, BICUBIC


@dataclass
class ImageTiles:
    """Idefics3 / SmolVLM images: tiles of ``PreprocessSpec.image_size`` plus a global view, between marker tokens.

    The image is resized so its longest side is ``longest_edge`` (keeping the aspect ratio), then, with ``split``,
    resized up to whole tiles and cut row by row, followed by the whole image squashed to one tile; without
    ``split`` only that squashed image. In the prompt one image token becomes, per tile,
    ``fake_token`` + ``<row_R_col_C>`` + ``tokens_per_tile`` image tokens (a newline after each row), then the
    global view's ``fake_token`` + ``global_token`` + image tokens + ``fake_token`` (docs/idefics3.md).
    """

    longest_edge: int = 4 * 364  # size["longest_edge"]
    split: bool = True  # do_image_splitting
    tokens_per_tile: int = 64  # image_seq_len
    resample: int = 1  # Pillow's filter number (1 Lanczos, 2 bilinear, 3 bicubic)
    do_resize: bool = True
    rescale_factor: float = 1 / 255  # 1.0: no rescale
    pass_order: str = "pillow13"
    fake_token: str = "<fake_token_around_image>"
    global_token: str = "<global-img>"

    def __post_init__(self) -> None:
        for name in ("split", "do_resize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ImageTiles.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("longest_edge", "tokens_per_tile"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2 * MAX_IMAGE_SIZE:
                raise ConfigError(f"ImageTiles.{name} must be an integer 1..{2 * MAX_IMAGE_SIZE}, got {value!r}")
        if self.resample not in TILE_RESAMPLES:
            raise ConfigError(f"ImageTiles.resample must be one of {TILE_RESAMPLES} (Lanczos, bilinear, bicubic), "
                              f"got {self.resample!r}")
        require_positive("ImageTiles", rescale_factor=self.rescale_factor)
        if self.pass_order not in PASS_ORDERS:
            raise ConfigError(f"ImageTiles.pass_order must be one of {PASS_ORDERS}, got {self.pass_order!r}")
        for name in ("fake_token", "global_token"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"ImageTiles.{name} must be a non-empty string")


@dataclass
class PreprocessSpec:
    """How a decoded RGB image becomes the model's pixel tensor; the runtime follows it exactly."""

    image_size: int = 64  # side of the square pixel tensor the vision encoder reads
    # "shortest_edge_center_crop": resize the short side to resize_size, crop the centre square.
    # "squash": resize both sides to image_size, ignoring aspect ratio.
    # "tiles": several image_size tiles per image, as ``tiles`` says (Idefics3 / SmolVLM).
    resize: str = "shortest_edge_center_crop"
    # shortest_edge_center_crop only: the short side's length before the crop (None: image_size).
    resize_size: int | None = None
    # "bilinear" / "bicubic": torchvision's antialiased resize; "bilinear_pil" / "bicubic_pil":
    # Pillow's Image.resize (what Hugging Face image processors use).
    interpolation: str = "bilinear"
    # Crop offset (resized - image_size) / 2: "round" as torchvision's center_crop rounds it,
    # "floor" as Hugging Face image processors do.
    crop_anchor: str = "round"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"
    tiles: ImageTiles | None = None  # resize "tiles" only

    def __post_init__(self) -> None:
        if self.resize not in ("shortest_edge_center_crop", "squash", "tiles"):
            raise ConfigError(f"unknown resize mode {self.resize!r}")
        if (self.resize == "tiles") != (self.tiles is not None):
            raise ConfigError("PreprocessSpec.tiles is set exactly when resize is 'tiles'")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {self.interpolation!r}; choose from {INTERPOLATIONS}")
        if self.crop_anchor not in ("round", "floor"):
            raise ConfigError(f"unknown crop_anchor {self.crop_anchor!r}; choose 'round' or 'floor'")
        if self.image_size < 8:
            raise ConfigError(f"image_size must be at least 8, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"PreprocessSpec.mean and std need 3 values each, got {self.mean!r} and {self.std!r}")
        require_finite("PreprocessSpec", **{f"mean[{i}]": m for i, m in enumerate(self.mean)})
        require_positive("PreprocessSpec", **{f"std[{i}]": v for i, v in enumerate(self.std)})
        if self.channel_order not in ("RGB", "BGR"):
            raise ConfigError(f"PreprocessSpec.channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.resize_size is not None:
            if self.resize != "shortest_edge_center_crop":
                raise ConfigError("resize_size applies only to resize 'shortest_edge_center_crop'")
            if self.resize_size < self.image_size:
                raise ConfigError(f"resize_size {self.resize_size} is smaller than the crop (image_size "
                                  f"{self.image_size})")

    def geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(resized height, resized width, crop top, crop left) of an image, as torchvision / HF compute them."""
        size = self.image_size
        if self.resize == "squash":
            return size, size, 0, 0
        short_target = self.resize_size or size
        if min(height, width) == short_target:
            new_h, new_w = height, width
        else:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = short_target, int(short_target * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if self.crop_anchor == "floor":
            return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2
        return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
