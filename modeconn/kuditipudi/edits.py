"""Index sets and the primitive edits every move of Kuditipudi et al. (2019) is made of.

Notation (0-based here, toolkit notation in the reference note): group ``g`` (``g = 0..D-1``) is hidden
layer ``g + 1`` of a :class:`~modeconn.kuditipudi.chain.Chain`. Its *rows* are the group's producer axes
(weight rows, bias, any per-unit parameter such as a PReLU slope); its *columns* are its consumer axes (the
next layer's weight columns, or the output layer's for ``g = D-1``). A layer's weight is a producer of group
``g`` (rows) and a consumer of group ``g-1`` (columns) at once, so ``W_{g+1}[rows, cols]`` is written by
indexing both axes. The columns of the first layer are input coordinates and are never restricted.

Segment labels (each segment of a construction is a straight line making one move):

* ``OUTPUT`` - *output-layer interpolation* (type (a)): only the output layer (weight and bias) changes;
  the logits are affine in it and the loss is convex in the logits, so the loss along the segment is at
  most the larger of its two ends.
* ``REWIRE`` - *free-unit rewiring* (type (b)): only rows of units with no path to the output change;
  the function, hence the loss, is constant.
* ``PERMUTE`` - Lemma 4's *permutation* segments: row copies into free slots and column moves between
  units with identical rows; the function is constant.

Every dropped unit has its outgoing columns zeroed, so nothing relies on ``phi(0) = 0``: the moves are
exact for any elementwise activation. Index sets are 1-D ``LongTensor``s; when two index sets are paired
(a copy ``dst <- src``) they are paired by position. Each edit returns a new state dict; tensors it does not
change are shared with the input.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from modeconn.kuditipudi.chain import Chain
from modeconn.params.state import State
from modeconn.units import UnitAxis, unit_slices

OUTPUT = "output-layer interpolation"
REWIRE = "free-unit rewiring"
PERMUTE = "permutation"

__all__ = ["OUTPUT", "REWIRE", "PERMUTE", "as_units", "complement", "free_slots", "check_kept", "check_r",
           "write_rows", "zero_rows", "scale_cols", "move_cols", "set_output", "kept_only"]


def as_units(units, size: int, what: str = "units") -> Tensor:
    """``units`` as a 1-D ``LongTensor`` of distinct indices in ``[0, size)`` (order kept)."""
    t = torch.as_tensor(units, dtype=torch.long).reshape(-1).cpu()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise IndexError(f"{what}: indices out of range for a layer of {size} units: {t.tolist()[:10]}")
    if t.unique().numel() != t.numel():
        raise ValueError(f"{what}: repeated indices {t.tolist()[:10]}")
    return t


def complement(units: Tensor, size: int) -> Tensor:
    """The sorted indices of ``[0, size)`` not in ``units``."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[units] = False
    return torch.nonzero(mask).reshape(-1)


def unit_index(ax: UnitAxis, units: Tensor, size: int, device) -> Tensor:
    """The entries of ``ax`` that belong to ``units``, on ``device``."""
    return unit_slices(ax, units, size).to(device)


def free_slots(kept: Tensor, size: int) -> Tensor:
    """Lemma 1's copy slots F: the first ``len(kept)`` units outside ``kept`` (paired with ``kept``
    by position)."""
    rest = complement(kept, size)
    if len(rest) < len(kept):
        raise ValueError(f"a layer of {size} units cannot hold a copy of {len(kept)} kept units "
                         f"(at most floor(h/2) = {size // 2} units may be kept)")
    return rest[: len(kept)]


def check_kept(chain: Chain, kept: Sequence, what: str = "kept") -> list[Tensor]:
    """One checked index set per hidden layer."""
    if len(kept) != chain.depth:
        raise ValueError(f"{what}: need one index set per hidden layer ({chain.depth}), got {len(kept)}")
    return [as_units(k, n, f"{what}[{g}] ({chain.names[g]})") for g, (k, n) in enumerate(zip(kept, chain.sizes))]


def check_r(chain: Chain, r) -> list[float]:
    """One scale per hidden layer (a number is used for every layer)."""
    rs = [float(r)] * chain.depth if isinstance(r, (int, float)) else [float(x) for x in r]
    if len(rs) != chain.depth:
        raise ValueError(f"r: need one scale per hidden layer ({chain.depth}), got {len(rs)}")
    return rs


def write_rows(state: Mapping[str, Tensor], chain: Chain, g: int, dst: Tensor, source: Mapping[str, Tensor],
               src: Tensor, cols: tuple[Tensor, Tensor] | None = None, scale: float = 1.0) -> State:
    """Rows ``dst`` of group ``g`` <- rows ``src`` of ``source`` (paired by position).

    ``cols=None`` copies whole rows (every column). ``cols=(col_dst, col_src)`` (groups ``g >= 1``)
    writes only ``W[dst, col_dst] = scale * source_W[src, col_src]`` and zeroes the rest of the rows;
    producer tensors without columns of group ``g-1`` (biases; the first layer's input columns) are
    copied whole and never scaled.
    """
    out = dict(state)
    n = chain.sizes[g]
    for ax in chain.rows[g]:
        t, s = out[ax.name], source[ax.name]
        block = s.index_select(ax.axis, unit_index(ax, src, n, s.device))
        cax = chain.inputs[g].get(ax.name) if (cols is not None and g > 0) else None
        if cax is not None:
            col_dst, col_src = cols
            m = chain.sizes[g - 1]
            picked = block.index_select(cax.axis, unit_index(cax, col_src, m, s.device))
            if scale != 1.0:
                picked = picked * scale
            block = torch.zeros_like(block).index_copy_(cax.axis, unit_index(cax, col_dst, m, s.device), picked)
        out[ax.name] = t.index_copy(ax.axis, unit_index(ax, dst, n, t.device), block.to(t.dtype))
    return out


def zero_rows(state: Mapping[str, Tensor], chain: Chain, g: int, units: Tensor) -> State:
    """Rows ``units`` of group ``g`` (weight rows, bias, ...) set to zero."""
    out = dict(state)
    if len(units) == 0:
        return out
    for ax in chain.rows[g]:
        t = out[ax.name]
        out[ax.name] = t.index_fill(ax.axis, unit_index(ax, units, chain.sizes[g], t.device), 0)
    return out


def scale_cols(state: Mapping[str, Tensor], chain: Chain, g: int, factors: Tensor) -> State:
    """Columns of group ``g`` multiplied by ``factors`` (one per unit; e.g. r on kept units, 0 on dropped)."""
    out = dict(state)
    for ax in chain.cols[g]:
        t = out[ax.name]
        f = factors.to(t.device, t.dtype).repeat_interleave(ax.block)
        shape = [1] * t.dim()
        shape[ax.axis] = -1
        out[ax.name] = t * f.reshape(shape)
    return out


def move_cols(state: Mapping[str, Tensor], chain: Chain, g: int, src: Tensor, dst: Tensor) -> State:
    """Columns of group ``g``: ``dst <- src`` then ``src <- 0`` (``src`` and ``dst`` disjoint)."""
    out = dict(state)
    if len(src) == 0:
        return out
    n = chain.sizes[g]
    for ax in chain.cols[g]:
        t = out[ax.name]
        si, di = unit_index(ax, src, n, t.device), unit_index(ax, dst, n, t.device)
        values = t.index_select(ax.axis, si)
        out[ax.name] = t.index_fill(ax.axis, si, 0).index_copy_(ax.axis, di, values)
    return out


def set_output(state: Mapping[str, Tensor], chain: Chain, source: Mapping[str, Tensor], dst: Tensor,
               src: Tensor, scale: float = 1.0, bias_from: Mapping[str, Tensor] | None = None) -> State:
    """The output layer: columns ``dst`` <- ``scale * source[:, src]``, every other column 0; its other
    entries (the output bias) taken from ``bias_from`` (default ``source``)."""
    out = dict(state)
    g = chain.depth - 1
    n = chain.sizes[g]
    col_keys = set()
    for ax in chain.cols[g]:
        t, s = out[ax.name], source[ax.name]
        picked = s.index_select(ax.axis, unit_index(ax, src, n, s.device))
        if scale != 1.0:
            picked = picked * scale
        out[ax.name] = torch.zeros_like(t).index_copy_(ax.axis, unit_index(ax, dst, n, t.device), picked.to(t.dtype))
        col_keys.add(ax.name)
    other = bias_from if bias_from is not None else source
    for key in chain.output:
        if key not in col_keys and key in out:
            out[key] = other[key]
    return out


def kept_only(chain: Chain, state: Mapping[str, Tensor], kept: Sequence[Tensor]) -> State:
    """``state`` with the rows of every unit outside ``kept`` zeroed."""
    out = dict(state)
    for g, n in enumerate(chain.sizes):
        out = zero_rows(out, chain, g, complement(kept[g], n))
    return out

