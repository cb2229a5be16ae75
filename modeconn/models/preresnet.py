"""Pre-activation ResNets for CIFAR (He et al. 2016), laid out as in Garipov et al. (2018)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ._common import image_shape, kaiming_conv_init, unflatten


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the (projected when the shape changes) input."""
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        out_ch = planes * self.expansion
        self.downsample = (nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
                           if stride != 1 or in_ch != out_ch else None)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + residual


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4), plus the (projected) input."""
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU()
        out_ch = planes * self.expansion
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.downsample = (nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
                           if stride != 1 or in_ch != out_ch else None)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + residual


class PreResNet(nn.Module):
    """conv1 -> layer1..3 -> bn -> relu -> AdaptiveAvgPool2d(1) -> flatten -> fc."""

    def __init__(self, block: type[nn.Module], blocks_per_stage: int, num_classes: int, in_channels: int = 3,
                 width: float = 1.0, unflatten_input: nn.Module | None = None):
        super().__init__()
        chans = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.unflatten = unflatten_input
        self.conv1 = conv3x3(in_channels, chans[0])
        in_ch = chans[0]
        stages = []
        for i, planes in enumerate(chans):
            layers = []
            for j in range(blocks_per_stage):
                layers.append(block(in_ch, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)
        kaiming_conv_init(self)

    def forward(self, x):
        if self.unflatten is not None:
            x = self.unflatten(x)
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(self.flatten(self.avgpool(x)))


def preresnet(input_shape: Sequence[int], num_classes: int, depth: int = 20, width: float = 1.0,
              block: str | None = None) -> PreResNet:
    """PreResNet-``depth``: basic blocks, ``(depth-2)/6`` per stage (depth 20, 56, 110, ...), or bottleneck
    blocks (expansion 4), ``(depth-2)/9`` per stage (depth 164, ...). ``block=None`` picks basic blocks when
    ``(depth-2) % 6 == 0`` and ``depth < 164``, bottlenecks otherwise; pass ``block="bottleneck"`` for
    Garipov et al.'s PreResNet-110 (which uses 12 bottleneck blocks per stage). Base channels 16, 32, 64
    times ``width``.
    """
    (c, h, w), flat = image_shape(input_shape, "preresnet")
    if block is None:
        block = "basic" if (depth - 2) % 6 == 0 and depth < 164 else "bottleneck"
    if block == "basic":
        cls, per = BasicBlock, 6
    elif block == "bottleneck":
        cls, per = Bottleneck, 9
    else:
        raise ValueError(f"preresnet: block must be 'basic' or 'bottleneck', got {block!r}")
    if depth < 2 + per or (depth - 2) % per:
        raise ValueError(f"preresnet: with {block} blocks depth - 2 must be a positive multiple of {per}, got {depth}")
    return PreResNet(cls, (depth - 2) // per, num_classes, in_channels=c, width=width,
                     unflatten_input=unflatten((c, h, w)) if flat else None)
