"""Lemma 2 (Kuditipudi et al. 2019): connect two networks in each of which at most half of every hidden
layer reaches the output, with loss at most the larger of the two (no epsilon)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from modeconn.kuditipudi.chain import Chain
from modeconn.kuditipudi.edits import (
    OUTPUT, REWIRE, check_kept, complement, kept_only, set_output, unit_index, write_rows, zero_rows,
)
from modeconn.kuditipudi.lemma4 import lemma4
from modeconn.params.state import State, states_equal

__all__ = ["choose_slots", "check_half_zero", "lemma2", "end_at"]


def choose_slots(chain: Chain, kept: Sequence, kept_prime: Sequence) -> list[Tensor]:
    """Slots T_g (outside ``kept[g]``, paired by position with ``kept_prime[g]``) where Lemma 2 writes the
    second network: a unit of ``kept_prime`` that is free in the first network keeps its own index, the
    others take the lowest indices outside ``kept | kept_prime``. So a layer whose kept sets are disjoint
    needs no permutation, and the permutation never targets an occupied slot."""
    kept, kept_prime = check_kept(chain, kept), check_kept(chain, kept_prime, "kept_prime")
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
    kept = check_kept(chain, kept)
    D = chain.depth
    for g in range(D):
        rest = complement(kept[g], chain.sizes[g])
        if g == D - 1:
            for ax in chain.cols[g]:
                t = state[ax.name]
                if _maxabs(t.index_select(ax.axis, unit_index(ax, rest, chain.sizes[g], t.device))) > atol:
                    raise ValueError(f"{what}: the output layer reads units of {chain.names[g]!r} outside the kept set")
        if g + 1 < D:
            for ax in chain.rows[g + 1]:
                cax = chain.inputs[g + 1].get(ax.name)
                if cax is None:
                    continue
                t = state[ax.name]
                sub = t.index_select(ax.axis, unit_index(ax, kept[g + 1], chain.sizes[g + 1], t.device))
                sub = sub.index_select(cax.axis, unit_index(cax, rest, chain.sizes[g], t.device))
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
    S = check_kept(chain, kept)
    Sp = check_kept(chain, kept_prime, "kept_prime")
    T = choose_slots(chain, S, Sp) if slots is None else check_kept(chain, slots, "slots")
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


def end_at(chain: Chain, states: list[State], labels: list[str], target: State, kept: Sequence[Tensor]
            ) -> tuple[list[State], list[str], str]:
    """Make a Lemma 2 run that ends in ``target``'s kept subnetwork end in ``target`` itself.

    If ``states[-2]`` and ``target`` both let only the ``kept`` units reach the output and agree on
    everything but the rows of the other units, the straight segment between them keeps the function
    (linear conditions that hold at both ends hold along it): the last state is replaced by ``target``
    ("merged"). Otherwise one free-unit rewiring segment to ``target`` is appended ("extra segment"),
    after the same check between ``states[-1]`` and ``target``."""
    if states_equal(states[-1], target):
        return states, labels, "exact"
    check_half_zero(chain, target, kept, "the Lemma 2 target")
    masked = kept_only(chain, target, kept)
    for where, state in (("merged", states[-2]), ("extra segment", states[-1])):
        try:
            check_half_zero(chain, state, kept)
        except ValueError:
            continue
        if states_equal(kept_only(chain, state, kept), masked):
            if where == "merged":
                return states[:-1] + [target], labels, where
            return states + [target], labels + [REWIRE], where
    raise RuntimeError("internal error: Lemma 2 did not end in the target's kept subnetwork")
