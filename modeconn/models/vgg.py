"""VGG networks for CIFAR-sized inputs, with the classifier of Garipov et al. (2018)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import image_shape, kaiming_conv_init, unflatten

# 'M' = MaxPool2d(2); numbers are conv output channels (before the width multiplier).
CONFIGS: dict[int, list] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

#: Per-conv-layer channel dropout of the VGG-11 used by Kuditipudi et al. (2019).
KUDITIPUDI_VGG11_CHANNEL_DROPOUT: tuple[float, ...] = (0.25,) * 3 + (0.5,) * 5


class VGG(nn.Module):
    """``features`` (conv stack) then ``classifier`` (Flatten, Dropout, Linear, ReLU, Dropout, Linear, ReLU,
    Linear). Keys look like ``features.0.weight`` and ``classifier.2.weight``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, unflatten_input: nn.Module | None = None):
        super().__init__()
        self.unflatten = unflatten_input
        self.features = features
        self.classifier = classifier

    def forward(self, x):
        if self.unflatten is not None:
            x = self.unflatten(x)
        return self.classifier(self.features(x))


def vgg(input_shape: Sequence[int], num_classes: int, depth: int = 16, batch_norm: bool = False,
        width: float = 1.0, channel_dropout: float | Sequence[float] | None = None, fc_dropout: float = 0.5,
        fc_width: int = 512) -> VGG:
    """VGG-``depth`` (11, 13, 16 or 19) for small images.

    Conv 3x3 / padding 1 / bias, optional BatchNorm2d, ReLU, optional ``nn.Dropout2d`` (``channel_dropout``: a
    float for every conv layer or one value per conv layer), MaxPool2d(2) at the 'M' positions except where it
    would shrink a spatial side below 1 (so 8x8 inputs work). Channels are scaled by ``width``. The classifier
    is Garipov's: Flatten, Dropout(fc_dropout), Linear(flat, fc_width), ReLU, Dropout, Linear(fc_width,
    fc_width), ReLU, Linear(fc_width, num_classes); dropout layers are omitted when ``fc_dropout == 0``.
    """
    if depth not in CONFIGS:
        raise ValueError(f"vgg: depth must be one of {sorted(CONFIGS)}, got {depth}")
    (c, h0, w0), flat = image_shape(input_shape, "vgg")
    h, w = h0, w0
    cfg = CONFIGS[depth]
    n_conv = sum(1 for v in cfg if v != "M")
    if channel_dropout is None:
        drops = [0.0] * n_conv
    elif isinstance(channel_dropout, (int, float)):
        drops = [float(channel_dropout)] * n_conv
    else:
        drops = [float(p) for p in channel_dropout]
        if len(drops) != n_conv:
            raise ValueError(f"vgg: channel_dropout has {len(drops)} entries, VGG-{depth} has {n_conv} conv layers")

    layers: list[nn.Module] = []
    in_ch, i_conv = c, 0
    for v in cfg:
        if v == "M":
            if h // 2 >= 1 and w // 2 >= 1:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            continue
        out_ch = max(1, int(round(v * width)))
        layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=True))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU())
        if drops[i_conv] > 0:
            layers.append(nn.Dropout2d(drops[i_conv]))
        in_ch, i_conv = out_ch, i_conv + 1
    features = nn.Sequential(*layers)

    was_training = features.training
    features.eval()
    with torch.no_grad():
        flat_dim = features(torch.zeros(1, c, h0, w0)).flatten(1).shape[1]
    features.train(was_training)

    def drop() -> list[nn.Module]:
        return [nn.Dropout(fc_dropout)] if fc_dropout > 0 else []

    classifier = nn.Sequential(
        nn.Flatten(), *drop(), nn.Linear(flat_dim, fc_width), nn.ReLU(),
        *drop(), nn.Linear(fc_width, fc_width), nn.ReLU(),
        nn.Linear(fc_width, num_classes),
    )
    model = VGG(features, classifier, unflatten((c, h0, w0)) if flat else None)
    kaiming_conv_init(model)
    return model
