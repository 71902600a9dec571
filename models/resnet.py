"""torchvision-style ResNet-18 / ResNet-50 with the CIFAR stem (3x3 stride-1 conv, no max-pool)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .normalize import Normalize
from .registry import register_model

DEFAULT_WIDTH = 64


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv, as in torchvision."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stages of widths w, 2w, 4w, 8w (times the block expansion) with strides 1, 2, 2, 2."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        width: int = DEFAULT_WIDTH,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.normalize = Normalize(in_channels, mean, std)
        self.in_planes = width
        # CIFAR stem: the 7x7/2 conv and max-pool of the ImageNet stem would shrink 32x32 (or 8x8) inputs too early.
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_stage(block, width, blocks_per_stage[0], stride=1)
        self.layer2 = self._make_stage(block, 2 * width, blocks_per_stage[1], stride=2)
        self.layer3 = self._make_stage(block, 4 * width, blocks_per_stage[2], stride=2)
        self.layer4 = self._make_stage(block, 8 * width, blocks_per_stage[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # fc keeps PyTorch's default Linear init, as upstream does.

    def _make_stage(self, block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out_planes = planes * block.expansion
        if stride != 1 or self.in_planes != out_planes:
            downsample = nn.Sequential(_conv1x1(self.in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = out_planes
        layers.extend(block(self.in_planes, planes) for _ in range(1, num_blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def resnet18(num_classes, in_channels=3, width=None, mean=None, std=None) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width or DEFAULT_WIDTH, mean, std)


@register_model
def resnet50(num_classes, in_channels=3, width=None, mean=None, std=None) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width or DEFAULT_WIDTH, mean, std)
