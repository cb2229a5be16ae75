"""Lemma 1 (Kuditipudi et al. 2019): from a network to its full dropout version, through every theta_k.

theta_k is theta with dropout on hidden layers k..D (:func:`dropout_state`); Lemma 1's path passes through
(a network computing) each of them, so its loss stays below max(L(theta), max_k L(theta_k)).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from modeconn.kuditipudi.chain import Chain
from modeconn.kuditipudi.edits import (
    OUTPUT, REWIRE, check_kept, check_r, complement, free_slots, scale_cols, set_output, write_rows, zero_rows,
)
from modeconn.params.state import State

__all__ = ["dropout_state", "lemma1"]


def dropout_state(chain: Chain, theta: Mapping[str, Tensor], kept: Sequence, r, k: int = 1,
                  canonical: bool = True) -> State:
    """theta_k: ``theta`` with dropout on hidden layers ``k..D`` (1-based ``k``, as in the reference).

    Kept unit ``j`` of a dropped layer ``g`` has its outgoing columns scaled by ``r[g]``; every other
    unit of a dropped layer has its outgoing columns zeroed. ``canonical=False`` returns just that (the
    column-masked net, used for scoring). ``canonical=True`` also zeroes what cannot matter: rows of the
    dropped units and, above the lowest dropped layer ``k``, the columns of kept rows that read dropped
    units, i.e. the canonical form Lemma 1 ends in (``k = 1``) - both compute the same function.
    """
    kept = check_kept(chain, kept)
    r = check_r(chain, r)
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
    kept = check_kept(chain, kept)
    r = check_r(chain, r)
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

