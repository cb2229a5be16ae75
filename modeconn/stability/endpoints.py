"""Stability of a run's endpoints, for the paper figures that are about endpoints rather than paths.

Kuditipudi et al.'s Figure 2 (left) plots, against the kept fraction, the loss of the best dropout
subnetwork of each trained net; Figure 3 (left) histograms the noise-stability quantities of one layer.
:func:`measure_endpoints` computes both for each endpoint of a run and writes a JSON file and figures.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path as FilePath

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from modeconn.checkpoint import atomic_write_json  # noqa: E402
from modeconn.plots_stability import plot_noise_stability  # noqa: E402
from modeconn.stability.dropout import dropout_stability  # noqa: E402
from modeconn.stability.noise import noise_stability  # noqa: E402


def measure_endpoints(model: nn.Module, thetas: Mapping[str, Mapping[str, Tensor]], data, out_dir: str | FilePath,
                      keeps: Sequence[float] = (), trials: int = 20, noise: bool = False, noise_items: int = 256,
                      seed: int = 0, max_items: int | None = None, device=None) -> dict:
    """Dropout stability at every kept fraction in ``keeps`` and (if ``noise``) the noise-stability
    quantities, for each endpoint in ``thetas`` (name -> state dict). Writes ``stability.json``,
    ``dropout_stability.png`` and ``noise_stability_<name>.png`` into ``out_dir``; returns the JSON."""
    out = FilePath(out_dir)
    result: dict = {"dropout": {}, "noise": {}}
    for name, theta in thetas.items():
        rows = []
        for keep in keeps:
            s = dropout_stability(model, theta, data, keep=float(keep), trials=trials, seed=seed,
                                  max_items=max_items, device=device)
            rows.append({"keep": float(keep), "loss": s.loss, "loss_all_dropped": s.losses[0],
                         "max_nested_loss": max(s.losses), "epsilon": s.epsilon, "kept_sizes": s.kept_sizes})
        result["dropout"][name] = rows
        if noise:
            ns = noise_stability(model, theta, data, max_items=noise_items, seed=seed, device=device)
            plot_noise_stability(ns, out / f"noise_stability_{name}.png")
            result["noise"][name] = {"epsilon": ns.epsilon, "conditions": ns.conditions, "summaries": ns.summaries()}
    if keeps:
        _plot_dropout(result["dropout"], out / "dropout_stability.png")
    atomic_write_json(out / "stability.json", result)
    return result


def _plot_dropout(rows: Mapping[str, list[dict]], png: FilePath) -> None:
    """Loss of the all-layers-dropped subnetwork (best of the trials) against the kept fraction."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, series in rows.items():
        ax.plot([r["keep"] for r in series], [r["loss_all_dropped"] for r in series], "o-", label=f"{name}: dropped")
        ax.axhline(series[0]["loss"], ls=":", lw=1, color=ax.lines[-1].get_color(), label=f"{name}: full net")
    ax.set_xlabel("kept fraction 1 - p")
    ax.set_ylabel("train loss")
    ax.set_title("dropout stability (best kept set per fraction)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(png)
