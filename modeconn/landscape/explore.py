"""Explore the landscape of many minima: ask the engines, run the proposed pairs, merge, ask again.

Everything lives under one folder: ``minima.json`` (the minima's names and own losses), ``plan.json`` (the
settings and every round's proposed pairs, written before the round runs), ``pairs/<a>__<b>/`` (one run
directory per pair, :mod:`modeconn.landscape.edges`), and the results ``landscape.json`` (the best path per
pair) and ``landscapes/<label>.json`` (one per constructor). Rerunning after an interruption or a killed
job continues where it stopped: finished pairs are read back, planned ones that did not finish are
resumed first (engine ``unfinished``), and because every round's proposal is on file before it runs, a
resumed exploration proposes exactly the pairs an uninterrupted one does.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path as FilePath

import torch
from torch import nn

from modeconn.evaluation.evaluate import evaluate_path
from modeconn.io.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from modeconn.io.jsonfile import Required, UnreadableFileError, read_json
from modeconn.io.options import dotted_keys
from modeconn.landscape.edges import (check_names, edge_records, is_finished, pair_dir, path_labels, run_pair)
from modeconn.landscape.engines import Pair, check_engines, propose
from modeconn.landscape.graph import Landscape
from modeconn.params.path import linear

log = logging.getLogger("modeconn")
PLAN, MINIMA = "plan.json", "minima.json"


def minimum_losses(model: nn.Module, thetas: Mapping[str, Mapping], data, *, max_items: int | None = None,
                   bn_items: int = 2048, device: str | torch.device = "auto") -> dict[str, float]:
    """Each minimum's train loss, evaluated exactly as a path's endpoint is (same data cap, statistics)."""
    out = {}
    for name, theta in thetas.items():
        ev = evaluate_path(model, linear(theta, theta), data, ts=[0.0, 1.0], max_items=max_items, bn_items=bn_items,
                           device=device, name=name, progress=False)
        out[name] = float(ev.metrics["train_loss"][0])
    return out


_NUM = (int, float, type(None))  # a loss (null: not finite)
#: what ``plan.json`` and ``minima.json`` must hold (:func:`modeconn.io.jsonfile.check_shape`)
PLAN_SHAPE = {"settings": Required(dict), "rounds": Required([{"engine": str, "pairs": Required([[str]])}])}
MINIMA_SHAPE = {"names": Required([str]), "losses": Required({str: _NUM}), "files": {str: str}, "sha256": {str: str}}


def _read_json(file: FilePath, what: str, shape) -> dict:
    return read_json(file, f"landscape {what}", shape, hint="choose a new out_dir (hydra.run.dir) or delete the file")


def read_minima(out_dir: str | FilePath) -> dict | None:
    """``minima.json`` of the exploration in ``out_dir`` (:data:`MINIMA_SHAPE`), or None before it is written."""
    file = FilePath(out_dir) / MINIMA
    return _read_json(file, "minima file", MINIMA_SHAPE) if file.exists() else None


def check_settings(out_dir: str | FilePath, settings: Mapping) -> None:
    """Refuse (``ValueError`` naming the keys) to continue an exploration made with other settings."""
    _load_plan(FilePath(out_dir), settings)


def _load_plan(out_dir: FilePath, settings: Mapping) -> dict:
    """The plan on file (its settings must equal ``settings``: ValueError naming the differences) or a new one."""
    settings = json.loads(json.dumps(settings, default=str))  # as read back from the file (tuples -> lists)
    file = out_dir / PLAN
    if not file.exists():
        return {"settings": dict(settings), "rounds": []}
    plan = _read_json(file, "plan", PLAN_SHAPE)
    if any(len(pair) != 2 for rnd in plan["rounds"] for pair in rnd["pairs"]):
        raise UnreadableFileError(f"landscape plan {file} has the wrong shape (a pair that is not two names)")
    old, new = dotted_keys(plan["settings"]), dotted_keys(settings)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise ValueError(f"landscape {out_dir} was explored with other settings ({', '.join(changed)} differ); "
                         "use the same settings to continue it, or choose a new out_dir")
    return plan


def _planned(plan: Mapping) -> list[Pair]:
    seen: dict[Pair, None] = {}
    for rnd in plan["rounds"]:
        for a, b in rnd["pairs"]:
            seen.setdefault((a, b))
    return list(seen)


def exploration_loop(out_dir: str | FilePath, names: Sequence[str], losses: Mapping[str, float],
                     run_pairs: Callable[[list[Pair]], None], *, engines: Sequence[str], max_pairs: int | None,
                     settings: Mapping) -> Landscape:
    """Ask ``engines`` for pairs, hand them to ``run_pairs`` (which must leave each one finished), merge,
    repeat until no engine proposes a pair or ``max_pairs`` pairs are finished. Resumable (see the module
    docstring); ``settings`` (JSON-able) are what the pairs' results depend on: a rerun with others is refused.
    Returns the landscape of the best path per pair (results also written under ``out_dir``)."""
    out_dir = FilePath(out_dir)
    engines = check_engines(list(engines))
    if max_pairs is not None and (not isinstance(max_pairs, int) or isinstance(max_pairs, bool) or max_pairs < 1):
        raise ValueError(f"max_pairs must be null or a positive integer; got {max_pairs!r}")
    plan = _load_plan(out_dir, settings)
    while True:
        planned = _planned(plan)
        finished = [p for p in planned if is_finished(out_dir, *p)]
        pending = [p for p in planned if p not in finished]
        budget = math.inf if max_pairs is None else max_pairs - len(finished)
        if budget <= 0:
            break
        ls = Landscape.from_edges(names, losses, edge_records(out_dir, finished))
        engine, pairs = propose(ls, engines, {frozenset(p) for p in planned}, pending)
        if not pairs:
            break
        if engine != "unfinished":
            plan["rounds"].append({"engine": engine, "pairs": [list(p) for p in pairs]})
            atomic_write_json(out_dir / PLAN, plan)
        batch = pairs[: int(min(budget, len(pairs)))]
        log.info("landscape: %s proposes %s", engine, ", ".join(f"{a}-{b}" for a, b in batch))
        run_pairs(batch)
        left = [p for p in batch if not is_finished(out_dir, *p)]
        if left:
            raise RuntimeError(f"landscape: pair(s) {left} did not finish; see {pair_dir(out_dir, *left[0])}")
    return write_landscapes(out_dir, names, losses, [p for p in _planned(plan) if is_finished(out_dir, *p)],
                            dict(settings))


def write_landscapes(out_dir: FilePath, names: Sequence[str], losses: Mapping[str, float], pairs: Sequence[Pair],
                     info: Mapping) -> Landscape:
    """``landscapes/<label>.json`` for every constructor and ``landscape.json`` for the best path per pair
    (the one constructor's landscape when there is one); returns the latter."""
    labels = path_labels(out_dir, pairs)
    for label in labels:
        ls = Landscape.from_edges(names, losses, edge_records(out_dir, pairs, label), label, info)
        atomic_write_bytes(out_dir / "landscapes" / f"{label}.json", ls.to_json().encode())
    best = Landscape.from_edges(names, losses, edge_records(out_dir, pairs), labels[0] if len(labels) == 1 else None,
                                info)
    atomic_write_bytes(out_dir / "landscape.json", best.to_json().encode())
    return best


def _states(model: nn.Module, thetas: Mapping) -> dict[str, dict]:
    out = {}
    for name, theta in thetas.items():
        if isinstance(theta, Mapping):
            out[str(name)] = dict(theta)
        else:  # a checkpoint file: read weights-only and checked against the model
            out[str(name)] = load_checkpoint(FilePath(theta), model=model)[0]
    return out


def explore(model: nn.Module, thetas: Mapping, data, *, constructor: str = "autoneb", options: Mapping | None = None,
            engines: Sequence[str] = ("unfinished", "disconnected", "mst"), max_pairs: int | None = None,
            out_dir: str | FilePath | None = None, progress: bool = True, align: Mapping | str | None = None,
            num_points: int = 61, max_items: int | None = None, bn_items: int = 2048,
            device: str | torch.device = "auto", seed: int = 0) -> Landscape:
    """Connect the minima ``thetas`` (name -> state dict or checkpoint file) pair by pair with ``constructor``
    (a CLI path name: ``linear``, ``bezier``, ``polychain``, ``autoneb``, ``dropout``, ...; its keyword
    ``options``), as the ``engines`` propose, until none proposes a pair or ``max_pairs`` are done.

    Each pair is evaluated with ``evaluate_path`` (``num_points``, ``max_items``, ``bn_items``) in its own
    folder under ``out_dir`` (a new temporary folder when None); a rerun with the same ``out_dir`` and
    settings continues an interrupted exploration. ``align="weights"`` (or an ``align`` config mapping)
    also builds every path to the aligned second minimum (label ``"<constructor> (aligned)"``). Returns the
    :class:`Landscape` of the best path per pair; ``out_dir/landscapes/<label>.json`` holds each label's.
    """
    names = check_names(list(thetas))
    out_dir = FilePath(tempfile.mkdtemp(prefix="modeconn-landscape-") if out_dir is None else out_dir)
    align = {"method": align} if isinstance(align, str) else (None if align is None else dict(align))
    states = _states(model, thetas)
    settings = {"names": names, "constructor": constructor, "options": dict(options or {}), "align": align,
                "num_points": num_points, "max_items": max_items, "bn_items": bn_items, "seed": seed}
    out_dir.mkdir(parents=True, exist_ok=True)
    _load_plan(out_dir, settings)  # refuse other settings before any work
    minima_file = out_dir / MINIMA
    if minima_file.exists():
        losses = read_minima(out_dir)["losses"]
    else:
        started = time.time()
        losses = minimum_losses(model, states, data, max_items=max_items, bn_items=bn_items, device=device)
        atomic_write_json(minima_file, {"names": names, "losses": losses, "seconds": time.time() - started})

    def run_pairs(pairs: list[Pair]) -> None:
        for a, b in pairs:
            run_pair(model, states[a], states[b], data, out_dir, a, b, constructor=constructor, options=options,
                     align=align, num_points=num_points, max_items=max_items, bn_items=bn_items, device=device,
                     seed=seed, progress=progress)

    ls = exploration_loop(out_dir, names, losses, run_pairs, engines=engines, max_pairs=max_pairs, settings=settings)
    ls.info["out_dir"] = str(out_dir)
    return ls
