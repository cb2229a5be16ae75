"""The all-convolutional MNIST network of Kuditipudi et al. (2019)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ._common import image_shape, unflatten


def convnet(input_shape: Sequence[int], num_classes: int, width: int = 32, depth: int = 3, bias: bool = False,
            channel_dropout: float = 0.0) -> nn.Sequential:
    """``depth`` conv layers of ``width`` 3x3 filters (stride 1, padding 1, no pooling), ReLU after each
    (and ``nn.Dropout2d(channel_dropout)`` when > 0), then ``Flatten`` and ``Linear(width*H*W, num_classes)``.

    Kuditipudi et al. use width 32, depth 3 and no biases. A plain ``nn.Sequential``; a flat square
    ``input_shape`` such as ``(64,)`` gets a leading ``nn.Unflatten`` (which shifts the key indices by one).
    """
    (c, h, w), flat = image_shape(input_shape, "convnet")
    layers: list[nn.Module] = [unflatten((c, h, w))] if flat else []
    in_ch = c
    for _ in range(depth):
        layers += [nn.Conv2d(in_ch, width, 3, stride=1, padding=1, bias=bias), nn.ReLU()]
        if channel_dropout > 0:
            layers.append(nn.Dropout2d(channel_dropout))
        in_ch = width
    layers += [nn.Flatten(), nn.Linear(in_ch * h * w, num_classes, bias=bias)]
    return nn.Sequential(*layers)
