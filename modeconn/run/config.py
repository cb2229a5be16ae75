"""Validation of composed run configs: every error names the key and what is allowed."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path as FilePath

from omegaconf import DictConfig

from modeconn.io.options import ConfigError, check_kwargs, option_error, require, to_container

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

    options = {k: v for k, v in to_container(cfg.model).items() if k != "name"}
    builder = MODELS[cfg.model.name]
    check_kwargs("model", options, builder, reserved=("input_shape", "num_classes"))
    params = inspect.signature(builder).parameters
    for key, value in options.items():
        default = params[key].default if key in params else None
        require(default is inspect.Parameter.empty or default is None or _like(default, value), f"model.{key}",
                _describe_like(default), value)


def validate(cfg: DictConfig) -> None:
    """Check a composed run config before any work starts (raises :class:`ConfigError`)."""
    from modeconn.data import NAMES
    from modeconn.models import MODELS
    from modeconn.paths.registry import BUILDERS
    from modeconn.training.train import TrainConfig

    to_container(cfg)  # every interpolation resolves (an error names its key)
    require(cfg.data.name in NAMES, "data.name", f"one of {', '.join(NAMES)}", cfg.data.name)
    require(cfg.model.name in MODELS, "model.name", f"one of {', '.join(MODELS)}", cfg.model.name)
    require(isinstance(cfg.seed, int) and cfg.seed >= 0, "seed", "a non-negative integer", cfg.seed)
    require(str(cfg.device) == "auto" or str(cfg.device).split(":")[0] in ("cpu", "cuda"), "device",
            "auto, cpu, cuda or cuda:N", cfg.device)
    if str(cfg.device).startswith("cuda"):
        import torch

        require(torch.cuda.is_available(), "device", "auto or cpu on this machine (no CUDA device)", cfg.device)
    check_model(cfg)
    threads = cfg.get("threads")
    require(threads is None or (isinstance(threads, int) and threads >= 1), "threads", "null or a positive integer", threads)
    try:
        TrainConfig(**to_container(cfg.trainer)).validate()
    except TypeError as e:
        raise ConfigError(f"trainer: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("trainer.") else f"trainer: {e}") from None
    ev = cfg.eval
    require(isinstance(ev.num_points, int) and ev.num_points >= 2, "eval.num_points", "an integer >= 2", ev.num_points)
    require(isinstance(ev.batch_size, int) and ev.batch_size >= 1, "eval.batch_size", "a positive integer", ev.batch_size)
    require(ev.max_items is None or (isinstance(ev.max_items, int) and ev.max_items >= 1), "eval.max_items",
            "null or a positive integer", ev.max_items)
    require(isinstance(ev.bn_items, int) and ev.bn_items >= 1, "eval.bn_items", "a positive integer", ev.bn_items)
    st = cfg.get("stability") or {}
    for keep in st.get("dropout_keep") or []:
        require(isinstance(keep, (int, float)) and 0 < keep <= 1, "stability.dropout_keep", "fractions in (0, 1]", keep)
    require(isinstance(st.get("trials", 20), int) and st.get("trials", 20) >= 1, "stability.trials",
            "a positive integer", st.get("trials"))
    require(isinstance(st.get("noise_items", 256), int) and st.get("noise_items", 256) >= 1, "stability.noise_items",
            "a positive integer", st.get("noise_items"))
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
    if cfg.get("endpoints") is not None:
        ends = list(cfg.endpoints)
        require(len(ends) == 2, "endpoints", "null or a list of two checkpoint files", ends)
        for end in ends:
            if not FilePath(str(end)).is_file():
                raise ConfigError(f"endpoints: checkpoint file {end!r} does not exist")
