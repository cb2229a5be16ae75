"""Reading the JSON and YAML files modeconn wrote (sidecars, summaries, provenance, run configs) so that a
damaged one is one clear error naming the file, never a traceback.

A file may be missing, not text, not JSON, nested too deep to parse (``RecursionError``), of the wrong
shape (``{"metrics": 5}``), or a YAML file with Python tags (``!!python/object``, refused by the safe
loader) or with a broken ``${...}`` interpolation: each is an :class:`UnreadableFileError` (a ``ValueError``)
saying what is wrong. Shapes are checked with a small description (:func:`check_shape`), so the code that uses
a value can trust its type and the keys it needs (:class:`Required`) are there.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["UnreadableFileError", "MissingFileError", "read_json", "read_yaml", "check_shape", "Required", "NUMBER",
           "OPTIONAL"]


class UnreadableFileError(ValueError):
    """A file modeconn reads is missing, truncated, corrupt, or holds more than weights (a pickle payload)."""


class MissingFileError(UnreadableFileError, FileNotFoundError):
    """A file modeconn reads does not exist (both an ``UnreadableFileError`` and a ``FileNotFoundError``)."""


NUMBER = (int, float)
OPTIONAL = type(None)


class Required:
    """In a ``{key: shape}`` description: the key must be present (other listed keys may be absent)."""

    def __init__(self, shape: Any) -> None:
        self.shape = shape


def _names(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {OPTIONAL: "null", bool: "true/false", int: "a number", float: "a number", str: "a string",
             dict: "an object", list: "a list"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def check_shape(value: Any, shape: Any, where: str = "") -> str | None:
    """The first place where ``value`` does not have ``shape`` (``"metrics: an object expected, got a
    number"``), or None.

    ``shape`` is a type or tuple of types (``bool`` is not a number), ``{key: shape}`` for an object whose
    listed keys, when present, have those shapes (``{key: Required(shape)}``: and must be present),
    ``{str: shape}`` for an object all of whose values do, or ``[shape]`` for a list of items of that shape.
    """
    if isinstance(shape, Required):
        shape = shape.shape
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where or 'the file'}: an object expected, got {_json_kind(value)}"
        if list(shape) == [str]:
            items = value.items()
            shape = {k: shape[str] for k in value}
        else:
            missing = [k for k, v in shape.items() if isinstance(v, Required) and k not in value]
            if missing:
                return f"{where + '.' if where else ''}{missing[0]}: missing"
            items = ((k, value[k]) for k in shape if k in value)
        for k, v in items:
            found = check_shape(v, shape[k], f"{where}.{k}" if where else str(k))
            if found:
                return found
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where or 'the file'}: a list expected, got {_json_kind(value)}"
        for i, v in enumerate(value):
            found = check_shape(v, shape[0], f"{where}[{i}]")
            if found:
                return found
        return None
    kinds = shape if isinstance(shape, tuple) else (shape,)
    if isinstance(value, bool) and bool not in kinds:
        return f"{where}: {_names(shape)} expected, got true/false"
    if not isinstance(value, kinds):
        return f"{where}: {_names(shape)} expected, got {_json_kind(value)}"
    return None


def read_json(path: str | os.PathLike, what: str, shape: Any = dict, hint: str = "") -> Any:
    """The JSON value in ``path``, checked against ``shape``; :class:`UnreadableFileError` naming the file
    (``what`` is its role, e.g. ``"run summary"``; ``hint`` ends the message, e.g. how to start over)."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"{what} not found: {path}") from None
    except UnicodeDecodeError:
        raise UnreadableFileError(f"{what} {path} is not text (random bytes or another format){tail}") from None
    except OSError as e:
        raise UnreadableFileError(f"{what} {path} cannot be read ({e.strerror or e}){tail}") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise UnreadableFileError(f"{what} {path} is nested too deeply to be read{tail}") from None
    except ValueError as e:
        raise UnreadableFileError(f"{what} {path} is not valid JSON ({e}){tail}") from None
    if (shape is dict or isinstance(shape, dict)) and not isinstance(value, dict):
        raise UnreadableFileError(f"{what} {path} holds a JSON {type(value).__name__}, not an object{tail}")
    problem = check_shape(value, shape)
    if problem:
        raise UnreadableFileError(f"{what} {path} has the wrong shape ({problem}){tail}")
    return value


def read_yaml(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """``OmegaConf.load(path)`` (a safe YAML loader: Python tags are refused, nothing is executed) with one
    :class:`UnreadableFileError` naming the file for every way it can fail; the result must be a mapping."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise MissingFileError(f"{what} not found: {path}") from None
    except RecursionError:
        raise UnreadableFileError(f"{what} {path} is nested too deeply to be read{tail}") from None
    except Exception as e:  # noqa: BLE001 - yaml's and OmegaConf's many error types: the file is bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = " (a Python tag: refused)" if "python/" in str(e) else ""
        raise UnreadableFileError(f"{what} {path} cannot be read{kind} ({first}){tail}") from None
    if not isinstance(cfg, (DictConfig, Mapping)):
        raise UnreadableFileError(f"{what} {path} holds {type(cfg).__name__}, not a mapping{tail}")
    try:  # every ${...} resolves (its users read resolved values)
        OmegaConf.to_container(cfg, resolve=True)
    except RecursionError:
        raise UnreadableFileError(f"{what} {path} is nested too deeply to be read{tail}") from None
    except Exception as e:  # noqa: BLE001 - OmegaConf's interpolation errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableFileError(f"{what} {path} cannot be read ({first}){tail}") from None
    return cfg
