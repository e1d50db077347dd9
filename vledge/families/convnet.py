"""vledge's own plain 3x3 conv stack (``VisionConfig.widths``): cheap on CPUs, quantizes well to int8."""

from __future__ import annotations

from pathlib import Path

from vledge.errors import WeightsError
from vledge.families.base import VisionFamily


class ConvNetFamily(VisionFamily):
    name = "convnet"
    output = "grid"

    def backbone(self, config):
        from vledge.models.vision import ConvNet

        module = ConvNet(config.widths, config.patch_shortcut)
        return module, module.out_channels

    def parameter_count(self, config) -> int:
        count, cin = 0, 3
        for width in config.widths:
            count += 9 * cin * width + 9 * width * width + 4 * width
            cin = width
        return count

    def load_pretrained(self, backbone, config, path) -> None:
        if path is None:
            raise WeightsError("the convnet backbone has no torchvision pretrained weights; pass a weights file")
        from vledge.models.vision import load_state_file

        load_state_file(backbone, Path(path), self.name, self.torchvision_names)

    @staticmethod
    def torchvision_names(state: dict) -> dict:
        return state


FAMILY = ConvNetFamily()
