"""The primitive moves of Kuditipudi et al. (2019) on index sets, and Lemmas 1, 2 and 4.

Everything here works on plain state dicts and on the :class:`~modeconn.units.UnitSpec` of a plain
feed-forward chain of hidden layers (``spec.is_chain()``), so it covers MLPs of any depth and width,
conv nets with channels as units (conv -> conv, conv -> pool -> conv, conv -> flatten -> linear, where a
channel owns a *block* of H*W columns) and user ``nn.Sequential`` models alike.

Notation (0-based here, toolkit notation in the reference note): group ``g`` (``g = 0..D-1``) is hidden
layer ``g + 1``. Its *rows* are the group's producer axes (weight rows, bias, any per-unit parameter such
as a PReLU slope); its *columns* are its consumer axes (the next layer's weight columns, or the output
layer's for ``g = D-1``). A layer's weight is a producer of group ``g`` (rows) and a consumer of group
``g-1`` (columns) at once, so ``W_{g+1}[rows, cols]`` is written by indexing both axes. The columns of the
first layer are input coordinates and are never restricted.

Moves (each a straight segment; labels are the module constants):

* ``OUTPUT`` - *output-layer interpolation* (type (a)): only the output layer (weight and bias) changes;
  the logits are affine in it and the loss is convex in the logits, so the loss along the segment is at
  most the larger of its two ends.
* ``REWIRE`` - *free-unit rewiring* (type (b)): only rows of units with no path to the output change;
  the function, hence the loss, is constant.
* ``PERMUTE`` - Lemma 4's *permutation* segments: row copies into free slots and column moves between
  units with identical rows; the function is constant.

Every dropped unit has its outgoing columns zeroed, so nothing relies on ``phi(0) = 0``: the moves are
exact for any elementwise activation. Index sets are 1-D ``LongTensor``s; when two index sets are paired
(a copy ``dst <- src``) they are paired by position.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from modeconn.units import UnitAxis, UnitSpec, unit_slices

State = dict[str, Tensor]

OUTPUT = "output-layer interpolation"
REWIRE = "free-unit rewiring"
PERMUTE = "permutation"

__all__ = [
    "OUTPUT", "REWIRE", "PERMUTE", "Chain", "UnsupportedArchitectureError", "as_units", "complement",
    "write_rows", "zero_rows", "scale_cols", "move_cols", "set_output", "dropout_state", "lemma1",
    "choose_slots", "check_half_zero", "lemma2", "lemma4", "free_slots", "states_equal",
]


class UnsupportedArchitectureError(ValueError):
    """The model is not a plain feed-forward chain of hidden layers (e.g. it has residual connections)."""


# ============================================================================== the chain of groups

@dataclass(frozen=True)
class Chain:
    """A unit spec read as a chain of hidden layers ``0..D-1`` followed by the output layer.

    ``rows[g]`` / ``cols[g]``: the producer / consumer axes of group ``g``; ``inputs[g]``: for each
    producer tensor of group ``g`` that also reads group ``g-1``, that consumer axis (the tensor's
    columns); ``output``: the output layer's state-dict keys.
    """

    spec: UnitSpec
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    rows: tuple[tuple[UnitAxis, ...], ...]
    cols: tuple[tuple[UnitAxis, ...], ...]
    inputs: tuple[dict, ...]
    output: tuple[str, ...]

    @property
    def depth(self) -> int:
        """D, the number of hidden layers."""
        return len(self.sizes)

    @property
    def keys(self) -> set[str]:
        """Every state-dict key the moves may change."""
        return {ax.name for g in range(self.depth) for ax in (*self.rows[g], *self.cols[g])} | set(self.output)

    @classmethod
    def from_spec(cls, spec: UnitSpec) -> "Chain":
        """Check that ``spec`` describes a plain chain and index it; raises
        :class:`UnsupportedArchitectureError` otherwise."""
        if not spec.groups:
            raise UnsupportedArchitectureError("the model has no hidden units: there is nothing to drop")
        if not spec.is_chain():
            merged = [g.layers for g in spec.groups if len(g.layers) > 1]
            raise UnsupportedArchitectureError(
                "this construction needs a plain feed-forward chain of hidden layers (each hidden layer read "
                "only by the next one); residual connections and branches are not supported"
                + (f" (residual additions merge the outputs of {merged[0]})" if merged else ""))
        if not spec.output:
            raise UnsupportedArchitectureError("the unit spec names no output layer")
        groups = spec.groups
        output = tuple(spec.output)
        inputs: list[dict] = [{}]
        for g in range(len(groups)):
            consumers = groups[g].consumers
            if not consumers:
                raise UnsupportedArchitectureError(f"hidden layer {groups[g].name!r} is read by no layer")
            nxt = {ax.name for ax in groups[g + 1].producers} if g + 1 < len(groups) else set(output)
            stray = [ax.name for ax in consumers if ax.name not in nxt]
            if stray:
                raise UnsupportedArchitectureError(
                    f"hidden layer {groups[g].name!r} is read by {stray}, which do not belong to the next layer")
            if g + 1 < len(groups):
                inputs.append({ax.name: ax for ax in consumers})
        for ax in (a for grp in groups for a in grp.producers):
            if ax.name in output:
                raise UnsupportedArchitectureError(f"{ax.name!r} is both a hidden producer and an output key")
        return cls(spec, tuple(g.name for g in groups), tuple(int(g.size) for g in groups),
                   tuple(tuple(g.producers) for g in groups), tuple(tuple(g.consumers) for g in groups),
                   tuple(inputs), output)


# ============================================================================== index-set helpers

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


def _idx(ax: UnitAxis, units: Tensor, size: int, device) -> Tensor:
    return unit_slices(ax, units, size).to(device)


def free_slots(kept: Tensor, size: int) -> Tensor:
    """Lemma 1's copy slots F: the first ``len(kept)`` units outside ``kept`` (paired with ``kept``
    by position)."""
    rest = complement(kept, size)
    if len(rest) < len(kept):
        raise ValueError(f"a layer of {size} units cannot hold a copy of {len(kept)} kept units "
                         f"(at most floor(h/2) = {size // 2} units may be kept)")
    return rest[: len(kept)]


# ============================================================================== primitive edits
# Each returns a new state dict; tensors it does not change are shared with the input.

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
        block = s.index_select(ax.axis, _idx(ax, src, n, s.device))
        cax = chain.inputs[g].get(ax.name) if (cols is not None and g > 0) else None
        if cax is not None:
            col_dst, col_src = cols
            m = chain.sizes[g - 1]
            picked = block.index_select(cax.axis, _idx(cax, col_src, m, s.device))
            if scale != 1.0:
                picked = picked * scale
            block = torch.zeros_like(block).index_copy_(cax.axis, _idx(cax, col_dst, m, s.device), picked)
        out[ax.name] = t.index_copy(ax.axis, _idx(ax, dst, n, t.device), block.to(t.dtype))
    return out


def zero_rows(state: Mapping[str, Tensor], chain: Chain, g: int, units: Tensor) -> State:
    """Rows ``units`` of group ``g`` (weight rows, bias, ...) set to zero."""
    out = dict(state)
    if len(units) == 0:
        return out
    for ax in chain.rows[g]:
        t = out[ax.name]
        out[ax.name] = t.index_fill(ax.axis, _idx(ax, units, chain.sizes[g], t.device), 0)
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
        si, di = _idx(ax, src, n, t.device), _idx(ax, dst, n, t.device)
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
        picked = s.index_select(ax.axis, _idx(ax, src, n, s.device))
        if scale != 1.0:
            picked = picked * scale
        out[ax.name] = torch.zeros_like(t).index_copy_(ax.axis, _idx(ax, dst, n, t.device), picked.to(t.dtype))
        col_keys.add(ax.name)
    other = bias_from if bias_from is not None else source
    for key in chain.output:
        if key not in col_keys and key in out:
            out[key] = other[key]
    return out


def states_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Same keys and bitwise-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ============================================================================== dropout versions

def _check_kept(chain: Chain, kept: Sequence, what: str = "kept") -> list[Tensor]:
    if len(kept) != chain.depth:
        raise ValueError(f"{what}: need one index set per hidden layer ({chain.depth}), got {len(kept)}")
    return [as_units(k, n, f"{what}[{g}] ({chain.names[g]})") for g, (k, n) in enumerate(zip(kept, chain.sizes))]


def _check_r(chain: Chain, r) -> list[float]:
    rs = [float(r)] * chain.depth if isinstance(r, (int, float)) else [float(x) for x in r]
    if len(rs) != chain.depth:
        raise ValueError(f"r: need one scale per hidden layer ({chain.depth}), got {len(rs)}")
    return rs


def dropout_state(chain: Chain, theta: Mapping[str, Tensor], kept: Sequence, r, k: int = 1,
                  canonical: bool = True) -> State:
    """theta_k: ``theta`` with dropout on hidden layers ``k..D`` (1-based ``k``, as in the reference).

    Kept unit ``j`` of a dropped layer ``g`` has its outgoing columns scaled by ``r[g]``; every other
    unit of a dropped layer has its outgoing columns zeroed. ``canonical=False`` returns just that (the
    column-masked net, used for scoring). ``canonical=True`` also zeroes what cannot matter: rows of the
    dropped units and, above the lowest dropped layer ``k``, the columns of kept rows that read dropped
    units, i.e. the canonical form Lemma 1 ends in (``k = 1``) - both compute the same function.
    """
    kept = _check_kept(chain, kept)
    r = _check_r(chain, r)
    D = chain.depth
    if not 1 <= k <= D:
        raise ValueError(f"k must be in 1..{D}, got {k}")
    if not canonical:
        out = dict(theta)
        for g in range(k - 1, D):
            f = torch.zeros(chain.sizes[g], dtype=torch.float64)
            f[kept[g]] = r[g]
            out = scale_cols(out, chain, g, f)
        return out
    out = set_output(theta, chain, theta, kept[D - 1], kept[D - 1], r[D - 1])
    for g in range(k - 1, D):
        if g > k - 1:
            out = write_rows(out, chain, g, kept[g], theta, kept[g], (kept[g - 1], kept[g - 1]), r[g - 1])
        out = zero_rows(out, chain, g, complement(kept[g], chain.sizes[g]))
    return out


# ============================================================================== Lemma 1

def lemma1(chain: Chain, theta: Mapping[str, Tensor], kept: Sequence, r) -> tuple[list[State], list[str]]:
    """Lemma 1: from ``theta`` to its full dropout version theta_1 (canonical form), passing through
    (a network computing) every theta_k, k = D, D-1, ..., 1.

    Returns ``(states, labels)``: ``states[0]`` is ``theta`` itself, ``states[-1]`` equals
    ``dropout_state(chain, theta, kept, r, k=1)``, and there are ``4D - 2`` segments: for D = 1,
    (a) the output reads only the kept units, scaled; (b) the dropped rows are zeroed. For D >= 2 the
    first (b) also writes a copy of theta_{D-1}'s top part into free slots F, and each step k -> k-1 is
    (a) output to the copy, (b) kept rows of layer k made identical to the copy, (a) output back,
    (b) copy erased, dropped rows of layer k-1 zeroed and the next copy written (reference section 4.3).
    Every output-layer segment ends in a network computing theta_k for some k (or one with loss
    unchanged), so the loss stays below ``max(L(theta), max_k L(theta_k))``.
    """
    kept = _check_kept(chain, kept)
    r = _check_r(chain, r)
    D, sizes = chain.depth, chain.sizes
    S = kept
    F = [free_slots(S[g], sizes[g]) for g in range(D)]
    W0 = dict(theta)
    states, labels = [W0], []

    def push(state: State, label: str) -> State:
        states.append(state)
        labels.append(label)
        return state

    # (a) output reads only the kept top units, scaled by r: equal in function to theta_D
    cur = push(set_output(W0, chain, W0, S[D - 1], S[D - 1], r[D - 1]), OUTPUT)
    # (b) dropped rows of the top layer zeroed (-> theta_D); first copy of theta_{D-1}'s top part into F
    cur = zero_rows(cur, chain, D - 1, complement(S[D - 1], sizes[D - 1]))
    if D >= 2:
        cur = write_rows(cur, chain, D - 1, F[D - 1], W0, S[D - 1], (S[D - 2], S[D - 2]), r[D - 2])
    cur = push(cur, REWIRE)
    for q in range(D - 1, 0, -1):  # q: group of layer k = q + 1; goes from theta_k to theta_{k-1}
        # (a) output switches to the copy (computes theta_{k-1})
        cur = push(set_output(cur, chain, W0, F[D - 1], S[D - 1], r[D - 1], bias_from=W0), OUTPUT)
        # (b) kept rows of layer k read only kept units of layer k-1, scaled: identical to the copy
        cur = push(write_rows(cur, chain, q, S[q], W0, S[q], (S[q - 1], S[q - 1]), r[q - 1]), REWIRE)
        # (a) output back to the kept units (the two chains are identical: same function)
        cur = push(set_output(cur, chain, W0, S[D - 1], S[D - 1], r[D - 1], bias_from=W0), OUTPUT)
        # (b) copy erased, dropped rows of layer k-1 zeroed (-> theta_{k-1}), next copy written
        for g in range(q, D):
            cur = zero_rows(cur, chain, g, F[g])
        cur = zero_rows(cur, chain, q - 1, complement(S[q - 1], sizes[q - 1]))
        if q - 1 >= 1:
            cur = write_rows(cur, chain, q - 1, F[q - 1], W0, S[q - 1], (S[q - 2], S[q - 2]), r[q - 2])
            for g in range(q, D):
                cur = write_rows(cur, chain, g, F[g], W0, S[g], (F[g - 1], S[g - 1]), r[g - 1])
        cur = push(cur, REWIRE)
    return states, labels


# ============================================================================== Lemma 4

def lemma4(chain: Chain, state: Mapping[str, Tensor], moves: Sequence[tuple[Tensor, Tensor] | None],
           occupied: Sequence[Tensor]) -> tuple[list[State], list[str]]:
    """Lemma 4: move non-zero units to new slots, every layer at once, with constant loss.

    ``occupied[g]``: the units of group ``g`` that are currently in use (N_g); every other unit must be
    *free* (zero outgoing columns). ``moves[g] = (src, dst)``: unit ``src[i]`` goes to slot ``dst[i]``
    (``None`` or empty: group unchanged; fixed points are ignored). Needs ``|free| >= |occupied|`` per
    layer. With pi'(j) = pi(j) when the target is free and a spare free slot otherwise, the segments are:

    1. rows pi'(j) <- rows j (whole rows);
    2. columns j -> pi'(j) (j's column zeroed): units j and pi'(j) have identical rows, so the function
       is unchanged - rows that are copies receive the same column moves and stay copies;
    3. rows pi(j) <- rows pi'(j) for targets that were occupied, and rows of vacated units zeroed;
    4. columns pi'(j) -> pi(j) for those targets;
    5. rows pi'(j) zeroed for those.

    Segments with nothing to do are left out, so the result has 0, 3 or 5 segments (all labelled
    ``PERMUTE``); when every target is a free slot (always so in Lemma 2 with :func:`choose_slots`),
    segments 4 and 5 are empty. ``states[0]`` is ``state``.
    """
    D = chain.depth
    if len(moves) != D or len(occupied) != D:
        raise ValueError(f"lemma4: need moves and occupied units for each of the {D} hidden layers")
    plan = []  # per group: (j, pi'(j)) pairs; (pi'(j), pi(j)) pairs for occupied targets; vacated units
    for g in range(D):
        n = chain.sizes[g]
        N = as_units(occupied[g], n, f"occupied[{g}]")
        Nset = set(N.tolist())
        pairs = []
        if moves[g] is not None:
            src, dst = (as_units(x, n, f"moves[{g}]") for x in moves[g])
            if len(src) != len(dst):
                raise ValueError(f"moves[{g}]: {len(src)} sources but {len(dst)} targets")
            pairs = [(int(j), int(p)) for j, p in zip(src, dst) if int(j) != int(p)]
        if any(j not in Nset for j, _ in pairs):
            raise ValueError(f"moves[{g}]: every moved unit must be occupied")
        moving = {j for j, _ in pairs}
        staying = Nset - moving
        if any(p in staying for _, p in pairs):
            raise ValueError(f"moves[{g}]: a unit would land on a unit that stays")
        targets = {p for _, p in pairs}
        spare = [z for z in range(n) if z not in Nset and z not in targets]
        prime, conflicts = [], []
        for j, p in pairs:
            if p in Nset:
                if not spare:
                    raise ValueError(f"lemma4: layer {chain.names[g]!r} has too few free units for the permutation")
                z = spare.pop(0)
                prime.append((j, z))
                conflicts.append((z, p))
            else:
                prime.append((j, p))
        vacated = sorted(moving - targets)
        plan.append((prime, conflicts, vacated))

    L = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    states, labels = [dict(state)], []
    cur = states[0]

    def step(edit) -> None:
        nonlocal cur
        new = cur
        for g in range(D):
            new = edit(new, g, *plan[g])
        if new is not cur:
            changed = any(new[k] is not cur[k] for k in new)
            if changed:
                states.append(new)
                labels.append(PERMUTE)
                cur = new

    def seg1(s, g, prime, conflicts, vacated):
        if not prime:
            return s
        return write_rows(s, chain, g, L([z for _, z in prime]), s, L([j for j, _ in prime]))

    def seg2(s, g, prime, conflicts, vacated):
        return move_cols(s, chain, g, L([j for j, _ in prime]), L([z for _, z in prime])) if prime else s

    def seg3(s, g, prime, conflicts, vacated):
        if conflicts:
            s = write_rows(s, chain, g, L([p for _, p in conflicts]), s, L([z for z, _ in conflicts]))
        return zero_rows(s, chain, g, L(vacated)) if vacated else s

    def seg4(s, g, prime, conflicts, vacated):
        return move_cols(s, chain, g, L([z for z, _ in conflicts]), L([p for _, p in conflicts])) if conflicts else s

    def seg5(s, g, prime, conflicts, vacated):
        return zero_rows(s, chain, g, L([z for z, _ in conflicts])) if conflicts else s

    for edit in (seg1, seg2, seg3, seg4, seg5):
        step(edit)
    return states, labels


# ============================================================================== Lemma 2

def choose_slots(chain: Chain, kept: Sequence, kept_prime: Sequence) -> list[Tensor]:
    """Slots T_g (outside ``kept[g]``, paired by position with ``kept_prime[g]``) where Lemma 2 writes the
    second network: a unit of ``kept_prime`` that is free in the first network keeps its own index, the
    others take the lowest indices outside ``kept | kept_prime``. So a layer whose kept sets are disjoint
    needs no permutation, and the permutation never targets an occupied slot."""
    kept, kept_prime = _check_kept(chain, kept), _check_kept(chain, kept_prime, "kept_prime")
    out = []
    for g, n in enumerate(chain.sizes):
        S, Sp = set(kept[g].tolist()), kept_prime[g].tolist()
        if len(S) + len(Sp) > n:
            raise ValueError(f"layer {chain.names[g]!r}: {len(S)} + {len(Sp)} kept units do not fit in {n} "
                             "(Lemma 2 needs at least half of every layer free in both networks)")
        spare = iter(u for u in range(n) if u not in S and u not in set(Sp))
        out.append(torch.tensor([u if u not in S else next(spare) for u in Sp], dtype=torch.long))
    return out


def _maxabs(t: Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def check_half_zero(chain: Chain, state: Mapping[str, Tensor], kept: Sequence, what: str = "theta",
                    atol: float = 0.0) -> None:
    """Raise ``ValueError`` unless only the ``kept`` units can reach the output: the output layer's columns
    outside ``kept[D-1]`` are zero and the kept rows of every layer ``g >= 1`` read only kept units."""
    kept = _check_kept(chain, kept)
    D = chain.depth
    for g in range(D):
        rest = complement(kept[g], chain.sizes[g])
        if g == D - 1:
            for ax in chain.cols[g]:
                t = state[ax.name]
                if _maxabs(t.index_select(ax.axis, _idx(ax, rest, chain.sizes[g], t.device))) > atol:
                    raise ValueError(f"{what}: the output layer reads units of {chain.names[g]!r} outside the kept set")
        if g + 1 < D:
            for ax in chain.rows[g + 1]:
                cax = chain.inputs[g + 1].get(ax.name)
                if cax is None:
                    continue
                t = state[ax.name]
                sub = t.index_select(ax.axis, _idx(ax, kept[g + 1], chain.sizes[g + 1], t.device))
                sub = sub.index_select(cax.axis, _idx(cax, rest, chain.sizes[g], t.device))
                if _maxabs(sub) > atol:
                    raise ValueError(f"{what}: kept units of {chain.names[g + 1]!r} read dropped units of "
                                     f"{chain.names[g]!r}")


def lemma2(chain: Chain, theta: Mapping[str, Tensor], kept: Sequence, theta_prime: Mapping[str, Tensor],
           kept_prime: Sequence, slots: Sequence | None = None, permute: bool = True,
           check: bool = True) -> tuple[list[State], list[str]]:
    """Lemma 2: connect two networks in which only the ``kept`` (resp. ``kept_prime``) units reach the
    output, with loss at most ``max(L(theta), L(theta_prime))``.

    1. (b) rows ``T = slots`` (default :func:`choose_slots`) get theta_prime's kept rows, reading only
       ``T`` of the layer below; rows of theta's units outside ``kept | T`` (dead rows, e.g. after
       column-only dropout) are zeroed;
    2. (a) the output layer moves from theta's to theta_prime's (its columns placed on ``T``, its bias);
    3. (b) every row outside ``T`` is zeroed: the state is theta_prime's subnetwork at positions ``T``;
    4. with ``permute``, Lemma 4 moves ``T`` to ``kept_prime`` (:func:`lemma4`; nothing when
       ``T == kept_prime``, e.g. disjoint kept sets; otherwise 3 segments with the default slots).

    Both networks need ``|kept[g]| + |kept_prime[g]| <= h_g``. With ``permute`` and theta_prime zero
    outside its kept subnetwork (the canonical form :func:`lemma1` ends in), the last state equals
    theta_prime bitwise; otherwise it is theta_prime's kept subnetwork (at ``T`` without ``permute``).
    ``states[0]`` is ``theta``. ``check`` verifies the hypothesis with :func:`check_half_zero`.
    """
    S = _check_kept(chain, kept)
    Sp = _check_kept(chain, kept_prime, "kept_prime")
    T = choose_slots(chain, S, Sp) if slots is None else _check_kept(chain, slots, "slots")
    D, sizes = chain.depth, chain.sizes
    for g in range(D):
        if len(T[g]) != len(Sp[g]) or set(T[g].tolist()) & set(S[g].tolist()):
            raise ValueError(f"slots[{g}] must pair with kept_prime[{g}] and avoid kept[{g}]")
    if check:
        check_half_zero(chain, theta, S, "theta")
        check_half_zero(chain, theta_prime, Sp, "theta_prime")
    states, labels = [dict(theta)], []
    # 1. (b) write theta_prime's subnetwork into the free slots T
    cur = states[0]
    for g in range(D):
        dead = complement(torch.cat([S[g], T[g]]), sizes[g])
        cur = zero_rows(cur, chain, g, dead)
        cur = write_rows(cur, chain, g, T[g], theta_prime, Sp[g], None if g == 0 else (T[g - 1], Sp[g - 1]))
    states.append(cur)
    labels.append(REWIRE)
    # 2. (a) output layer: theta's -> theta_prime's, read from T
    cur = set_output(cur, chain, theta_prime, T[D - 1], Sp[D - 1])
    states.append(cur)
    labels.append(OUTPUT)
    # 3. (b) erase theta's subnetwork
    for g in range(D):
        cur = zero_rows(cur, chain, g, complement(T[g], sizes[g]))
    states.append(cur)
    labels.append(REWIRE)
    if permute:
        more, more_labels = lemma4(chain, cur, [(T[g], Sp[g]) for g in range(D)], T)
        states += more[1:]
        labels += more_labels
    return states, labels
