"""Vision encoders: a CNN feature grid flattened into visual tokens."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vledge.config import VIT_FAMILIES, VisionConfig
from vledge.errors import ConfigError, WeightsError

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


def _torchvision_backbone(name: str) -> tuple[nn.Module, int]:
    """A torchvision classifier without its pooling and head, and its feature width."""
    import torchvision.models as tvm

    if name == "resnet18":
        net = tvm.resnet18(weights=None)
        body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        return body, 512
    if name == "mobilenet_v3_small":
        return tvm.mobilenet_v3_small(weights=None).features, 576
    if name == "efficientnet_b0":
        return tvm.efficientnet_b0(weights=None).features, 1280
    raise WeightsError(f"no torchvision backbone named {name!r}")


class VisionEncoder(nn.Module):
    """pixel_values [B, 3, H, W] -> visual tokens [B, rows*cols, channels] in reading order."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.is_vit = config.backbone in VIT_FAMILIES
        if self.is_vit:
            from vledge.models.vit import VisionTransformer

            self.backbone = VisionTransformer(config.vit)
            self.out_channels = self.backbone.out_features
        elif config.backbone == "convnet":
            self.backbone: nn.Module = ConvNet(config.widths, config.patch_shortcut)
            self.out_channels = self.backbone.out_channels
        else:
            self.backbone, self.out_channels = _torchvision_backbone(config.backbone)
        self.pool = nn.AdaptiveAvgPool2d(config.token_grid) if config.token_grid else nn.Identity()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.is_vit:
            return self.backbone(pixel_values)
        grid = self.pool(self.backbone(pixel_values))
        return grid.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def num_tokens(self, image_size: int) -> int:
        if self.is_vit:
            if image_size != self.config.vit.image_size:
                raise ConfigError(f"the preprocessing image_size {image_size} differs from the vision transformer's "
                                  f"{self.config.vit.image_size}")
            return self.backbone.num_tokens
        was_training = self.training
        self.eval()
        tokens = self(torch.zeros(1, 3, image_size, image_size)).shape[1]
        self.train(was_training)
        return tokens


def load_vision_weights(encoder: VisionEncoder, path: str | Path | None = None) -> None:
    """Pretrained backbone weights from a local file, or torchvision's named weights already cached.

    Nothing is ever downloaded: an offline machine without the file gets a clear error at once.
    """
    config = encoder.config
    if path is not None and Path(path).is_dir():  # a Hugging Face CLIP / SigLIP folder (--vision-model)
        if not encoder.is_vit:
            raise WeightsError(f"{path} is a folder: a Hugging Face vision tower needs a clip/siglip backbone "
                               "(vledge train --vision-model PATH)")
        from vledge.hf.vision import load_tower_weights

        load_tower_weights(encoder.backbone, path)
        log.info("loaded the vision tower from %s", path)
        return
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"vision weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"cannot read vision weights {path}: {exc}") from None
    elif config.pretrained:
        if config.backbone == "convnet":
            raise WeightsError("the convnet backbone has no torchvision pretrained weights; pass a weights file")
        state = _cached_torchvision_state(config.backbone, config.pretrained)
    else:
        return
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    _load_backbone_state(encoder, state, source=str(path or config.pretrained))


def _cached_torchvision_state(backbone: str, weights_name: str) -> dict:
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
    return torch.load(cached, map_location="cpu", weights_only=True)


def _load_backbone_state(encoder: VisionEncoder, state: dict, source: str) -> None:
    """Accept either a full classifier state dict (keys of torchvision's model) or our backbone's own keys."""
    target = encoder.backbone
    own_keys = set(target.state_dict())
    if own_keys & set(state):
        mapped = state
    else:
        mapped = _map_torchvision_keys(encoder.config.backbone, state)
    missing, unexpected = target.load_state_dict({k: v for k, v in mapped.items() if k in own_keys}, strict=False)
    if len(missing) == len(own_keys):
        raise WeightsError(f"vision weights {source} match none of the {encoder.config.backbone} backbone's tensors")
    if missing:
        log.warning("vision weights %s left %d backbone tensors at their initial values", source, len(missing))
    log.info("loaded vision weights from %s", source)


def _map_torchvision_keys(backbone: str, state: dict) -> dict:
    if backbone == "resnet18":
        order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        mapped = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head in order:
                mapped[f"{order.index(head)}.{rest}"] = value
        return mapped
    # mobilenet_v3_small / efficientnet_b0: the backbone is the classifier's `features` module
    return {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
