"""Figures: loss and error against t for several paths on one figure, and the one atomic PNG writer.

A straight line's barrier can be a hundred times a constructed path's, which squashes every other curve
and the certified bound into the bottom of a linear axis; :func:`plot_paths` therefore adds the same train
loss on a log axis (``log_panel``), where the bound and the paths below it read at a glance.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path as FilePath

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from modeconn.io.checkpoint import atomic_write_bytes  # noqa: E402
from modeconn.evaluation.evaluate import PathEval  # noqa: E402

__all__ = ["save_figure", "plot_paths", "spans_decades", "LOG_PANEL"]

LOG_PANEL = "train_loss (log)"  # the name of the log-scale train loss panel


def save_figure(fig, out: str | FilePath, dpi: int = 120) -> FilePath:
    """Write ``fig`` as a PNG to ``out`` atomically (rendered in memory, then one atomic file write) and
    close it; a reader never sees a half-written image."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return atomic_write_bytes(FilePath(out), buf.getvalue())


def spans_decades(values, decades: float = 1.5) -> bool:
    """True when the positive finite ``values`` span more than ``decades`` powers of ten (a linear axis
    would flatten the small ones)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    return v.size > 1 and float(np.log10(v.max() / v.min())) > decades


def _log_limits(evals: Sequence[PathEval]) -> tuple[float, float]:
    vals = np.concatenate([np.asarray(e.metrics["train_loss"], float) for e in evals if "train_loss" in e.metrics]
                          + [np.asarray([e.bound], float) for e in evals if e.bound is not None])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if not vals.size:
        return 1e-4, 1.0
    return float(vals.min()) / 1.6, float(vals.max()) * 1.6


def plot_paths(evals: Sequence[PathEval], out: str | FilePath, title: str | None = None,
               panels: Sequence[str] = ("train_loss", LOG_PANEL, "test_error"), log_panel: str = "auto",
               bands: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> FilePath:
    """One PNG with a panel per metric (default train loss, train loss on a log axis, test error), a line
    per path. Knots of piecewise paths are dots; a path's theorem bound is a dashed line in its colour.

    ``log_panel``: ``"auto"`` keeps the log panel only when the train losses and bounds span more than
    1.5 decades, ``"always"`` / ``"never"`` force it. ``bands[path][metric]``: a standard deviation per
    point, drawn as a band around the line (the curves are then means over runs).
    """
    if log_panel not in ("auto", "always", "never"):
        raise ValueError(f"log_panel must be 'auto', 'always' or 'never', got {log_panel!r}")
    losses = [v for e in evals for v in e.metrics.get("train_loss", [])] + [e.bound for e in evals if e.bound is not None]
    want_log = log_panel == "always" or (log_panel == "auto" and spans_decades(losses))
    panels = [p for p in panels if (p == LOG_PANEL and want_log)
              or (p != LOG_PANEL and any(p in e.metrics for e in evals))]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        metric = "train_loss" if panel == LOG_PANEL else panel
        for i, ev in enumerate(evals):
            if metric not in ev.metrics:
                continue
            color = colors[i % len(colors)]
            ts, vals = np.asarray(ev.ts), np.asarray(ev.metrics[metric], dtype=float)
            ax.plot(ts, vals, color=color, lw=1.6, label=ev.name)
            std = (bands or {}).get(ev.name, {}).get(metric)
            if std is not None:
                lo, hi = vals - np.asarray(std), vals + np.asarray(std)
                if panel == LOG_PANEL:
                    lo = np.maximum(lo, vals / 10)
                ax.fill_between(ts, lo, hi, color=color, alpha=0.2, lw=0)
            if ev.info.get("pivots") and metric == "train_loss":  # AutoNEB's pivots (its knots), labelled
                ax.plot(ev.knots, np.interp(ev.knots, ts, vals), "D", color=color, ms=3.5, mfc="none",
                        label=f"{ev.name} pivots")
            elif len(ev.knots) > 2:
                ax.plot(ev.knots, np.interp(ev.knots, ts, vals), "o", color=color, ms=3)
            if metric == "train_loss" and ev.bound is not None:
                ax.axhline(ev.bound, color=color, ls="--", lw=1, label=f"{ev.name} bound")
        if panel == LOG_PANEL:
            ax.set_yscale("log")
            ax.set_ylim(*_log_limits(evals))
            ax.set_ylabel("train loss (log scale)")
            ax.grid(alpha=0.3, which="both")
        else:
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
        ax.set_xlabel("t")
        ax.set_xlim(0, 1)
    (axes[0][1] if panels[1:2] == [LOG_PANEL] else axes[0][0]).legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out)
