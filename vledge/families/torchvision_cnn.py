"""torchvision classifiers without their pooling and head (resnet18, mobilenet_v3_small, efficientnet_b0).

One family per backbone, all in this module: they differ only in how the body is cut out of the classifier,
its feature width and how the classifier's tensor names map onto the body's. Pretrained weights come from a
local file or torchvision's own cache; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vledge.families.base import VisionFamily


class TorchvisionFamily(VisionFamily):
    output = "grid"
    width: ClassVar[int]

    def backbone(self, config):
        from vledge.models.vision import torchvision_classifier

        return self.body_of(torchvision_classifier(self.name)), self.width

    def body_of(self, classifier):
        """The classifier without its pooling and head: its ``features`` module."""
        return classifier.features

    def torchvision_names(self, state: dict) -> dict:
        """A classifier's state dict -> the body's names (the body is the classifier's ``features``)."""
        return {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}

    def load_pretrained(self, backbone, config, path) -> None:
        from vledge.models.vision import cached_torchvision_state, load_state_dict_into, load_state_file

        if path is not None:
            load_state_file(backbone, Path(path), self.name, self.torchvision_names)
        else:
            state = cached_torchvision_state(self.name, config.pretrained)
            load_state_dict_into(backbone, state, config.pretrained, self.name, self.torchvision_names)


class ResNet18Family(TorchvisionFamily):
    name = "resnet18"
    width = 512
    # the classifier's modules kept, in the order the body holds them
    body: ClassVar[tuple[str, ...]] = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

    def body_of(self, classifier):
        from torch import nn

        return nn.Sequential(*(getattr(classifier, name) for name in self.body))

    def torchvision_names(self, state: dict) -> dict:
        mapped = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head in self.body:
                mapped[f"{self.body.index(head)}.{rest}"] = value
        return mapped


class MobileNetV3SmallFamily(TorchvisionFamily):
    name = "mobilenet_v3_small"
    width = 576


class EfficientNetB0Family(TorchvisionFamily):
    name = "efficientnet_b0"
    width = 1280


FAMILIES = {family.name: family for family in (ResNet18Family(), MobileNetV3SmallFamily(), EfficientNetB0Family())}
