"""The vision encoder: a family's backbone (vledge.families) whose feature grid or tokens become visual tokens."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vledge.config import VisionConfig
from vledge.errors import WeightsError
from vledge.families import vision_family

log = logging.getLogger(__name__)


def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvNet(nn.Module):
    """Plain 3x3 conv stages, each halving the grid: cheap on CPUs and quantizes well to int8.

    ``patch_shortcut`` adds a linear embedding of each raw pixel patch to its token (as a ViT's
    patch embedding would): trained from scratch on several tasks at once, the conv stack alone
    tends to keep only what the easiest task needs (where objects are) and lose colour.
    """

    def __init__(self, widths: tuple[int, ...], patch_shortcut: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for width in widths:
            layers += [conv_bn_relu(cin, width, 2), conv_bn_relu(width, width, 1)]
            cin = width
        self.layers = nn.Sequential(*layers)
        stride = 2 ** len(widths)
        self.patch = nn.Conv2d(3, cin, kernel_size=stride, stride=stride) if patch_shortcut else None
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.layers(x)
        if self.patch is not None:
            features = features + self.patch(x)
        return features


def torchvision_classifier(name: str) -> nn.Module:
    """torchvision's classifier ``name`` with no weights (its family cuts the body out: vledge.families)."""
    import torchvision.models as tvm

    return getattr(tvm, name)(weights=None)


class VisionEncoder(nn.Module):
    """pixel_values [B, 3, H, W] -> visual tokens [B, tokens, channels] in reading order.

    The backbone comes from its family (``vledge.families``): a feature grid (pooled to ``token_grid`` if set,
    then flattened) or tokens the backbone makes itself.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.family = vision_family(config.backbone)
        self.makes_tokens = self.family.output == "tokens"
        self.backbone, self.out_channels = self.family.backbone(config)
        self.pool = nn.AdaptiveAvgPool2d(config.token_grid) if config.token_grid else nn.Identity()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.makes_tokens:
            return self.backbone(pixel_values)
        grid = self.pool(self.backbone(pixel_values))
        return grid.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def num_tokens(self, image_size: int) -> int:
        known = self.family.num_tokens(self.config, image_size)
        if known is not None:
            return known
        was_training = self.training
        self.eval()
        tokens = self(torch.zeros(1, 3, image_size, image_size)).shape[1]
        self.train(was_training)
        return tokens


def load_vision_weights(encoder: VisionEncoder, path: str | Path | None = None) -> None:
    """Pretrained backbone weights from a local file or folder, or the family's named weights already cached.

    Nothing is ever downloaded: an offline machine without the file gets a clear error at once.
    """
    config = encoder.config
    if path is None and not config.pretrained:
        return
    encoder.family.load_pretrained(encoder.backbone, config, path)


def load_state_file(backbone: nn.Module, path: Path, backbone_name: str, rename) -> None:
    """Backbone weights from a torch file: the backbone's own names, or its classifier's (``rename`` maps them)."""
    if path.is_dir():
        raise WeightsError(f"{path} is a folder: a Hugging Face vision tower needs a clip/siglip backbone "
                           "(vledge train --vision-model PATH)")
    if not path.is_file():
        raise WeightsError(f"vision weights file not found: {path}")
    from vledge.torch_io import require_safe_torch

    require_safe_torch()  # weights_only=True is no protection before torch 2.6
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read vision weights {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    load_state_dict_into(backbone, state, str(path), backbone_name, rename)


def cached_torchvision_state(backbone: str, weights_name: str) -> dict:
    import torchvision.models as tvm

    try:
        weights = tvm.get_model_weights(backbone)[weights_name]
    except (KeyError, ValueError):
        raise WeightsError(f"torchvision has no weights {weights_name!r} for {backbone}") from None
    filename = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        raise WeightsError(
            f"{backbone} weights {weights_name} are not in the torch cache ({cached}); vledge does not download "
            f"at run time: fetch the file once on a connected machine or pass --vision-weights PATH"
        )
    from vledge.torch_io import require_safe_torch

    require_safe_torch()
    return torch.load(cached, map_location="cpu", weights_only=True)


def load_state_dict_into(target: nn.Module, state: dict, source: str, backbone_name: str, rename) -> None:
    """Accept either a full classifier state dict (``rename`` maps its keys) or the backbone's own keys."""
    own_keys = set(target.state_dict())
    mapped = state if own_keys & set(state) else rename(state)
    missing, unexpected = target.load_state_dict({k: v for k, v in mapped.items() if k in own_keys}, strict=False)
    if len(missing) == len(own_keys):
        raise WeightsError(f"vision weights {source} match none of the {backbone_name} backbone's tensors")
    if missing:
        log.warning("vision weights %s left %d backbone tensors at their initial values", source, len(missing))
    log.info("loaded vision weights from %s", source)
