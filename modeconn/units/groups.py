"""The tracer's bookkeeping: unit groups being built (union-find with splitting, blocks and ties) and where a
traced tensor holds its units.

A group may be *merged* with another (a residual addition: one permutation for both) or *split* into
consecutive pieces (``torch.split`` of a fused q/k/v projection: one permutation each); a tensor's unit axis
holds a concatenation of groups (``torch.cat``), each part with its own permutation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from modeconn.units.spec import UnitAxis, UnsupportedLayerError
from modeconn.units.supported import SUPPORTED

Part = tuple[int, int]  # (group id, entries per unit along the axis)


@dataclass(frozen=True)
class Units:
    """A traced tensor's units: axis ``axis`` holds the concatenation of ``parts``. With ``head_axis``
    (one part, attention heads split out by a view), the unit index is ``head * d + j``: the head on
    ``head_axis``, ``j`` on ``axis``. With ``scores`` (attention scores ``q @ k^T``), axis ``axis`` holds
    only the heads (blocks) of the one part's group, no units. With ``stack_axis`` (a fused q/k/v
    projection viewed as ``(..., 3, heads, head dim)``), entry ``i`` of that axis holds the units
    ``pieces[i]`` (``parts`` is their concatenation); only views, elementwise ops and unbinding or
    indexing the stack axis may read such a tensor."""
    axis: int
    parts: tuple[Part, ...]
    head_axis: int | None = None
    scores: bool = False
    stack_axis: int | None = None
    pieces: tuple[tuple[Part, ...], ...] | None = None

    def moved(self, new_axis_of) -> "Units":
        """The same units after the tensor's axes moved (``new_axis_of(old) -> new``)."""
        h = None if self.head_axis is None else new_axis_of(self.head_axis)
        st = None if self.stack_axis is None else new_axis_of(self.stack_axis)
        return Units(new_axis_of(self.axis), self.parts, h, self.scores, st, self.pieces)

    def piece(self, i: int, new_axis_of) -> "Units":
        """Entry ``i`` of the stack axis (that axis removed; ``new_axis_of`` maps the other axes)."""
        h = None if self.head_axis is None else new_axis_of(self.head_axis)
        return Units(new_axis_of(self.axis), self.pieces[i], h)


@dataclass(frozen=True)
class Param:
    """A parameter or buffer read with ``get_attr``: its axes become unit axes when it meets units
    (a positional table added to the residual stream, a class token concatenated to it).
    ``axes[i]``: the parameter's axis shown as this tensor's axis ``i`` (``None``: a new axis)."""
    key: str
    axes: tuple[int | None, ...]


@dataclass
class _Group:
    name: str
    size: int
    order: tuple
    producers: list[UnitAxis] = field(default_factory=list)
    consumers: list[UnitAxis] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    mixing: list[str] = field(default_factory=list)
    blocks: int = 1
    tie: int | None = None
    bad: str | None = None            # why the group must stay unpermuted ("" for the model input's units)
    children: list[int] | None = None  # after a split: the pieces, in order


def fail(where: str, why: str = "") -> UnsupportedLayerError:
    msg = f"unit inference does not support {where}" + (f": {why}" if why else "")
    return UnsupportedLayerError(f"{msg}. Supported layers: {SUPPORTED}.")


class Groups:
    """Union-find over unit groups, with splitting, blocks and ties (shared block permutations)."""

    def __init__(self):
        self.parent: list[int] = []
        self.data: list[_Group] = []
        self.tie_parent: dict[int, int] = {}

    # ------------------------------------------------------------------ creation and lookup
    def new(self, name: str, size: int, layer: str | None = None, blocks: int = 1) -> int:
        gid = len(self.parent)
        self.parent.append(gid)
        self.data.append(_Group(name, size, (gid,), layers=[layer] if layer else [], blocks=blocks))
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def __getitem__(self, gid: int) -> _Group:
        return self.data[self.find(gid)]

    def leaves(self, parts) -> tuple[Part, ...]:
        """``parts`` with merged groups resolved and split groups replaced by their pieces."""
        out: list[Part] = []
        for gid, block in parts:
            g = self.find(gid)
            if self.data[g].children is None:
                out.append((g, block))
            else:
                out.extend(self.leaves([(c, block) for c in self.data[g].children]))
        return tuple(out)

    def entries(self, parts) -> int:
        return sum(self[g].size * b for g, b in self.leaves(parts))

    # ------------------------------------------------------------------ axes
    def attach(self, parts, kind: str, key: str, axis: int) -> None:
        """Axis ``axis`` of ``key`` holds the concatenation of ``parts`` (producers or consumers)."""
        offset = 0
        for gid, block in self.leaves(parts):
            getattr(self[gid], kind).append(UnitAxis(key, axis, block, offset))
            offset += self[gid].size * block

    def mark(self, parts, *, mixing: str | None = None, layer: str | None = None) -> None:
        for gid, _ in self.leaves(parts):
            g = self[gid]
            if mixing and mixing not in g.mixing:
                g.mixing.append(mixing)
            if layer and layer not in g.layers:
                g.layers.append(layer)

    def poison(self, parts, why: str) -> None:
        for gid, _ in self.leaves(parts):
            if self[gid].bad is None or why and not self[gid].bad:
                self[gid].bad = why

    # ------------------------------------------------------------------ structure
    def set_blocks(self, gid: int, blocks: int, where: str) -> None:
        g = self[gid]
        if g.size % blocks:
            raise fail(where, f"{g.size} units do not split into {blocks} blocks")
        if g.blocks not in (1, blocks):
            raise fail(where, f"its {blocks} blocks differ from the {g.blocks} blocks of the units it reads")
        g.blocks = blocks

    def _tie_root(self, t: int) -> int:
        while self.tie_parent[t] != t:
            t = self.tie_parent[t]
        return t

    def tie_of(self, gid: int) -> int | None:
        t = self[gid].tie
        return None if t is None else self._tie_root(t)

    def tie(self, a: int, b: int, where: str) -> None:
        """Groups ``a`` and ``b`` move their blocks alike."""
        ga, gb = self[a], self[b]
        if ga.blocks != gb.blocks:
            raise fail(where, f"it ties {ga.blocks} blocks to {gb.blocks} blocks")
        ta, tb = self.tie_of(a), self.tie_of(b)
        if ta is None:
            ta = ga.tie = self.find(a)
            self.tie_parent.setdefault(ta, ta)
        if tb is None:
            gb.tie = ta
        elif tb != ta:
            self.tie_parent[tb] = ta

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.data[a].children is not None or self.data[b].children is not None:
            self.unify([(a, 1)], [(b, 1)], where)
            return self.find(a)
        if self.data[a].order > self.data[b].order:
            a, b = b, a
        da, db = self.data[a], self.data[b]
        if da.size != db.size:
            raise fail(where, f"it combines unit groups of different sizes ({da.size} and {db.size})")
        if da.blocks != db.blocks and 1 not in (da.blocks, db.blocks):
            raise fail(where, f"it combines units in {da.blocks} blocks with units in {db.blocks} blocks")
        ta, tb = self.tie_of(a), self.tie_of(b)
        da.blocks = max(da.blocks, db.blocks)
        for k in ("producers", "consumers", "layers", "mixing"):
            getattr(da, k).extend(x for x in getattr(db, k) if x not in getattr(da, k))
        if da.bad is None or (db.bad and not da.bad):
            da.bad = db.bad if db.bad is not None else da.bad
        self.parent[b] = a
        if ta is not None and tb is not None and ta != tb:
            self.tie_parent[tb] = ta
        da.tie = ta if ta is not None else tb
        return a

    def split(self, gid: int, sizes: list[int], where: str) -> list[int]:
        """Cut group ``gid`` into consecutive pieces of ``sizes`` units, each permuted on its own."""
        g = self[gid]
        if g.blocks > 1 or g.tie is not None:
            raise fail(where, "it splits units that form blocks (heads or groups)")
        if any(ax.within is not None for ax in g.producers + g.consumers):
            raise fail(where, "it splits the input units of a grouped convolution")
        kids, start = [], 0
        for i, n in enumerate(sizes):
            k = self.new(f"{g.name}:{i}", n)
            kid = self.data[k]
            kid.order, kid.layers, kid.mixing, kid.bad = (*g.order, i), list(g.layers), list(g.mixing), g.bad
            for kind in ("producers", "consumers"):
                for ax in getattr(g, kind):
                    getattr(kid, kind).append(UnitAxis(ax.name, ax.axis, ax.block, ax.offset + start * ax.block))
            kids.append(k)
            start += n
        g.children = kids
        return kids

    def cut(self, parts, sizes: list[int], where: str) -> list[tuple[Part, ...]]:
        """Cut a unit axis holding ``parts`` into consecutive pieces of ``sizes`` entries."""
        bounds, acc = [], 0
        for n in sizes[:-1]:
            acc += n
            bounds.append(acc)
        pieces: list[Part] = []
        pos = 0
        for gid, block in self.leaves(parts):
            n = self[gid].size * block
            inner = [b - pos for b in bounds if pos < b < pos + n]
            if any(c % block for c in inner):
                raise fail(where, "it cuts through the entries of one unit")
            if inner:
                cuts = [0] + [c // block for c in inner] + [self[gid].size]
                pieces.extend((k, block) for k in self.split(gid, [b - a for a, b in zip(cuts, cuts[1:])], where))
            else:
                pieces.append((gid, block))
            pos += n
        out = []
        for want in sizes:
            piece = []
            while want > 0:
                gid, block = pieces.pop(0)
                piece.append((gid, block))
                want -= self[gid].size * block
            out.append(tuple(piece))
        return out

    def unify(self, pa, pb, where: str) -> tuple[Part, ...]:
        """Merge two layouts of one unit axis (same entries), part by part, splitting where they differ."""
        qa, qb = list(self.leaves(pa)), list(self.leaves(pb))
        if self.entries(qa) != self.entries(qb):
            raise fail(where, "it combines unit axes of different lengths")
        while qa:
            (ga, ba), (gb, bb) = qa[0], qb[0]
            if ba != bb:
                raise fail(where, "it combines tensors whose units are laid out differently")
            na, nb = self[ga].size, self[gb].size
            if na != nb:  # cut the longer part where the shorter one ends
                q, g, n, m = (qb, gb, nb, na) if nb > na else (qa, ga, na, nb)
                first, rest = self.split(g, [m, n - m], where)
                q[0:1] = [(first, ba), (rest, ba)]
                continue
            self.union(ga, gb, where)
            qa.pop(0)
            qb.pop(0)
        return self.leaves(pa)
