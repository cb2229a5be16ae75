"""Fully connected ReLU networks."""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256), bias: bool = True,
        dropout: float = 0.0, batch_norm: bool = False) -> nn.Sequential:
    """``Flatten, [Linear, BatchNorm1d if batch_norm, ReLU, Dropout(p) if p > 0] * len(hidden), Linear``.

    A plain ``nn.Sequential``: state-dict keys are ``"1.weight"``, ``"3.weight"``, ...
    ``hidden=()`` gives a linear model.
    """
    if isinstance(hidden, int):
        hidden = (hidden,)
    in_features = math.prod(int(s) for s in input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        layers.append(nn.Linear(in_features, int(width), bias=bias))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(width)))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = int(width)
    layers.append(nn.Linear(in_features, num_classes, bias=bias))
    return nn.Sequential(*layers)
