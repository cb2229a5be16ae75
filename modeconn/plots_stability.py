"""Figures of noise-stability measurements (Kuditipudi et al. 2019, Figure 3 left and App. D.3).

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

__all__ = ["plot_noise_stability", "QUANTITIES"]

#: (attribute of NoiseStability, row label)
QUANTITIES: tuple[tuple[str, str], ...] = (
    ("cushion", "layer cushion $\\mu_i$"),
    ("interlayer_min", "min. interlayer cushion $\\mu_{i\\to}$"),
    ("contraction", "activation contraction"),
    ("smoothness", "interlayer smoothness $\\rho_i$"),
)


def _save_atomic(fig, out: str | FilePath, dpi: int) -> FilePath:
    out = FilePath(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out)
    return out


def plot_noise_stability(result, out_png: str | FilePath, layers: Sequence[int] | None = None,
                         bins: int = 30, title: str | None = None, dpi: int = 110) -> FilePath:
    """Write a grid of histograms of ``result`` (a :class:`modeconn.stability.noise.NoiseStability`).

    ``layers``: 1-based layer numbers to show (default all). Undefined cells (contraction of the output
    layer, smoothness of layers 1 and d) are left empty with a note; infinite values (e.g. smoothness of a
    layer that acts linearly on the data) are not binned, their count is written in the panel. The median is
    a dashed line. The PNG is written atomically.
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
    return _save_atomic(fig, out_png, dpi)
