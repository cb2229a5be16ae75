"""The run config's value table: the type and range of every top-level, ``eval``, ``stability``, ``data`` and
``landscape`` key in one place, checked before any work (:func:`check_values`), plus the set of keys a run config may
have at the top level (:func:`check_keys`: ``+sed=3`` is refused, not ignored).

Each rule is ``(accepts(value) -> bool, "what is allowed")``; a value that fails is a
:class:`~modeconn.io.options.ConfigError` naming the dotted key, what is allowed and what was given. The
trainer's keys are checked by :meth:`~modeconn.training.train.TrainConfig.validate`, the model's and the
paths' against their builders' signatures and checks (:mod:`modeconn.run.config`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

from modeconn.io.options import ConfigError, to_container

Rule = tuple[Callable[[object], bool], str]
SEED_LIMIT = 2 ** 31  # endpoints use 2*seed and 2*seed+1, constructors seed+k: all stay within torch's int64 seeds


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(low: int, high: int | None = None, null: bool = False) -> Rule:
    span = f">= {low}" if high is None else f"in [{low}, {high}]"
    return ((lambda v: (null and v is None) or (_is_int(v) and v >= low and (high is None or v <= high))),
            ("null or " if null else "") + f"an integer {span}")


def boolean(null: bool = False) -> Rule:
    return (lambda v: (null and v is None) or isinstance(v, bool)), ("null, " if null else "") + "true or false"


def shape() -> Rule:
    return ((lambda v: isinstance(v, list) and 0 < len(v) <= 4 and all(_is_int(s) and s >= 1 for s in v)),
            "a non-empty list of at most 4 integers >= 1, e.g. [16] or [3,32,32]")


def text() -> Rule:
    return (lambda v: isinstance(v, str)), "a string"


def number(low: float, null: bool = False) -> Rule:
    return ((lambda v: (null and v is None) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and math.isfinite(v) and v >= low)),
            ("null or " if null else "") + f"a finite number >= {low:g}")


def file_list() -> Rule:
    return ((lambda v: v is None or (isinstance(v, list) and all(isinstance(f, str) and f for f in v))),
            "null or a list of checkpoint files, e.g. [a.pt,b.pt]")


def mapping(null: bool = False) -> Rule:
    return ((lambda v: (null and v is None) or isinstance(v, Mapping)),
            ("null or " if null else "") + "a mapping of options")


def fraction_list() -> Rule:
    return ((lambda v: isinstance(v, list) and all(isinstance(k, (int, float)) and not isinstance(k, bool)
                                                   and 0 < k <= 1 for k in v)), "a list of fractions in (0, 1]")


def conf_dir() -> str:
    """The shipped configs: ``modeconn/conf`` in an installed wheel, ``<repo>/conf`` in a source tree."""
    package = Path(__file__).resolve().parents[1]
    return str(package / "conf" if (package / "conf" / "config.yaml").is_file() else package.parent / "conf")


def cores() -> int:
    return os.cpu_count() or 1


@lru_cache(maxsize=1)
def _table() -> dict[str, Rule]:
    return {
        "name": text(),
        "seed": integer(0, SEED_LIMIT - 1),
        "progress": boolean(),
        "threads": integer(1, cores(), null=True),
        "allow_provenance_change": boolean(),
        "endpoints": file_list(),
        "eval.num_points": integer(2),
        "eval.batch_size": integer(1),
        "eval.max_items": integer(1, null=True),
        "eval.bn_items": integer(1),
        "eval.batched": boolean(),
        "stability.dropout_keep": fraction_list(),
        "stability.trials": integer(1),
        "stability.noise": boolean(),
        "stability.noise_items": integer(1),
        "stability.figure2": mapping(null=True),  # its keys: Figure2Options (checked by modeconn.run.config)
        "data.download": boolean(),
        "data.augment": boolean(),
        "data.normalize": boolean(),
        "data.path": (lambda v: v is None or isinstance(v, str), "null or a file name"),
        "data.image": boolean(null=True),
        "data.seed": integer(0),
        "data.split_seed": integer(0),
        "data.num_train": integer(1),
        "data.num_test": integer(1),
        "data.num_classes": integer(2),
        "data.input_shape": shape(),
        "landscape.minima": integer(2),  # modeconn landscape's options (its engines: modeconn.landscape.engines)
        "landscape.max_pairs": integer(1, null=True),
        "landscape.threshold": number(0),
    }


# sections whose keys are all in the table: another key there is a typo (``+eval.num_point=5``)
CLOSED_SECTIONS = ("eval", "stability")


def check_values(cfg) -> None:
    """Every key of the table that the config has, of its type and in its range (else ConfigError)."""
    values = to_container(cfg)
    for key, (accepts, allowed) in _table().items():
        section, _, leaf = key.rpartition(".")
        node = values.get(section) if section else values
        if not isinstance(node, Mapping) or leaf not in node:
            continue
        value = node[leaf]
        if not accepts(value):
            if key == "threads" and _is_int(value) and value > cores():
                allowed += f" (this machine has {cores()} cores)"
            raise ConfigError(f"{key} must be {allowed}; got {value!r}")
    for section in CLOSED_SECTIONS:
        node = values.get(section)
        if isinstance(node, Mapping):
            known = {k.split(".", 1)[1] for k in _table() if k.startswith(section + ".")}
            unknown = sorted(set(node) - known)
            if unknown:
                raise ConfigError(f"{section} has unknown option(s) {unknown}; allowed: {', '.join(sorted(known))}")


@lru_cache(maxsize=4)
def top_level_keys(conf_dir: str) -> frozenset[str]:
    """The keys a composed run config may have at the top level: the config groups (folders of
    ``conf_dir``) and the keys of its ``config.yaml``."""
    folder = Path(conf_dir)
    groups = {p.name for p in folder.iterdir() if p.is_dir() and p.name != "hydra"}
    base = OmegaConf.load(folder / "config.yaml")
    return frozenset(groups | {k for k in base if k not in ("defaults", "hydra")})


def check_keys(cfg, conf_dir: str) -> None:
    """No top-level key outside :func:`top_level_keys` (an added ``+sed=3`` would otherwise be ignored)."""
    known = top_level_keys(conf_dir)
    unknown = sorted(str(k) for k in cfg if str(k) not in known and str(k) != "hydra")
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown} (added with '+'?); allowed: {', '.join(sorted(known))}")


def finite_fraction(key: str, value) -> None:
    """A dropout-like model option: a number (or a list of numbers) in [0, 1), or null."""
    items = value if isinstance(value, list) else [value]
    for v in items:
        if v is None:
            continue
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 1):
            raise ConfigError(f"{key} must be a dropout rate in [0, 1) (or a list of them); got {value!r}")


def finite_numbers(key: str, value) -> None:
    """A model option that is a number (or a list of them) must be finite (``nan`` and ``inf`` are refused)."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in items):
        raise ConfigError(f"{key} must be a finite number; got {value!r}")
