"""Option values and their errors, shared by every stage that reads a config: :class:`ConfigError` (the
exit-2 error of the CLI; its message names the key), ``require``, ``check_kwargs``, ``option_error``,
``to_container`` and ``dotted_keys``."""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Collection, Mapping

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


def dotted_keys(node: Mapping, prefix: str = "") -> dict:
    """Nested settings as dotted keys (``{"trainer.lr": 0.05, ...}``; an empty mapping stays one key), so a
    refusal to reuse files made with other settings can name the key that changed."""
    out = {}
    for key, value in node.items():
        if isinstance(value, Mapping) and value:
            out.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def option_error(key: str, error: ValueError, options: Collection[str]) -> ConfigError:
    """A constructor's ``ValueError`` as a config error naming the full key: ``keep must be ...`` under
    ``path.dropout`` reads ``path.dropout.keep must be ...``; a message that names one of ``options`` (those
    the config sets first) elsewhere reads ``path.dropout.keep: ...``; any other gets ``path.dropout: ...``."""
    text = str(error)
    if text.split(" ", 1)[0] in options:
        return ConfigError(f"{key}.{text}")
    named = [o for o in options if re.search(rf"(?<![\w.]){re.escape(o)}(?![\w(])", text)]
    return ConfigError(f"{key}.{named[0]}: {text}" if named else f"{key}: {text}")
