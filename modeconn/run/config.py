"""Validation of composed run configs: every error names the key and what is allowed."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path as FilePath

from omegaconf import DictConfig, OmegaConf

from modeconn.io.options import ConfigError, check_kwargs, option_error, require, to_container
from modeconn.run.schema import check_keys, check_values, conf_dir, finite_fraction, finite_numbers

__all__ = ["ConfigError", "validate", "check_kwargs", "option_error", "require", "to_container"]


def _like(default, value) -> bool:
    """Whether ``value`` has the type of a builder's ``default`` (sizes: integers >= 1)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)) and all(isinstance(d, int) for d in default):
        items = value if isinstance(value, (list, tuple)) else [value]
        return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items)
    return True


def _describe_like(default) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    return "a list of integers >= 1"


def check_model(cfg: DictConfig) -> None:
    """``model.*``: known options of the chosen builder, each of the type of the builder's default."""
    from modeconn.models import MODELS
    from modeconn.models.custom import TARGET, is_target, locate

    if OmegaConf.is_missing(cfg.model, "_target_"):  # model=custom without model._target_=...
        raise ConfigError("model._target_ must name your network's class or function, e.g. "
                          "model._target_=torchvision.models.resnet18 +model.num_classes=10")
    node = to_container(cfg.model)
    if is_target(node):  # the user's own callable: importable, and its keyword arguments known to it
        zoo = [k for k in node if k not in (TARGET, "name")] if node.get("name") in MODELS else []
        require(not zoo, "model._target_", f"set with model=custom (the {node.get('name')} node's options {zoo} are "
                "not the target's)", node[TARGET])
        try:
            fn = locate(node[TARGET])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            check_kwargs("model", {k: v for k, v in node.items() if k not in (TARGET, "name")}, fn)
        except ConfigError as e:
            raise ConfigError(f"{e} (model._target_={node[TARGET]}; use model=custom for your own network)") from None
        except (TypeError, ValueError):  # a builtin without a signature: its own call checks the arguments
            pass
        return
    options = {k: v for k, v in node.items() if k != "name"}
    builder = MODELS[cfg.model.name]
    check_kwargs("model", options, builder, reserved=("input_shape", "num_classes"))
    params = inspect.signature(builder).parameters
    for key, value in options.items():
        default = params[key].default if key in params else None
        require(default is inspect.Parameter.empty or default is None or _like(default, value), f"model.{key}",
                _describe_like(default), value)
        finite_numbers(f"model.{key}", value)  # model.dropout=nan is refused, not run
        if key.endswith("dropout"):
            finite_fraction(f"model.{key}", value)


def validate(cfg: DictConfig) -> None:
    """Check a composed run config before any work starts (raises :class:`ConfigError`)."""
    from modeconn.data import NAMES
    from modeconn.models import MODELS
    from modeconn.paths.registry import BUILDERS
    from modeconn.training.train import TrainConfig

    to_container(cfg)  # every interpolation resolves (an error names its key)
    require(cfg.data.name in NAMES, "data.name", f"one of {', '.join(NAMES)}", cfg.data.name)
    if "_target_" not in cfg.model.keys():  # a zoo model (a target node, set or not, is checked by check_model)
        require(cfg.model.get("name") in MODELS, "model.name",
                f"one of {', '.join(MODELS)} (or model=custom model._target_=your.module.Net)", cfg.model.get("name"))
    check_keys(cfg, conf_dir())  # an added top-level '+key' is refused, not ignored
    check_values(cfg)  # the value table: seed, threads, progress, eval.*, stability.*, data.* (modeconn.run.schema)
    require(str(cfg.device) == "auto" or str(cfg.device).split(":")[0] in ("cpu", "cuda"), "device",
            "auto, cpu, cuda or cuda:N", cfg.device)
    if str(cfg.device).startswith("cuda"):
        import torch

        require(torch.cuda.is_available(), "device", "auto or cpu on this machine (no CUDA device)", cfg.device)
    check_model(cfg)
    try:
        TrainConfig(**to_container(cfg.trainer)).validate()
    except TypeError as e:
        raise ConfigError(f"trainer: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("trainer.") else f"trainer: {e}") from None
    from modeconn.align.step import check_options

    try:
        check_options(to_container(cfg.align) if cfg.get("align") is not None else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    paths = cfg.get("path") or {}
    require(isinstance(paths, (DictConfig, Mapping)) and len(paths) > 0, "path",
            f"a non-empty selection such as path=[linear,dropout] from {', '.join(BUILDERS)}", paths)
    for name, options in paths.items():
        require(name in BUILDERS, "path", f"chosen from {', '.join(BUILDERS)}", name)
        options = to_container(options or {})
        check_kwargs(f"path.{name}", options, BUILDERS[name].function, BUILDERS[name].reserved)
        try:
            BUILDERS[name].check_options(options)  # the constructor's own checks, before any training
        except ValueError as e:
            known = [*options, *inspect.signature(BUILDERS[name].function).parameters]
            raise option_error(f"path.{name}", e, known) from None
    figure2 = (cfg.get("stability") or {}).get("figure2")
    if figure2 is not None:  # Kuditipudi et al. Figure 2's options, checked before the endpoints are trained
        from modeconn.stability.figure2 import Figure2Options

        try:
            Figure2Options.from_dict(to_container(figure2))
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e) if str(e).startswith(("stability.", "unknown")) else f"stability.figure2: {e}"
                              ) from None
    if cfg.get("endpoints") is not None:
        ends = list(cfg.endpoints)
        require(len(ends) == 2, "endpoints", "null or a list of two checkpoint files", ends)
        for end in ends:
            if not FilePath(str(end)).is_file():
                raise ConfigError(f"endpoints: checkpoint file {end!r} does not exist")
