"""One pair of minima as one run directory, and the edge records read back from it.

Every pair ``a``, ``b`` (in ``names`` order) lives in ``<out_dir>/pairs/<a>__<b>/``, laid out as an ordinary
``modeconn`` run: ``summary.json`` (written last: its presence means finished), ``paths/<label>.json`` (the
profile of every path built, :class:`~modeconn.evaluation.evaluate.PathEval`) and ``work/`` (constructor
checkpoints, so an interrupted pair resumes). The CLI fills these directories with ordinary runs launched
through Hydra; :func:`run_pair` fills them in-process; :func:`pair_edges` reads either.
"""
from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path as FilePath

import torch
from torch import nn

from modeconn.align.step import align_endpoints, path_variants
from modeconn.data import resolve_device
from modeconn.evaluation.evaluate import PathEval, evaluate_path
from modeconn.io.checkpoint import atomic_write_json
from modeconn.io.jsonfile import Required, read_json
from modeconn.params.checks import check_path_losses
from modeconn.params.state import float_state
from modeconn.paths.registry import PathContext, build_path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PAIRS = "pairs"


def check_names(names: Sequence[str], key: str = "thetas") -> list[str]:
    """Names of minima usable as folder names: letters, digits, ``_ . -``, no ``__``, unique, at least 2."""
    names = [str(n) for n in names]
    bad = [n for n in names if not NAME.match(n) or "__" in n]
    if bad:
        raise ValueError(f"{key}: names of minima may hold letters, digits, '_', '.', '-' (no '__'); got {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"{key}: names of minima must be unique; got {names}")
    if len(names) < 2:
        raise ValueError(f"{key}: a landscape needs at least 2 minima; got {len(names)}")
    return names


def pair_name(a: str, b: str) -> str:
    return f"{a}__{b}"


def pair_dir(out_dir: str | FilePath, a: str, b: str) -> FilePath:
    return FilePath(out_dir) / PAIRS / pair_name(a, b)


def is_finished(out_dir: str | FilePath, a: str, b: str) -> bool:
    return (pair_dir(out_dir, a, b) / "summary.json").is_file()


def pair_edges(out_dir: str | FilePath, a: str, b: str) -> dict[str, dict]:
    """Every path of a finished pair, by label: ``{"max_loss", "barrier", "t_saddle", "path_file", "path"}``
    (``path_file`` relative to ``out_dir``); ``{}`` while the pair is not finished."""
    folder = pair_dir(out_dir, a, b)
    if not (folder / "summary.json").is_file():
        return {}
    summary = read_pair(folder)
    out = {}
    for label, entry in sorted(summary["paths"].items()):
        loss = entry["barriers"]["train_loss"]
        out[label] = {"max_loss": loss["max"], "barrier": loss["epsilon"], "t_saddle": loss["argmax_t"],
                      "path_file": f"{PAIRS}/{pair_name(a, b)}/paths/{label}.json", "path": label}
    return out


_NUMBER = Required((int, float))
#: what a pair's ``summary.json`` must hold for its edges (:func:`modeconn.io.jsonfile.check_shape`)
PAIR_SHAPE = {"paths": Required({str: {"barriers": Required({"train_loss": Required(
    {"max": _NUMBER, "epsilon": _NUMBER, "argmax_t": _NUMBER})})}})}


def read_pair(folder: str | FilePath) -> dict:
    """A finished pair's ``summary.json`` (:data:`PAIR_SHAPE`; else one error naming the file)."""
    return read_json(FilePath(folder) / "summary.json", "landscape pair summary", PAIR_SHAPE,
                     hint=f"delete {folder} to run the pair again")


def edge_records(out_dir: str | FilePath, pairs: Sequence[tuple[str, str]], path: str | None = None) -> list[dict]:
    """The edges of the finished ``pairs``: the path labelled ``path``, or (``path=None``) the path with the
    lowest maximum loss of each pair (the best construction represents the pair, as in Draxler et al.)."""
    out = []
    for a, b in pairs:
        edges = pair_edges(out_dir, a, b)
        if path is not None:
            chosen = edges.get(path)
        else:
            chosen = min(edges.values(), key=lambda e: (e["max_loss"], e["path"]), default=None)
        if chosen is not None:
            out.append({"a": a, "b": b, **chosen})
    return out


def path_labels(out_dir: str | FilePath, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Every path label found in the finished pairs, in first-seen order."""
    seen: dict[str, None] = {}
    for a, b in pairs:
        for label in pair_edges(out_dir, a, b):
            seen.setdefault(label)
    return list(seen)


def load_profile(out_dir: str | FilePath, edge: Mapping) -> PathEval:
    """The :class:`PathEval` profile behind an edge record."""
    return PathEval.load(FilePath(out_dir) / edge["path_file"])


def run_pair(model: nn.Module, theta_a: Mapping, theta_b: Mapping, data, out_dir: str | FilePath, a: str, b: str, *,
             constructor: str, options: Mapping | None = None, align: Mapping | None = None, num_points: int = 61,
             max_items: int | None = None, bn_items: int = 2048, device: str | torch.device = "auto",
             seed: int = 0, progress: bool = True) -> dict:
    """Build ``constructor`` (a :data:`~modeconn.paths.registry.BUILDERS` name) from ``a`` to ``b``, evaluate it,
    and write the pair's directory (``summary.json`` last). A finished pair is returned as it is; an
    interrupted one resumes from its constructor's checkpoints in ``work/``. Returns the summary."""
    folder = pair_dir(out_dir, a, b)
    if (folder / "summary.json").is_file():
        return read_pair(folder)
    started = time.time()
    dev = resolve_device(device)
    model = model.to(dev)
    th_a, th_b = (float_state({k: v.to(dev) for k, v in th.items()}) for th in (theta_a, theta_b))
    ctx = PathContext(model=model, theta_a=th_a, theta_b=th_b, data=data, device=dev, work_dir=folder / "work",
                      progress=progress, seed=seed, max_items=max_items)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    alignment = align_endpoints(align, ctx)
    paths = {}
    for name, opts, label, path_ctx, finish in path_variants([(constructor, options)], ctx, align, alignment):
        t0 = time.time()
        path = finish(build_path(name, path_ctx, dict(opts or {})))
        built = time.time() - t0
        ev = evaluate_path(model, path, data, num_points=num_points, max_items=max_items, bn_items=bn_items,
                           device=dev, name=label, progress=progress)
        check_path_losses(ev)
        ev.info["build_seconds"] = built
        ev.save(folder / "paths")
        paths[label] = {"barriers": ev.barriers, "bound": ev.bound, "within_bound": ev.within_bound,
                        "segments": len(ev.knots) - 1, "seconds": ev.seconds}
    summary = {"finished": True, "pair": [a, b], "constructor": constructor, "seconds": time.time() - started,
               "paths": paths}
    atomic_write_json(folder / "summary.json", summary)
    return summary
