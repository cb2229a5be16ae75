"""The user's own network: any importable callable that returns an ``nn.Module``, by its dotted path.

A model config node is either a zoo node (``name: vgg`` plus the builder's options) or a *target* node
(``_target_: torchvision.models.resnet18`` plus the callable's keyword arguments), built with
``hydra.utils.instantiate``. The run's data supplies ``num_classes`` and ``input_shape`` when the callable
names them as parameters and the config does not set them, and ``num_classes`` also when it takes
``**kwargs`` and accepts it there (torchvision's and timm's builders). A module that is neither installed nor on the
path is looked up from the working directory too (``model._target_=my_pkg.nets.Net`` next to ``my_pkg/``).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["TARGET", "is_target", "locate", "target_kwargs", "build_target", "label"]

TARGET = "_target_"
_FROM_DATA = ("num_classes", "input_shape")


def is_target(options: Mapping) -> bool:
    """Whether a model config node names a callable (``_target_``) rather than a zoo model (``name``)."""
    return options.get(TARGET) is not None


def label(options: Mapping) -> str:
    """A model node's name for reports: the zoo name, or the target's dotted path."""
    return str(options[TARGET]) if is_target(options) else str(options.get("name"))


def locate(target: str) -> Callable[..., Any]:
    """The callable at dotted path ``target``; imported from the working directory when it is not importable
    otherwise. Raises ``ValueError`` naming ``model._target_`` and why the import failed."""
    from hydra.utils import get_object

    if not isinstance(target, str) or "." not in target:
        raise ValueError(f"model._target_ must be a dotted path such as torchvision.models.resnet18; got {target!r}")
    try:
        found = get_object(target)
    except Exception as first:  # noqa: BLE001 - hydra wraps ImportError and AttributeError alike
        cwd = os.getcwd()
        if cwd in sys.path or "" in sys.path:
            raise ValueError(f"model._target_ {target!r} cannot be imported ({_reason(first)}){_hint(target)}") from None
        sys.path.append(cwd)  # the working directory, as `python -m` would have it; after installed packages
        importlib.invalidate_caches()
        try:
            found = get_object(target)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"model._target_ {target!r} cannot be imported ({_reason(err)}){_hint(target)}") from None
    if not callable(found):
        raise ValueError(f"model._target_ {target!r} is a {type(found).__name__}, not a class or function")
    return found


def _reason(err: BaseException) -> str:
    cause = err.__cause__ or err
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def _hint(target: str) -> str:
    top = target.split(".")[0]
    if top == "timm":
        return "; timm is optional: pip install timm"
    return f"; install {top} or run from the folder that holds it"


def _parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return {}


def target_kwargs(fn: Callable, options: Mapping, input_shape: tuple[int, ...], num_classes: int) -> dict:
    """The keyword arguments ``fn`` is called with: the config's, plus ``num_classes`` / ``input_shape`` from
    the data where ``fn`` names them and the config leaves them out."""
    kw = {k: v for k, v in options.items() if k not in (TARGET, "name")}
    params = _parameters(fn)
    fill = {"num_classes": int(num_classes), "input_shape": tuple(int(s) for s in input_shape)}
    for key in _FROM_DATA:
        if key in params and key not in kw:
            kw[key] = fill[key]
    return kw


def build_target(options: Mapping, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Instantiate a target node for data of per-example ``input_shape`` and ``num_classes`` classes.

    Raises ``ValueError`` when the target cannot be imported, refuses its arguments (the callable's own
    message) or does not return an ``nn.Module``.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = options[TARGET]
    fn = locate(target)
    kw = target_kwargs(fn, options, input_shape, num_classes)
    attempts = [kw]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(fn).values())
    if takes_any and "num_classes" not in kw:  # torchvision's and timm's builders pass it on through **kwargs
        attempts.insert(0, {**kw, "num_classes": int(num_classes)})
    for i, args in enumerate(attempts):
        try:
            model = instantiate({TARGET: target, **args}, _convert_="all")
            break
        except (InstantiationException, TypeError, ValueError, RuntimeError) as e:
            if i + 1 < len(attempts) and "num_classes" in _reason(e):
                continue  # its **kwargs do not take num_classes after all: build it as configured
            raise ValueError(_reason(e)) from None  # the caller names the model and its options
    if not isinstance(model, nn.Module):
        raise ValueError(f"model._target_ {target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
