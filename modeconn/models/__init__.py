"""Model zoo: ``build(name, input_shape, num_classes, **kw)``.

Every model is a plain ``nn.Module`` traceable by ``torch.fx`` (so ``modeconn.units.infer`` works on it).
Names: ``mlp``, ``convnet``, ``vgg`` (``vgg11``, ``vgg11_bn``, ``vgg11_dropout``, ``vgg16``, ``vgg16_bn``),
``preresnet`` (``preresnet20``, ``preresnet110``, ``preresnet164``). Presets are ``functools.partial``s, so
their keyword arguments can be overridden. ``from_options`` builds a config node: a zoo ``name`` or any
importable callable by ``_target_`` (:mod:`modeconn.models.custom`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

from torch import nn

from .convnet import convnet
from .custom import build_target, is_target, label
from .mlp import mlp
from .preresnet import PreResNet, preresnet
from .vgg import KUDITIPUDI_VGG11_CHANNEL_DROPOUT, VGG, vgg

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "convnet": convnet,
    "vgg": vgg,
    "vgg11": partial(vgg, depth=11),
    "vgg11_bn": partial(vgg, depth=11, batch_norm=True),
    # Kuditipudi et al. (2019): VGG-11 with channel-wise dropout after every conv layer.
    "vgg11_dropout": partial(vgg, depth=11, channel_dropout=list(KUDITIPUDI_VGG11_CHANNEL_DROPOUT)),
    "vgg16": partial(vgg, depth=16),
    "vgg16_bn": partial(vgg, depth=16, batch_norm=True),
    "preresnet": preresnet,
    "preresnet20": partial(preresnet, depth=20),
    "preresnet110": partial(preresnet, depth=110),
    "preresnet164": partial(preresnet, depth=164),
}


def build(name: str, input_shape: tuple[int, ...], num_classes: int, **kw) -> nn.Module:
    """Build model ``name`` (a key of ``MODELS``; case, '-' and '_' are ignored) for inputs of
    per-example shape ``input_shape``; ``kw`` go to the builder."""
    return _builder(name)(tuple(int(s) for s in input_shape), int(num_classes), **kw)


def from_options(options: Mapping, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a model config node: ``{"name": zoo name, **builder options}`` or ``{"_target_": dotted path,
    **keyword arguments}`` (the data's ``num_classes`` / ``input_shape`` filled in where the callable takes them)."""
    if is_target(options):
        return build_target(options, input_shape, num_classes)
    kw = {k: v for k, v in options.items() if k != "name"}
    return build(options["name"], input_shape, num_classes, **kw)


def takes_images(name: str) -> bool:
    """Whether model ``name`` is convolutional, i.e. reads its inputs as images (every model but the MLP).
    Data that can come either way (the 8x8 digits) is loaded as images for these; a ``_target_`` (dotted
    path) counts as convolutional (set ``data.image=false`` for a network on flat vectors)."""
    if "." in str(name):
        return True
    builder = _builder(name)
    return getattr(builder, "func", builder) is not mlp


def _builder(name: str) -> Callable[..., nn.Module]:
    norm = {_normalize(k): k for k in MODELS}
    key = norm.get(_normalize(name))
    if key is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[key]


def _normalize(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


__all__ = ["build", "from_options", "is_target", "label", "takes_images", "MODELS", "mlp", "convnet", "vgg", "preresnet", "VGG", "PreResNet",
           "KUDITIPUDI_VGG11_CHANNEL_DROPOUT"]
