"""The landscape of many minima: a graph over named minima whose edges are measured paths.

An edge ``a -- b`` says "a path from a to b was built and evaluated"; its attributes are the path's
maximum train loss (``max_loss``), its max-endpoint barrier (``barrier`` = max_loss - max(L_a, L_b)), the t of
its highest point (``t_saddle``), the path's profile file (``path_file``) and the constructor that made it
(``path``). The minimum spanning tree over ``max_loss`` gives, between every two minima, the highest edge on
their tree path: the minimax ("topographic") barrier of Draxler et al. (2018), an upper bound on the lowest
barrier of any path between them.

JSON schema (``to_json``; version ``modeconn.landscape/1``), plain types only::

    {"schema": "modeconn.landscape/1",
     "path": "bezier" | null,              # the constructor the edges come from (null: the best per pair)
     "names": ["seed0", ...],              # the minima, in matrix order
     "losses": {"seed0": 0.012, ...},      # each minimum's own train loss
     "edges": [{"a": "seed0", "b": "seed1", "max_loss": ..., "barrier": ..., "t_saddle": ...,
                "path_file": "pairs/seed0__seed1/paths/bezier.json",   # relative to the landscape's folder
                "path": "bezier"}, ...],
     "mst": [["seed0", "seed1"], ...],      # derived: the minimum spanning tree's edges
     "minimax": [[...], ...],               # derived: N x N, loss units, null between disconnected minima
     "info": {...}}                         # free-form (run time, settings)

``from_json`` reads ``names``, ``losses``, ``edges``, ``path`` and ``info`` and recomputes the rest.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

SCHEMA = "modeconn.landscape/1"
EDGE_KEYS = ("max_loss", "barrier", "t_saddle", "path_file", "path")


@dataclass
class Landscape:
    """Minima (``names``, each with its train loss in ``losses``) and the measured paths between them."""

    names: list[str]
    losses: dict[str, float]
    graph: nx.Graph
    path: str | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def from_edges(cls, names: Sequence[str], losses: Mapping[str, float], edges: Iterable[Mapping],
                   path: str | None = None, info: Mapping | None = None) -> "Landscape":
        """A landscape from edge records ``{"a", "b", "max_loss", "barrier", "t_saddle", "path_file", "path"}``.

        ``barrier`` defaults to ``max_loss - max(L_a, L_b)``. Raises ``ValueError`` for an edge whose end is
        not a minimum, a self-loop, or a missing or non-finite ``max_loss``."""
        names = [str(n) for n in names]
        if len(set(names)) != len(names):
            raise ValueError(f"landscape names must be unique; got {names}")
        missing = [n for n in names if n not in losses]
        if missing:
            raise ValueError(f"landscape losses: no loss for minima {missing}")
        graph = nx.Graph()
        graph.add_nodes_from((n, {"loss": float(losses[n])}) for n in names)
        for e in edges:
            a, b = str(e["a"]), str(e["b"])
            if a not in graph or b not in graph or a == b:
                raise ValueError(f"landscape edge {a!r} -- {b!r}: both ends must be distinct minima of {names}")
            max_loss = e.get("max_loss")
            if max_loss is None or not math.isfinite(float(max_loss)):
                raise ValueError(f"landscape edge {a} -- {b}: max_loss must be a finite number; got {max_loss!r}")
            barrier = e.get("barrier")
            if barrier is None:
                barrier = float(max_loss) - max(float(losses[a]), float(losses[b]))
            graph.add_edge(a, b, max_loss=float(max_loss), barrier=float(barrier),
                           t_saddle=None if e.get("t_saddle") is None else float(e["t_saddle"]),
                           path_file=e.get("path_file"), path=e.get("path"))
        return cls(names, {n: float(losses[n]) for n in names}, graph, path, dict(info or {}))

    # ------------------------------------------------------------------------------------ derived views
    @property
    def mst(self) -> nx.Graph:
        """The minimum spanning tree (a forest while the graph is disconnected) over ``max_loss``; ties are
        broken by the order of ``names``, so the tree is the same wherever it is computed."""
        order = {n: i for i, n in enumerate(self.names)}
        ordered = nx.Graph()
        ordered.add_nodes_from(self.graph.nodes(data=True))
        ordered.add_edges_from(sorted(self.graph.edges(data=True), key=lambda e: (
            e[2]["max_loss"], *sorted((order[e[0]], order[e[1]])))))
        return nx.minimum_spanning_tree(ordered, weight="max_loss", algorithm="kruskal")

    @property
    def minimax(self) -> np.ndarray:
        """The N x N matrix (in ``names`` order) of the highest ``max_loss`` on the MST path between every two
        minima: the minimax barrier, in loss units. It is an **upper bound** on the true lowest barrier
        between them: it is the best over the paths measured (every edge is itself an upper bound: a
        constructor can miss lower paths) and pairs never tried may hold lower ones. The diagonal holds each
        minimum's own loss; minima in different components get ``inf``."""
        tree, n = self.mst, len(self.names)
        index = {name: i for i, name in enumerate(self.names)}
        out = np.full((n, n), np.inf)
        for source in self.names:
            i = index[source]
            out[i, i] = self.losses[source]
            highest = {source: -np.inf}
            for u, v in nx.bfs_edges(tree, source):  # tree paths: the highest edge so far, carried outward
                highest[v] = max(highest[u], tree.edges[u, v]["max_loss"])
                out[i, index[v]] = highest[v]
        return out

    @property
    def minimax_barrier(self) -> np.ndarray:
        """``minimax`` relative to the pair's own minima: minimax[i, j] - max(L_i, L_j) (0 on the diagonal)."""
        loss = np.array([self.losses[n] for n in self.names])
        return self.minimax - np.maximum.outer(loss, loss)

    def components(self, threshold: float, key: str = "barrier") -> list[list[str]]:
        """The connected components when only edges with ``key <= threshold`` count (``key="barrier"``: the
        edge's max-endpoint barrier; ``"max_loss"``: an absolute loss level), each in ``names`` order,
        largest first (ties: by the first name's order)."""
        if key not in ("barrier", "max_loss"):
            raise ValueError(f"components: key must be 'barrier' or 'max_loss'; got {key!r}")
        sub = nx.Graph()
        sub.add_nodes_from(self.names)
        sub.add_edges_from((u, v) for u, v, d in self.graph.edges(data=True) if d[key] <= threshold)
        order = {n: i for i, n in enumerate(self.names)}
        comps = [sorted(c, key=order.__getitem__) for c in nx.connected_components(sub)]
        return sorted(comps, key=lambda c: (-len(c), order[c[0]]))

    def worst_mst_edge(self) -> dict | None:
        """The MST's highest edge (``{"a", "b", **attributes}``), or None without edges."""
        edges = sorted(self.mst.edges(data=True), key=lambda e: -e[2]["max_loss"])
        if not edges:
            return None
        u, v, d = edges[0]
        a, b = sorted((u, v), key=self.names.index)
        return {"a": a, "b": b, **d}

    def edge_records(self) -> list[dict]:
        """Every edge as a plain record, ends in ``names`` order, sorted by (a, b) in ``names`` order."""
        order = {n: i for i, n in enumerate(self.names)}
        out = []
        for u, v, d in self.graph.edges(data=True):
            a, b = sorted((u, v), key=order.__getitem__)
            out.append({"a": a, "b": b, **{k: d.get(k) for k in EDGE_KEYS}})
        return sorted(out, key=lambda e: (order[e["a"]], order[e["b"]]))

    # ----------------------------------------------------------------------------------------- JSON
    def to_json(self) -> str:
        """The landscape as plain JSON (see the module docstring for the schema)."""
        mm = self.minimax
        order = {n: i for i, n in enumerate(self.names)}
        mst = sorted((sorted((u, v), key=order.__getitem__) for u, v in self.mst.edges()),
                     key=lambda e: (order[e[0]], order[e[1]]))
        doc = {"schema": SCHEMA, "path": self.path, "names": self.names, "losses": self.losses,
               "edges": self.edge_records(), "mst": mst,
               "minimax": [[None if not math.isfinite(x) else float(x) for x in row] for row in mm],
               "info": self.info}
        return json.dumps(doc, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "Landscape":
        """Read :meth:`to_json`'s output; raises ``ValueError`` naming what is wrong."""
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"landscape JSON cannot be parsed: {str(e)[:200]}") from None
        return cls.from_doc(doc)

    @classmethod
    def from_doc(cls, doc) -> "Landscape":
        """:meth:`from_json` of the parsed JSON value; raises ``ValueError`` naming what is wrong."""
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"landscape JSON: schema must be {SCHEMA!r}; got {got!r}")
        for key, kind in (("names", list), ("losses", dict), ("edges", list)):
            if not isinstance(doc.get(key), kind):
                raise ValueError(f"landscape JSON: {key!r} must be a {kind.__name__}")
        for e in doc["edges"]:
            if not isinstance(e, dict) or "a" not in e or "b" not in e:
                raise ValueError(f"landscape JSON: every edge needs 'a' and 'b'; got {e!r}"[:300])
        return cls.from_edges(doc["names"], doc["losses"], doc["edges"], doc.get("path"), doc.get("info"))
