"""VGG16-BN (configuration D) for small images, with the upstream three-layer 256-unit head."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .normalize import Normalize
from .registry import register_model

DEFAULT_WIDTH = 64
# Channel counts at the default width; "M" = 2x2 max-pool. Four pools only: no pool after the last block.
VGG16_CONFIG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
HEAD_HIDDEN = 256


def _scaled(channels: int, width: int) -> int:
    return max(1, channels * width // DEFAULT_WIDTH)


class VGG(nn.Module):
    def __init__(
        self,
        config: Sequence[int | str],
        num_classes: int,
        in_channels: int = 3,
        width: int = DEFAULT_WIDTH,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.normalize = Normalize(in_channels, mean, std)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                # ceil_mode keeps a 1x1 map at 1x1 (8x8 digits reach 1x1 after three pools); same as floor for 32x32.
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                out_channels = _scaled(int(item), width)
                layers += [
                    nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        hidden = _scaled(HEAD_HIDDEN, width)
        self.classifier = nn.Sequential(
            nn.Linear(channels * 2 * 2, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def classifier_layer(self) -> nn.Linear:
        """The last Linear (the one boundary-expanding unlearning replaces)."""
        return self.classifier[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@register_model
def vgg16_bn(num_classes, in_channels=3, width=None, mean=None, std=None) -> VGG:
    return VGG(VGG16_CONFIG, num_classes, in_channels, width or DEFAULT_WIDTH, mean, std)
