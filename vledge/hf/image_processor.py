"""A Hugging Face ``preprocessor_config.json`` -> a PreprocessSpec, with the defaults of the processor's family.

Only what the spec reproduces exactly is accepted; any other setting is a ConfigError naming the
field, rather than a model that silently sees different pixels than it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vledge.config import PreprocessSpec
from vledge.errors import ConfigError
from vledge.families import vision_family_for_processor

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values
# Settings of other processors (LLaVA-NeXT tiling, ConvNeXt's crop_pct, padding) that vledge cannot follow.
_UNSUPPORTED = ("image_grid_pinpoints", "crop_pct", "do_pad", "pad_size", "do_image_splitting", "max_image_tiles")
BACKENDS = ("pil", "torchvision")


def preprocess_spec_from_hf(config: Mapping[str, Any], where: str = "preprocessor_config.json",
                            backend: str = "pil") -> PreprocessSpec:
    """The spec that reproduces ``config``'s image processor with the given transformers backend.

    ``backend`` "pil" (transformers 4.x, and the ``*Pil`` classes of 5.x) resizes with Pillow;
    "torchvision" (5.x's default classes) with torchvision's antialiased kernels.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown image processor backend {backend!r}; choose from {BACKENDS}")
    family = vision_family_for_processor(config.get("image_processor_type"), where)
    for key in _UNSUPPORTED:
        if config.get(key) not in (None, False, [], {}):
            raise ConfigError(f"{where}: {key} = {config[key]!r} is not supported")

    def get(key: str) -> Any:
        value = config.get(key)
        return family.processor_defaults.get(key) if value is None else value

    for flag in ("do_convert_rgb", "do_resize", "do_rescale"):
        if get(flag) is not True:
            raise ConfigError(f"{where}: {flag} = {get(flag)!r} is not supported (vledge always converts to RGB, "
                              "resizes and rescales to [0, 1])")
    if not math.isclose(float(get("rescale_factor")), 1 / 255, rel_tol=1e-6):
        raise ConfigError(f"{where}: rescale_factor {get('rescale_factor')!r} is not supported (only 1/255)")
    resample = get("resample")
    if resample not in _RESAMPLE:
        raise ConfigError(f"{where}: resample {resample!r} is not supported; use 2 (bilinear) or 3 (bicubic)")
    interpolation = _RESAMPLE[resample] + ("_pil" if backend == "pil" else "")
    if get("do_normalize"):
        mean, std = _triple(get("image_mean"), where, "image_mean"), _triple(get("image_std"), where, "image_std")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    geometry = _geometry(family, get("size"), bool(get("do_center_crop")), get("crop_size"), where)
    try:
        return PreprocessSpec(interpolation=interpolation, crop_anchor="floor", mean=mean, std=std,
                              channel_order="RGB", **geometry)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _triple(value: Any, where: str, key: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{where}: {key} must hold three values (RGB), got {value!r}")
    return tuple(float(v) for v in value)


def _side(value: Any, where: str, key: str, square_default: bool) -> dict:
    """A size as transformers' get_size_dict reads it: an int is a short edge (CLIP) or a square (SigLIP)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value} if square_default else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"{where}: {key} {value!r} is not a size")


def _geometry(family, size: Any, center_crop: bool, crop_size: Any, where: str) -> dict:
    size = _side(size, where, "size", square_default=family.processor_int_size_is_square)
    crop = _side(crop_size, where, "crop_size", square_default=True) if center_crop else None
    if crop is not None and (set(crop) != {"height", "width"} or crop["height"] != crop["width"]):
        raise ConfigError(f"{where}: crop_size {crop_size!r} is not supported (only a square height = width)")
    if set(size) == {"shortest_edge"}:
        if crop is None:
            raise ConfigError(f"{where}: do_center_crop false after a shortest_edge resize gives non-square "
                              "images; not supported")
        if crop["height"] > size["shortest_edge"]:
            raise ConfigError(f"{where}: crop_size {crop['height']} is larger than size.shortest_edge "
                              f"{size['shortest_edge']} (the image would be padded); not supported")
        return {"resize": "shortest_edge_center_crop", "image_size": int(crop["height"]),
                "resize_size": int(size["shortest_edge"])}
    if set(size) == {"height", "width"}:
        if size["height"] != size["width"]:
            raise ConfigError(f"{where}: size {size!r} is not square; not supported")
        if crop is not None and crop["height"] != size["height"]:
            raise ConfigError(f"{where}: do_center_crop with crop_size {crop['height']} after resizing to "
                              f"{size['height']} is not supported")
        return {"resize": "squash", "image_size": int(size["height"])}
    raise ConfigError(f"{where}: size {size!r} is not supported (use shortest_edge, or height = width)")
