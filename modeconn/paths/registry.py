"""The path constructors the CLI can run, by name: ``path=[linear,dropout,...]``.

Each entry maps a config group ``path/<name>.yaml`` to an API function; the config's keys are that
function's keyword arguments (validated against its signature), and the run supplies the model, the two
endpoints and the training data.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path as FilePath

import torch
from torch import nn

from modeconn.paths.base import Path, State


@dataclass
class PathContext:
    """What a run hands every constructor."""

    model: nn.Module
    theta_a: State
    theta_b: State
    data: object                 # the run's training data (a modeconn Dataset)
    device: torch.device
    work_dir: FilePath           # where a constructor may keep checkpoints (resumable work)
    progress: bool = True
    seed: int = 0


@dataclass(frozen=True)
class Builder:
    module: str
    attr: str
    reserved: tuple[str, ...] = ("model", "theta_a", "theta_b", "data")
    extra: Callable[[PathContext], dict] | None = None

    @property
    def function(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.attr)

    def __call__(self, ctx: PathContext, options: Mapping) -> Path:
        kwargs = dict(options)
        if self.extra is not None:
            accepted = inspect.signature(self.function).parameters
            kwargs.update({k: v for k, v in self.extra(ctx).items() if k in accepted and k not in kwargs})
        if self.attr == "linear":
            return self.function(ctx.theta_a, ctx.theta_b)
        return self.function(ctx.model, ctx.theta_a, ctx.theta_b, ctx.data, **kwargs)


def _curve_extras(kind: str) -> Callable[[PathContext], dict]:
    def extras(ctx: PathContext) -> dict:
        return {"checkpoint_path": ctx.work_dir / f"{kind}.curve.pt", "device": ctx.device,
                "progress": ctx.progress, "seed": ctx.seed}
    return extras


def _device_extras(ctx: PathContext) -> dict:
    return {"device": ctx.device}


BUILDERS: dict[str, Builder] = {
    "linear": Builder("modeconn.paths.base", "linear", reserved=("theta_a", "theta_b")),
    "dropout": Builder("modeconn.paths.dropout", "dropout_path"),
    "noise": Builder("modeconn.paths.noise", "noise_path"),
    "narrow": Builder("modeconn.paths.noise", "narrow_path",
                      reserved=("model", "theta_a", "theta_b", "data", "checkpoint_path", "device", "progress"),
                      extra=lambda ctx: {"checkpoint_path": ctx.work_dir / "narrow.pt", "device": ctx.device,
                                         "progress": ctx.progress}),
    "bezier": Builder("modeconn.paths.curves", "fit_curve",
                      reserved=("model", "theta_a", "theta_b", "data", "checkpoint_path", "device", "progress"),
                      extra=_curve_extras("bezier")),
    "polychain": Builder("modeconn.paths.curves", "fit_curve",
                         reserved=("model", "theta_a", "theta_b", "data", "checkpoint_path", "device", "progress"),
                         extra=_curve_extras("polychain")),
}


def build_path(name: str, ctx: PathContext, options: Mapping | None = None) -> Path:
    """Run the constructor registered as ``name``; the path is named ``name``."""
    if name not in BUILDERS:
        raise KeyError(f"unknown path {name!r}; choose from {', '.join(BUILDERS)}")
    path = BUILDERS[name](ctx, options or {})
    path.name = name
    return path
