"""Lemma 4 (Kuditipudi et al. 2019): any permutation of the non-zero units, at constant loss, when at
least half of every hidden layer is free."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from modeconn.kuditipudi.chain import Chain
from modeconn.kuditipudi.edits import PERMUTE, as_units, move_cols, write_rows, zero_rows
from modeconn.params.state import State

__all__ = ["lemma4"]


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

