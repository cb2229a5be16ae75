"""Dropout stability (Kuditipudi et al. 2019, Definition 1), measured the way Theorem 1's path uses it.

A network theta is epsilon-dropout stable when, for every k = 1..D, the network theta_k - dropout on hidden
layers k..D: a fixed kept set S_g of at most floor(h_g/2) units per layer whose outgoing columns are
scaled by r_g, every other unit of those layers with its outgoing columns zeroed - has
L(theta_k) <= L(theta) + epsilon. The path of Theorem 1 passes through every theta_k, so one kept set per
hidden layer is shared by all k (reference section 2.1).

:func:`dropout_stability` picks the kept sets as the best of ``trials`` uniformly random fixed-size sets
(``floor(keep * h)`` units per layer, at least 1), scored by ``max_k L(theta_k)``. Losses are the mean
plain cross-entropy of the network in eval mode on all of ``data`` (materialized once). BatchNorm is folded
into the preceding layer first, as the path construction needs (the function is unchanged).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from modeconn.kuditipudi.chain_loss import ChainLoss
from modeconn.kuditipudi.edits import as_units
from modeconn.kuditipudi.lemma1 import dropout_state

__all__ = ["DropoutStability", "dropout_stability", "stability_of", "nested_losses", "kept_size"]


@dataclass
class DropoutStability:
    """The result of :func:`dropout_stability` (JSON-friendly: plain lists and numbers).

    ``kept[g]``: the sorted kept units of hidden layer ``g`` (forward order, named ``groups[g]``); ``r[g]``
    the scale on their outgoing columns; ``loss`` = L(theta); ``losses[k-1]`` = L(theta_k) for k = 1..D
    (theta_1 drops every hidden layer, theta_D only the top one); ``epsilon`` = max(0, max_k L(theta_k) -
    L(theta)) - clamped at 0 because Theorem 1's bound max(L_A, L_B) + epsilon must also cover the
    endpoints (``gap`` is the unclamped difference); ``trial_scores`` = max_k L(theta_k) of every trial,
    ``best_trial`` its argmin (None when the kept sets were given).
    """

    keep: float
    groups: list[str]
    sizes: list[int]
    kept: list[list[int]]
    r: list[float]
    loss: float
    losses: list[float]
    epsilon: float
    gap: float
    trials: int
    seed: int
    trial_scores: list[float] = field(default_factory=list)
    best_trial: int | None = None
    num_items: int = 0
    folded_batchnorm: bool = False

    @property
    def kept_sizes(self) -> list[int]:
        return [len(k) for k in self.kept]

    def to_dict(self) -> dict:
        return asdict(self)


def kept_size(size: int, keep: float) -> int:
    """``floor(keep * size)`` (at least 1, at most ``size``)."""
    return min(size, max(1, math.floor(keep * size + 1e-9)))


def nested_losses(problem: ChainLoss, theta: Mapping[str, Tensor], kept: Sequence[Tensor], r: Sequence[float]
                  ) -> list[float]:
    """[L(theta_1), ..., L(theta_D)]: the column-masked dropout versions, each on the problem's data."""
    return [problem.loss(dropout_state(problem.chain, theta, kept, r, k, canonical=False))
            for k in range(1, problem.chain.depth + 1)]


def _resolve_r(r, keep: float, depth: int) -> list[float] | str:
    if r is None:
        return [1.0 / keep] * depth
    if isinstance(r, str):
        if r != "tune":
            raise ValueError(f"r must be None, a number, one number per hidden layer or 'tune'; got {r!r}")
        return r
    rs = [float(r)] * depth if isinstance(r, (int, float)) else [float(x) for x in r]
    if len(rs) != depth or any(not math.isfinite(x) or x <= 0 for x in rs):
        raise ValueError(f"r: need {depth} positive scale(s), got {r!r}")
    return rs


def _tune_r(problem: ChainLoss, theta, kept, r0: list[float], keep: float) -> tuple[list[float], list[float]]:
    """Coordinate descent over each layer's r (top layer first, one pass), minimising max_k L(theta_k)
    with ``scipy.optimize.minimize_scalar`` on [0.5/keep, 2/keep]; a change is kept only if it helps."""
    from scipy.optimize import minimize_scalar

    r = list(r0)
    losses = nested_losses(problem, theta, kept, r)
    best = max(losses)
    for g in reversed(range(problem.chain.depth)):
        def score(x: float, g: int = g) -> float:
            trial = list(r)
            trial[g] = float(x)
            return max(nested_losses(problem, theta, kept, trial))

        res = minimize_scalar(score, bounds=(0.5 / keep, 2.0 / keep), method="bounded",
                              options={"xatol": 1e-2 / keep, "maxiter": 25})
        if float(res.fun) < best:
            r[g] = float(res.x)
            losses = nested_losses(problem, theta, kept, r)
            best = max(losses)
    return r, losses


def stability_of(problem: ChainLoss, theta: Mapping[str, Tensor], keep: float, trials: int, seed: int,
               r=None, kept=None) -> DropoutStability:
    """Dropout stability of ``theta`` on a prepared :class:`ChainLoss` (shared by the path constructors)."""
    chain = problem.chain
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    rs = _resolve_r(r, keep, chain.depth)
    r_start = [1.0 / keep] * chain.depth if rs == "tune" else rs
    scores: list[float] = []
    best_trial = None
    if kept is not None:
        sets = [as_units(k, n, f"kept[{g}]").sort().values for g, (k, n) in enumerate(zip(kept, chain.sizes))] \
            if len(kept) == chain.depth else None
        if sets is None:
            raise ValueError(f"kept: need one index set per hidden layer ({chain.depth}), got {len(kept)}")
        losses = nested_losses(problem, theta, sets, r_start)
    else:
        if int(trials) < 1:
            raise ValueError(f"trials must be at least 1, got {trials}")
        gen = torch.Generator().manual_seed(int(seed))
        sizes = [kept_size(n, keep) for n in chain.sizes]
        sets, losses = None, None
        for t in range(int(trials)):
            cand = [torch.randperm(n, generator=gen)[:m].sort().values for n, m in zip(chain.sizes, sizes)]
            cand_losses = nested_losses(problem, theta, cand, r_start)
            scores.append(max(cand_losses))
            if best_trial is None or scores[-1] < scores[best_trial]:
                best_trial, sets, losses = t, cand, cand_losses
    if rs == "tune":
        r_start, losses = _tune_r(problem, theta, sets, r_start, keep)
    base = problem.loss(theta)
    gap = max(losses) - base
    return DropoutStability(
        keep=float(keep), groups=list(chain.names), sizes=list(chain.sizes), kept=[s.tolist() for s in sets],
        r=[float(x) for x in r_start], loss=base, losses=losses, epsilon=max(0.0, gap), gap=gap,
        trials=0 if kept is not None else int(trials), seed=int(seed), trial_scores=scores, best_trial=best_trial,
        num_items=len(problem.y), folded_batchnorm=problem.folded)


def dropout_stability(model: nn.Module, theta: Mapping[str, Tensor] | None, data, keep: float = 0.5,
                      trials: int = 20, seed: int = 0, *, r=None, kept: Sequence | None = None,
                      max_items: int | None = None, batch_size: int = 2048, device=None) -> DropoutStability:
    """How dropout stable ``theta`` is: one kept set per hidden layer, the scale r, every L(theta_k), epsilon.

    ``model``: any ``nn.Module`` whose unit spec is a plain chain (MLPs, conv nets, ``nn.Sequential``s;
    BatchNorm after a Conv/Linear is folded first). ``theta``: its state dict (``None``: the model's own).
    ``data``: a ``Dataset`` (its train split), an ``(x, y)`` pair or an iterable of batches; the first
    ``max_items`` examples when given. ``keep``: fraction of each hidden layer kept (``floor(keep*h)``, at
    least 1 unit). ``trials`` random kept sets are drawn from ``torch.Generator().manual_seed(seed)`` and the
    one with the smallest ``max_k L(theta_k)`` wins (the first on ties). ``r``: the scale on kept units'
    outgoing columns - ``None`` for 1/keep, a number, one number per hidden layer, or ``"tune"`` (per-layer
    coordinate descent from 1/keep, kept only where it lowers max_k L(theta_k)). ``kept``: use these kept
    sets (one index list per hidden layer) instead of searching.
    """
    if theta is None:
        theta = model.state_dict()
    problem = ChainLoss(model, theta, data, max_items, batch_size, device)
    return stability_of(problem, problem.theta, float(keep), trials, seed, r, kept)
