"""Figures of stability measurements: noise stability (Kuditipudi et al. 2019, Figure 3 left and App. D.3),
an endpoint's dropout stability against the kept fraction, and Figure 2's three panels over trials.

:func:`plot_noise_stability` draws one histogram per (quantity, layer) over the measured data points:
rows are the layer cushion, the minimal interlayer cushion, the activation contraction and the
interlayer smoothness; columns are the layers A_1..A_d.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path as FilePath

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from modeconn.reporting.plots import save_figure, spans_decades  # noqa: E402

__all__ = ["plot_noise_stability", "plot_dropout_stability", "plot_figure2", "QUANTITIES"]

#: (attribute of NoiseStability, row label)
QUANTITIES: tuple[tuple[str, str], ...] = (
    ("cushion", "layer cushion $\\mu_i$"),
    ("interlayer_min", "min. interlayer cushion $\\mu_{i\\to}$"),
    ("contraction", "activation contraction"),
    ("smoothness", "interlayer smoothness $\\rho_i$"),
)


def plot_noise_stability(result, out_png: str | FilePath, layers: Sequence[int] | None = None,
                         bins: int = 30, title: str | None = None, dpi: int = 110) -> FilePath:
    """Write a grid of histograms of ``result`` (a :class:`modeconn.kuditipudi.noise_result.NoiseStability`).

    ``layers``: 1-based layer numbers to show (default all). Undefined cells (contraction of the output
    layer, smoothness of layers 1 and d) are left empty with a note; infinite values (e.g. smoothness of a
    layer that acts linearly on the data) are not binned, their count is written in the panel. Positive values
    spanning decades get log-spaced bins on a log axis. The median is a dashed line. The PNG is written
    atomically.
    """
    d = int(result.d)
    cols = list(layers) if layers is not None else list(range(1, d + 1))
    if not cols or any(not 1 <= c <= d for c in cols):
        raise ValueError(f"layers must be 1-based layer numbers in 1..{d}, got {cols}")
    nrow, ncol = len(QUANTITIES), len(cols)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.3 * ncol + 0.8, 1.9 * nrow + 0.6), squeeze=False)
    for r, (attr, label) in enumerate(QUANTITIES):
        arrays = getattr(result, attr)
        for c, layer in enumerate(cols):
            ax = axes[r][c]
            values = arrays[layer - 1] if layer - 1 < len(arrays) else None
            if r == 0:
                name = result.layers[layer - 1] if getattr(result, "layers", None) else str(layer)
                ax.set_title(f"layer {layer}\n({name})", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            if values is None:
                ax.text(0.5, 0.5, "not defined", ha="center", va="center", fontsize=7, color="0.5",
                        transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            v = np.asarray(values, dtype=np.float64).reshape(-1)
            finite = v[np.isfinite(v)]
            n_inf = int(np.isinf(v).sum())
            if finite.size:
                lo, hi = float(finite.min()), float(finite.max())
                if not hi > lo:
                    pad = max(abs(lo) * 1e-3, 1e-9)
                    lo, hi = lo - pad, hi + pad
                if lo > 0 and spans_decades(finite):  # log-spaced bins: the small values get their own bars
                    ax.hist(finite, bins=np.geomspace(lo, hi, bins + 1), color="C0", alpha=0.8)
                    ax.set_xscale("log")
                else:
                    ax.hist(finite, bins=bins, range=(lo, hi), color="C0", alpha=0.8)
                ax.axvline(float(np.median(finite)), color="k", ls="--", lw=0.8)
            notes = []
            if n_inf:
                notes.append(f"{n_inf} inf")
            if v.size - finite.size - n_inf:
                notes.append(f"{v.size - finite.size - n_inf} nan")
            if notes:
                ax.text(0.97, 0.95, ", ".join(notes), ha="right", va="top", fontsize=7, color="C3",
                        transform=ax.transAxes)
    eps = getattr(result, "epsilon", math.nan)
    head = title if title is not None else (
        f"noise stability: d={d}, h_min={result.h_min}, {result.num_points} points, "
        f"epsilon={eps:.3g}, c={result.c:.3g}, rho={result.rho:.3g}")
    fig.suptitle(head, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi)


def _log_if_decades(ax, values) -> None:
    """A log y axis when ``values`` span decades (the small ones would sit flat on a linear axis)."""
    if spans_decades(values):
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")


def plot_dropout_stability(rows, out_png: str | FilePath, dpi: int = 120) -> FilePath:
    """Loss of the all-layers-dropped subnetwork (best of the trials) against the kept fraction, one line
    per endpoint (``rows``: name -> [{keep, loss, loss_all_dropped}]), its full net's loss dotted."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    values = []
    for name, series in rows.items():
        ys = [r["loss_all_dropped"] for r in series]
        ax.plot([r["keep"] for r in series], ys, "o-", label=f"{name}: dropped")
        ax.axhline(series[0]["loss"], ls=":", lw=1, color=ax.lines[-1].get_color(), label=f"{name}: full net")
        values += ys + [series[0]["loss"]]
    ax.set_xlabel("kept fraction 1 - p")
    ax.set_ylabel("train loss")
    ax.set_title("dropout stability (best kept set per fraction)")
    ax.grid(alpha=0.3)
    _log_if_decades(ax, values)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi)


#: Figure 2's panels: (result key, x key, x label, title)
FIGURE2_PANELS = (
    ("left", "keep", "fraction of filters kept, 1 - p", "best dropout subnetwork"),
    ("centre", "t", "t (theta -> dropout copy)", "segment to a p = {p} dropout copy"),
    ("right", "width", "filters per layer", "narrow network"),
)


def plot_figure2(result: dict, out_png: str | FilePath, title: str | None = None, dpi: int = 120) -> FilePath:
    """Kuditipudi et al.'s Figure 2 from :func:`modeconn.stability.figure2.figure2`'s result: columns left
    (best dropout subnetwork against the kept fraction), centre (the straight segment to a dropout copy),
    right (narrow nets against width); rows loss and accuracy; mean over trials with one-std error bars
    (a band on the centre panel). A loss panel spanning decades gets a log axis."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4), squeeze=False)
    n = len(result.get("seeds", []))
    for c, (key, x, xlabel, head) in enumerate(FIGURE2_PANELS):
        rows = result[key]["mean_std"]
        xs = np.asarray([r[x] for r in rows], dtype=float)
        for r, metric in enumerate(("loss", "accuracy")):
            ax = axes[r][c]
            mean = np.asarray([row[f"{metric}_mean"] for row in rows])
            std = np.asarray([row[f"{metric}_std"] for row in rows])
            color = "C0" if metric == "loss" else "C1"
            if key == "centre":
                ax.plot(xs, mean, color=color, lw=1.6)
                ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.25, lw=0)
            else:
                ax.errorbar(xs, mean, yerr=std, fmt="o-", color=color, capsize=3, ms=4, lw=1.4)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"train {metric}")
            ax.grid(alpha=0.3)
            if metric == "loss":
                ax.set_title(head.format(p=result.get("options", {}).get("segment_p", "?")), fontsize=10)
                _log_if_decades(ax, np.concatenate([mean, mean + std]))
    fig.suptitle(title or f"Figure 2 (Kuditipudi et al. 2019): mean ± std over {n} trial(s), "
                 f"{result.get('num_items', '?')} training images", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi)
