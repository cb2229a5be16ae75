"""The landscape's pictures: the disconnectivity graph, the connectivity graph, every edge's loss profile.

- :func:`plot_disconnectivity`: scipy's single-linkage dendrogram over the edges' maximum losses (single
  linkage merges two groups at their lowest direct edge, which is exactly the MST's merge heights, i.e. the
  minimax barriers); each leaf is drawn down to its minimum's own loss, as in the energy-landscape
  literature; y = train loss.
- :func:`plot_connectivity`: minima as nodes coloured by loss, every measured path as a thin edge, the MST
  thick and coloured by its saddle loss.
- :func:`plot_profiles`: each edge's train loss against normalised arc length (one panel per constructor),
  knots (pivots, bends) marked.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path as FilePath

import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
from scipy.cluster.hierarchy import dendrogram, linkage
from scipy.spatial.distance import squareform

from modeconn.evaluation.evaluate import PathEval
from modeconn.landscape.graph import Landscape
from modeconn.reporting.plots import save_figure


def _edge_matrix(ls: Landscape) -> tuple[np.ndarray, float | None]:
    """Direct edges' max losses as a distance matrix; unmeasured pairs get a height above every edge (the
    "not connected" level, returned second when some minima are disconnected)."""
    n = len(ls.names)
    index = {name: i for i, name in enumerate(ls.names)}
    d = np.full((n, n), np.nan)
    for u, v, attr in ls.graph.edges(data=True):
        d[index[u], index[v]] = d[index[v], index[u]] = attr["max_loss"]
    finite = d[np.isfinite(d)]
    top = float(finite.max()) if finite.size else max(ls.losses.values())
    low = min(ls.losses.values())
    cap = top + 0.25 * max(top - low, 1e-3)
    np.fill_diagonal(d, 0.0)
    disconnected = len(ls.components(np.inf, key="max_loss")) > 1
    return np.where(np.isnan(d), cap, d), cap if disconnected else None


def plot_disconnectivity(ls: Landscape, out: str | FilePath, title: str | None = None,
                         threshold: float | None = None) -> FilePath:
    """The disconnectivity graph (a dendrogram of minimax barriers) as a PNG. ``threshold``: a dashed line at
    the lowest minimum's loss + threshold."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(ls.names) + 2), 4.2))
    dist, cap = _edge_matrix(ls)
    tree = dendrogram(linkage(squareform(dist, checks=False), method="single"), labels=ls.names, no_plot=True)
    leaf_x = {5.0 + 10.0 * i: name for i, name in enumerate(tree["ivl"])}
    for xs, ys in zip(tree["icoord"], tree["dcoord"]):
        ys = list(ys)
        for k in (0, 3):  # a leaf's leg goes down to its minimum's own loss
            if ys[k] == 0.0 and xs[k] in leaf_x:
                ys[k] = ls.losses[leaf_x[xs[k]]]
        ax.plot(xs, ys, color="tab:blue", lw=1.4)
    for x, name in leaf_x.items():
        ax.plot([x], [ls.losses[name]], "o", color="tab:blue", ms=4)
    ax.set_xticks(list(leaf_x), list(leaf_x.values()), rotation=45, ha="right")
    ax.set_xlim(0, 10 * len(leaf_x))
    if threshold is not None:
        level = min(ls.losses.values()) + threshold
        ax.axhline(level, ls="--", color="grey", lw=1, label=f"lowest minimum + {threshold:g}")
        ax.legend(loc="upper right", fontsize=8)
    if cap is not None:
        ax.axhline(cap, ls=":", color="tab:red", lw=1)
        ax.text(0.5, cap, " not connected", color="tab:red", va="bottom", fontsize=8)
    ax.set_ylabel("train loss (minimax barrier)")
    ax.set_title(title or f"disconnectivity graph ({ls.path or 'best path per pair'})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_connectivity(ls: Landscape, out: str | FilePath, title: str | None = None) -> FilePath:
    """Nodes coloured by their loss, every measured path thin, MST edges thick and coloured by saddle loss."""
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    pos = nx.circular_layout(ls.names)
    tree = ls.mst
    saddles = [d["max_loss"] for _, _, d in tree.edges(data=True)]
    node_loss = [ls.losses[n] for n in ls.names]
    nx.draw_networkx_edges(ls.graph, pos, ax=ax, edge_color="lightgrey", width=1.0)
    if saddles:
        edges = nx.draw_networkx_edges(tree, pos, ax=ax, edgelist=list(tree.edges()), edge_color=saddles, width=4.0,
                                       edge_cmap=plt.cm.viridis, edge_vmin=min(saddles), edge_vmax=max(saddles))
        fig.colorbar(edges, ax=ax, label="saddle train loss (MST edges)", fraction=0.046)
        edges.set_clim(min(saddles), max(saddles))
    nodes = nx.draw_networkx_nodes(ls.graph, pos, nodelist=ls.names, ax=ax, node_color=node_loss, cmap=plt.cm.plasma,
                                   node_size=420, edgecolors="black")
    fig.colorbar(nodes, ax=ax, label="minimum's train loss", orientation="horizontal", fraction=0.05, pad=0.02)
    nx.draw_networkx_labels(ls.graph, pos, ax=ax, font_size=7, font_color="white")
    ax.set_title(title or f"connectivity graph ({ls.path or 'best path per pair'})", fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out)


def arc_length(ev: PathEval) -> np.ndarray:
    """Normalised arc length (0 to 1) at every evaluated t, from the evaluation's parameter-space steps
    (t itself when the path has no length)."""
    steps = np.asarray(ev.steps, float)
    cum = np.cumsum(np.concatenate([[0.0], steps[1:]]))
    return cum / cum[-1] if cum[-1] > 0 else np.asarray(ev.ts, float)


def plot_profiles(profiles: Mapping[str, Sequence[tuple[str, PathEval, bool]]], out: str | FilePath,
                  title: str | None = None) -> FilePath:
    """``profiles``: label -> [(pair name, PathEval, on the MST)], one panel per label, a line per pair
    (MST edges solid, the others dotted), knots as dots; train loss against normalised arc length."""
    labels = list(profiles)
    fig, axes = plt.subplots(1, max(1, len(labels)), figsize=(4.6 * max(1, len(labels)), 3.8), squeeze=False,
                             sharey=True)
    for ax, label in zip(axes[0], labels):
        for i, (pair, ev, on_mst) in enumerate(profiles[label]):
            s, loss = arc_length(ev), np.asarray(ev.metrics["train_loss"], float)
            color = plt.cm.tab20(i % 20)
            ax.plot(s, loss, ls="-" if on_mst else ":", lw=1.4 if on_mst else 1.0, color=color, label=pair)
            knots = [k for k, t in enumerate(ev.ts) if any(abs(t - kt) < 1e-9 for kt in ev.knots[1:-1])]
            ax.plot(s[knots], loss[knots], "o", ms=3, color=color)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("normalised arc length")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("train loss")
    if labels and profiles[labels[-1]]:
        axes[0][-1].legend(fontsize=6, ncol=2, loc="upper right")
    fig.suptitle(title or "every edge's loss profile (solid: MST edges)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)
