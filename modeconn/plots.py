"""Figures: loss and error against t for several paths on one figure."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path as FilePath

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from modeconn.evaluate import PathEval  # noqa: E402


def plot_paths(evals: Sequence[PathEval], out: str | FilePath, title: str | None = None,
               panels: Sequence[str] = ("train_loss", "test_error")) -> FilePath:
    """One PNG with a panel per metric (default train loss and test error), a line per path.

    Knots of piecewise paths are marked with dots; a path's theorem bound is a dashed line in its colour.
    """
    panels = [p for p in panels if any(p in e.metrics for e in evals)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], panels):
        for i, ev in enumerate(evals):
            if metric not in ev.metrics:
                continue
            color = colors[i % len(colors)]
            ts, vals = np.asarray(ev.ts), np.asarray(ev.metrics[metric])
            ax.plot(ts, vals, color=color, lw=1.6, label=ev.name)
            if len(ev.knots) > 2:
                knot_vals = np.interp(ev.knots, ts, vals)
                ax.plot(ev.knots, knot_vals, "o", color=color, ms=3)
            if metric == "train_loss" and ev.bound is not None:
                ax.axhline(ev.bound, color=color, ls="--", lw=1, label=f"{ev.name} bound")
        ax.set_xlabel("t")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = FilePath(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
