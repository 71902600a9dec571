"""CIFAR ResNet of He et al. (2016, section 4.2): 3 stages, option-A (parameter-free) shortcuts."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .normalize import Normalize
from .registry import register_model

DEFAULT_WIDTH = 16


class SubsampleZeroPadShortcut(nn.Module):
    """Option A: keep every second pixel and zero-pad the new channels (split evenly before/after), no parameters."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        self.pad_before = extra // 2
        self.pad_after = extra - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last dimensions first: (W left, W right, H top, H bottom, C before, C after).
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class CifarBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = SubsampleZeroPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Depth 6n + 2: stem conv, 3 stages of n blocks (widths w, 2w, 4w; strides 1, 2, 2), global average pool, fc."""

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int,
        in_channels: int = 3,
        width: int = DEFAULT_WIDTH,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.normalize = Normalize(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.in_planes = width
        self.layer1 = self._make_stage(width, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(2 * width, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(4 * width, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (num_blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def resnet20s(num_classes, in_channels=3, width=None, mean=None, std=None) -> CifarResNet:
    return CifarResNet(3, num_classes, in_channels, width or DEFAULT_WIDTH, mean, std)
