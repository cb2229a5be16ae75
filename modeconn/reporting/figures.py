"""Redraw the figures of several finished runs as one: ``modeconn report RUN_DIR... --figures OUT_DIR``.

* ``figure2.png``: the runs' Figure 2 trials pooled (:func:`modeconn.stability.figure2.pool_figure2`), mean ±
  std over every trial of every run;
* ``paths.png``: every path's train loss and test error averaged over the runs (on the first run's grid of t),
  a band of one standard deviation, the mean bound dashed, the log-scale panel when losses span decades.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path as FilePath

import numpy as np

from modeconn.evaluation.evaluate import PathEval
from modeconn.reporting.plots import plot_paths
from modeconn.reporting.plots_stability import plot_figure2
from modeconn.stability.figure2 import RESULT_SHAPE, pool_figure2
from modeconn.io.checkpoint import atomic_write_json
from modeconn.io.jsonfile import read_json

__all__ = ["redraw", "mean_paths"]


def _runs(dirs: Sequence[str | FilePath], marker: str) -> list[FilePath]:
    found: list[FilePath] = []
    for d in dirs:
        p = FilePath(d)
        if not p.exists():
            raise FileNotFoundError(f"no run directory at {d}")
        found += [p] if (p / marker).exists() else sorted(f.parent for f in p.rglob(marker))
    return found


def mean_paths(runs: Sequence[FilePath]) -> tuple[list[PathEval], dict[str, dict[str, list[float]]]]:
    """Per path name, the mean PathEval over the runs (metrics interpolated onto the first run's ts) and
    the standard deviation of every metric per point."""
    groups: dict[str, list[PathEval]] = defaultdict(list)
    for run in runs:
        for file in sorted((run / "paths").glob("*.json")):
            ev = PathEval.load(file)
            groups[ev.name].append(ev)
    means, bands = [], {}
    for name, evs in groups.items():
        ts = np.asarray(evs[0].ts)
        metrics, std = {}, {}
        for metric in evs[0].metrics:
            stack = np.stack([np.interp(ts, e.ts, e.metrics[metric]) for e in evs if metric in e.metrics])
            metrics[metric], std[metric] = stack.mean(0).tolist(), stack.std(0).tolist()
        bounds = [e.bound for e in evs if e.bound is not None]
        means.append(PathEval(name=f"{name} (n={len(evs)})" if len(evs) > 1 else name, ts=ts.tolist(),
                              metrics=metrics, steps=evs[0].steps, knots=evs[0].knots, labels=evs[0].labels,
                              segments=evs[0].segments, bound=float(np.mean(bounds)) if bounds else None,
                              barriers={}, sizes=evs[0].sizes, seconds=0.0))
        bands[means[-1].name] = std
    return means, bands


def redraw(dirs: Sequence[str | FilePath], out_dir: str | FilePath) -> list[FilePath]:
    """Write ``figure2.png`` / ``figure2.json`` and ``paths.png`` for the runs in (or below) ``dirs`` into
    ``out_dir``; returns the files written (none for a figure no run has)."""
    out, written = FilePath(out_dir), []
    fig2_runs = _runs(dirs, "figure2.json")
    if fig2_runs:
        pooled = pool_figure2([read_json(r / "figure2.json", "Figure 2 results", RESULT_SHAPE) for r in fig2_runs],
                              names=[r.name for r in fig2_runs])
        written += [atomic_write_json(out / "figure2.json", pooled),
                    plot_figure2(pooled, out / "figure2.png",
                                 title=f"Figure 2: mean ± std over {len(pooled['seeds'])} trials of {len(fig2_runs)} run(s)")]
    path_runs = [r for r in _runs(dirs, "summary.json") if (r / "paths").is_dir()]
    if path_runs:
        means, bands = mean_paths(path_runs)
        if means:
            written.append(plot_paths(means, out / "paths.png", bands=bands,
                                      title=f"mean ± std over {len(path_runs)} run(s)"))
    return written
