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
from functools import cached_property
from pathlib import Path as FilePath

import torch
from torch import nn

from modeconn.data import example_input
from modeconn.params.path import Path, State
from modeconn.units import UnitSpec, infer


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
    max_items: int | None = None  # the evaluation's cap on the data, so a bound and its check share data

    @cached_property
    def spec(self) -> UnitSpec:
        """The model's unit spec, inferred once per run (on first use) for every constructor that takes it."""
        return infer(self.model, example_input(self.data).to(self.device))

    def extras(self, name: str, accepted: Mapping) -> dict:
        """Run-level arguments a constructor accepts (``accepted``: its parameters), unless the config sets
        them; the unit spec is inferred only when one asks for it."""
        out = {"checkpoint_path": self.work_dir / f"{name}.pt", "resume": self.work_dir / f"{name}.pt",
               "device": self.device, "progress": self.progress, "max_items": self.max_items, "seed": self.seed}
        out = {k: v for k, v in out.items() if k in accepted}
        if "spec" in accepted:
            out["spec"] = self.spec
        return out


CONTEXT_KEYS = ("model", "theta_a", "theta_b", "data", "checkpoint_path", "resume", "device", "progress", "max_items",
                "spec", "callback")


@dataclass(frozen=True)
class Builder:
    """A constructor function, named by module and attribute (imported on first use)."""

    module: str
    attr: str
    reserved: tuple[str, ...] = CONTEXT_KEYS
    check: str | None = None     # the module's option check, called with every option (see check_options)
    needs_chain: bool = False    # the construction needs a plain chain of hidden layers (Kuditipudi et al.)

    @property
    def function(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.attr)

    def check_options(self, options: Mapping) -> None:
        """Run the constructor's own option checks on ``options`` (the config's) plus its defaults, before
        any work: the constructor calls the same function, so a config is refused exactly when the
        constructor would refuse it. Raises ``ValueError`` naming the option."""
        if self.check is None:
            return
        bound = inspect.signature(self.function).bind_partial(**options)
        bound.apply_defaults()
        check = getattr(importlib.import_module(self.module), self.check)
        accepted = inspect.signature(check).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        check(**{k: v for k, v in bound.arguments.items()
                 if k not in self.reserved and (takes_all or k in accepted)})

    def __call__(self, ctx: PathContext, name: str, options: Mapping) -> Path:
        kwargs = ctx.extras(name, inspect.signature(self.function).parameters)
        kwargs.update(options)
        return self.function(ctx.model, ctx.theta_a, ctx.theta_b, ctx.data, **kwargs)


BUILDERS: dict[str, Builder] = {
    "linear": Builder("modeconn.params.path", "linear_path"),
    "dropout": Builder("modeconn.paths.dropout", "dropout_path", check="check_dropout_options", needs_chain=True),
    "noise": Builder("modeconn.paths.noise", "noise_path", check="check_noise_options", needs_chain=True),
    "narrow": Builder("modeconn.paths.narrow", "narrow_path", check="check_narrow_options", needs_chain=True),
    "bezier": Builder("modeconn.paths.curve_fit", "fit_curve", check="check_curve_options"),
    "polychain": Builder("modeconn.paths.curve_fit", "fit_curve", check="check_curve_options"),
    "autoneb": Builder("modeconn.paths.autoneb", "autoneb", check="check_autoneb_options"),
}


def build_path(name: str, ctx: PathContext, options: Mapping | None = None) -> Path:
    """Run the constructor registered as ``name``; the path is named ``name``."""
    if name not in BUILDERS:
        raise KeyError(f"unknown path {name!r}; choose from {', '.join(BUILDERS)}")
    path = BUILDERS[name](ctx, name, options or {})
    path.name = name
    return path
