"""Helpers shared by the model builders."""
from __future__ import annotations

import math

from torch import nn


def image_shape(input_shape, name: str) -> tuple[tuple[int, int, int], bool]:
    """Return ``((C, H, W), needs_unflatten)`` for a convolutional model.

    A 3-D ``input_shape`` is used as is. A 1-D one whose length is a perfect square (e.g. ``(64,)`` for the
    8x8 digits) is read as a one-channel square image and ``needs_unflatten`` is True: the model then starts
    with an ``nn.Unflatten`` so that it accepts flat inputs.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return shape, False  # type: ignore[return-value]
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side == shape[0]:
            return (1, side, side), True
    raise ValueError(f"{name}: input_shape must be (C, H, W) (or (H*W,) for a square one-channel image), "
                     f"got {shape}")


def unflatten(chw: tuple[int, int, int]) -> nn.Unflatten:
    return nn.Unflatten(1, chw)


def kaiming_conv_init(module: nn.Module) -> None:
    """Garipov et al.'s initialisation: conv weights N(0, 2/n) with n = k*k*out_channels, zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
