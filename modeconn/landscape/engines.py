"""Suggestion engines: which pairs of minima to connect next (Draxler et al. 2018, section 4).

An engine looks at the landscape so far (finished pairs are its edges), the pairs already tried (finished
or planned) and the pairs planned but not finished, and proposes pairs, each as ``(a, b)`` in ``names``
order. :func:`modeconn.landscape.explore.explore` asks the engines in the order given and runs the first
non-empty proposal; it stops when none proposes anything.

- ``unfinished``: every planned pair whose run has not finished (an interrupted or killed job), resumed first.
- ``disconnected``: while the graph has several components, join the lowest minimum to the lowest minimum
  of every other component (the paper joins one component per step; one pair per component here, so they
  can run in parallel).
- ``mst``: take the minimum spanning tree's highest edge, cut it, and propose one untried pair across the
  cut, lowest minima first (the side holding the lower minimum first, each side by loss); when every pair
  across that cut is tried, the next highest edge. Until every pair is tried it always proposes one.
- ``all``: every untried pair, lowest minima first.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import networkx as nx

from modeconn.landscape.graph import Landscape

Pair = tuple[str, str]
Engine = Callable[[Landscape, Collection[frozenset], Sequence[Pair]], list[Pair]]


def _ordered(ls: Landscape, a: str, b: str) -> Pair:
    return (a, b) if ls.names.index(a) < ls.names.index(b) else (b, a)


def _by_loss(ls: Landscape, names) -> list[str]:
    """Lowest loss first; ties by ``names`` order."""
    return sorted(names, key=lambda n: (ls.losses[n], ls.names.index(n)))


def unfinished(ls: Landscape, tried: Collection[frozenset], pending: Sequence[Pair]) -> list[Pair]:
    return [_ordered(ls, a, b) for a, b in pending]


def disconnected(ls: Landscape, tried: Collection[frozenset], pending: Sequence[Pair]) -> list[Pair]:
    comps = [_by_loss(ls, c) for c in nx.connected_components(ls.graph)]
    if len(comps) < 2:
        return []
    comps.sort(key=lambda c: (ls.losses[c[0]], ls.names.index(c[0])))
    lowest = comps[0][0]
    return [_ordered(ls, lowest, c[0]) for c in comps[1:] if frozenset((lowest, c[0])) not in tried]


def mst(ls: Landscape, tried: Collection[frozenset], pending: Sequence[Pair]) -> list[Pair]:
    tree = ls.mst
    order = {n: i for i, n in enumerate(ls.names)}
    edges = sorted(tree.edges(data=True), key=lambda e: (-e[2]["max_loss"], *sorted((order[e[0]], order[e[1]]))))
    for u, v, _ in edges:
        cut = tree.copy()
        cut.remove_edge(u, v)
        sides = [_by_loss(ls, nx.node_connected_component(cut, u)), _by_loss(ls, nx.node_connected_component(cut, v))]
        sides.sort(key=lambda s: (ls.losses[s[0]], order[s[0]]))
        for a in sides[0]:
            for b in sides[1]:
                if frozenset((a, b)) not in tried:
                    return [_ordered(ls, a, b)]
    return []


def all_pairs(ls: Landscape, tried: Collection[frozenset], pending: Sequence[Pair]) -> list[Pair]:
    ranked = _by_loss(ls, ls.names)
    out = []
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            if frozenset((a, b)) not in tried:
                out.append(_ordered(ls, a, b))
    return out


ENGINES: dict[str, Engine] = {"unfinished": unfinished, "disconnected": disconnected, "mst": mst, "all": all_pairs}


def check_engines(engines: Sequence[str], key: str = "engines") -> list[str]:
    """The engine names, checked (``ValueError`` naming ``key`` and the choices)."""
    if isinstance(engines, str) or not isinstance(engines, Sequence) or not engines:
        raise ValueError(f"{key} must be a non-empty list of {', '.join(ENGINES)}; got {engines!r}")
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise ValueError(f"{key}: unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    return [str(e) for e in engines]


def propose(ls: Landscape, engines: Sequence[str], tried: Collection[frozenset],
            pending: Sequence[Pair]) -> tuple[str | None, list[Pair]]:
    """The first engine (in ``engines`` order) that proposes pairs, and its pairs; ``(None, [])`` if none."""
    for name in engines:
        pairs = ENGINES[name](ls, tried, pending)
        if pairs:
            return name, pairs
    return None, []
