"""Validation of composed run configs: every error names the key and what is allowed."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path as FilePath

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """An invalid config value; the message names the key and the allowed values."""


def require(ok: bool, key: str, allowed: str, got) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {allowed}; got {got!r}")


def check_kwargs(key: str, options: Mapping, fn: Callable, reserved: tuple[str, ...] = ()) -> None:
    """Every key of ``options`` must be a keyword argument of ``fn`` (other than ``reserved``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = sorted(n for n, p in params.items() if n not in reserved and p.kind is not p.VAR_POSITIONAL)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"{key} has unknown option(s) {unknown}; allowed: {', '.join(allowed)}")


def to_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else dict(cfg)


def validate(cfg: DictConfig) -> None:
    """Check a composed run config before any work starts (raises :class:`ConfigError`)."""
    from modeconn.data import NAMES
    from modeconn.models import MODELS
    from modeconn.paths.registry import BUILDERS
    from modeconn.train import TrainConfig

    require(cfg.data.name in NAMES, "data.name", f"one of {', '.join(NAMES)}", cfg.data.name)
    require(cfg.model.name in MODELS, "model.name", f"one of {', '.join(MODELS)}", cfg.model.name)
    require(isinstance(cfg.seed, int) and cfg.seed >= 0, "seed", "a non-negative integer", cfg.seed)
    require(str(cfg.device) == "auto" or str(cfg.device).split(":")[0] in ("cpu", "cuda"), "device",
            "auto, cpu, cuda or cuda:N", cfg.device)
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
    paths = cfg.get("path") or {}
    require(isinstance(paths, (DictConfig, Mapping)) and len(paths) > 0, "path",
            f"a non-empty selection such as path=[linear,dropout] from {', '.join(BUILDERS)}", paths)
    for name, options in paths.items():
        require(name in BUILDERS, "path", f"chosen from {', '.join(BUILDERS)}", name)
        check_kwargs(f"path.{name}", to_container(options or {}), BUILDERS[name].function, BUILDERS[name].reserved)
    if cfg.get("endpoints") is not None:
        ends = list(cfg.endpoints)
        require(len(ends) == 2, "endpoints", "null or a list of two checkpoint files", ends)
        for end in ends:
            if not FilePath(str(end)).is_file():
                raise ConfigError(f"endpoints: checkpoint file {end!r} does not exist")
