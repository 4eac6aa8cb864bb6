"""Residual building blocks (plain torch.nn, traced through) shared by the predictor branches, the demo model
and the examples; below every other fxreduce module, like errors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """ResNet's block: two 3x3 Conv-BN pairs and a residual add; a strided 1x1 Conv-BN shortcut when the
    shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet (6n+2 layers): a 3x3 stem, three stages of ``blocks`` BasicBlocks at widths
    w, 2w, 4w (the last two halving the size), global pooling and a linear head; blocks=1 is ResNet-8,
    3 is ResNet-20. Global pooling lets it take any input size."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, blocks: int = 1, width: int = 16,
                 stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, channels = [], width
        for stage, stride in enumerate((1, 2, 2)):
            for block in range(blocks):
                layers.append(BasicBlock(channels, width * 2**stage, stride if block == 0 else 1))
                channels = width * 2**stage
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))
