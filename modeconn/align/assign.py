"""Linear assignment for unit groups, flat or in blocks (attention heads, GroupNorm or conv groups).

A group with ``blocks > 1`` may only be permuted block onto whole block (a block permutation sigma and an
inner permutation per block), and groups with the same ``tie`` share sigma. The best such permutation of
a linear objective is found in two levels: for every pair of blocks (k, l) the inner assignment of A's
block k to B's block l and its value; then one assignment of blocks on the values summed over the tied
groups.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def best_permutation(cost: np.ndarray) -> np.ndarray:
    """``perm`` maximising ``sum_i cost[i, perm[i]]``."""
    return linear_sum_assignment(cost, maximize=True)[1]


def _block_values(cost: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """``values[k, l]``: the best inner assignment of A's block k to B's block l, ``inner[k, l]`` its
    permutation."""
    s = cost.shape[0] // blocks
    if s == 1:
        return cost, np.zeros((blocks, blocks, 1), dtype=np.int64)
    values = np.empty((blocks, blocks))
    inner = np.empty((blocks, blocks, s), dtype=np.int64)
    for k in range(blocks):
        for m in range(blocks):
            sub = cost[k * s:(k + 1) * s, m * s:(m + 1) * s]
            p = best_permutation(sub)
            inner[k, m], values[k, m] = p, sub[np.arange(s), p].sum()
    return values, inner


def assign(costs: Sequence[np.ndarray], blocks: int = 1) -> list[np.ndarray]:
    """Permutations maximising ``sum_g sum_i costs[g][i, perm_g[i]]``: independent ones when
    ``blocks == 1``; otherwise block-respecting ones with one block permutation shared by all groups."""
    if blocks == 1:
        return [best_permutation(c) for c in costs]
    parts = [_block_values(c, blocks) for c in costs]
    sigma = best_permutation(sum(v for v, _ in parts))
    out = []
    for c, (_, inner) in zip(costs, parts):
        s = c.shape[0] // blocks
        out.append((sigma[:, None] * s + inner[np.arange(blocks), sigma]).reshape(-1))
    return out


def steps(groups) -> list[list]:
    """The groups as assignment steps in forward order: one step per tie (its groups solved together),
    one per untied group."""
    out: list[list] = []
    ties: dict[str, list] = {}
    for g in groups:
        tie = getattr(g, "tie", None)
        if tie is None or getattr(g, "blocks", 1) == 1:
            out.append([g])
        elif tie in ties:
            ties[tie].append(g)
        else:
            ties[tie] = [g]
            out.append(ties[tie])
    return out
