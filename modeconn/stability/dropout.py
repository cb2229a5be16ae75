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

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from modeconn.batchnorm import fold_batchnorm, has_batchnorm
from modeconn.data import materialize
from modeconn.paths.base import float_state
from modeconn.paths.moves import Chain, as_units, dropout_state
from modeconn.units import infer

__all__ = ["DropoutStability", "dropout_stability", "kept_size"]


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


def prepare_endpoints(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], data,
                      max_items: int | None, batch_size: int, device) -> tuple["ChainLoss", dict, dict]:
    """A :class:`ChainLoss` for ``model`` and both endpoints in its (BatchNorm-folded) parametrisation.

    The endpoints may differ only in tensors the chain's moves act on; anything else (say, a frozen
    embedding) could not be moved by the construction, so it is refused.
    """
    problem = ChainLoss(model, theta_a, data, max_items, batch_size, device)
    a, b = problem.theta, problem.prepare(model, theta_b)
    for k in a:
        if k not in problem.chain.keys and not torch.equal(a[k], b[k]):
            raise ValueError(f"{k!r} differs between the endpoints but no move of this construction changes it")
    return problem, a, b


def kept_size(size: int, keep: float) -> int:
    """``floor(keep * size)`` (at least 1, at most ``size``)."""
    return min(size, max(1, math.floor(keep * size + 1e-9)))


# ----------------------------------------------------------------------------------- the problem

class ChainLoss:
    """A model prepared for dropout: eval-mode (BatchNorm-folded) module, its chain, the data."""

    def __init__(self, model: nn.Module, theta: Mapping[str, Tensor], data, max_items: int | None,
                 batch_size: int, device=None, spec=None) -> None:
        theta = dict(theta)
        first = next((v for v in theta.values() if torch.is_tensor(v)), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        self.folded = has_batchnorm(model)
        self.x, self.y = materialize(data, "train", max_items, self.device)
        self.batch_size = int(batch_size)
        if self.folded and spec is None:  # a residual model should hear that, not that its BN cannot fold
            Chain.from_spec(infer(copy.deepcopy(model).to(self.device), self.x[:2]))
        module = fold_batchnorm(model, theta) if self.folded else copy.deepcopy(model)
        self.module = module.to(self.device).eval()
        if spec is None:
            spec = infer(self.module, self.x[:2])
        self.chain = Chain.from_spec(spec)
        self.theta = self._state(self.module.state_dict() if self.folded else theta)

    def prepare(self, model: nn.Module, theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``theta`` (a state dict of ``model``) as a float state dict of the (folded) module, on the device."""
        return self._state(fold_batchnorm(model, theta).state_dict() if self.folded else theta)

    def _state(self, theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        state = {k: v.to(self.device) for k, v in float_state(theta).items()}
        want = [k for k, v in self.module.state_dict().items() if v.is_floating_point()]
        missing = [k for k in want if k not in state]
        if missing:
            raise KeyError(f"theta lacks entries of the model's state dict: {missing[:5]}")
        return {k: state[k] for k in want}

    @torch.no_grad()
    def loss(self, state: Mapping[str, Tensor]) -> float:
        """Mean cross-entropy on the data (float32 logits, float64 sum)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n = len(self.y)
        for start in range(0, n, self.batch_size):
            logits = functional_call(self.module, dict(state), (self.x[start:start + self.batch_size],))
            total += F.cross_entropy(logits.float(), self.y[start:start + self.batch_size], reduction="none").double().sum()
        return float(total / n)

    def nested_losses(self, theta: Mapping[str, Tensor], kept: Sequence[Tensor], r: Sequence[float]) -> list[float]:
        """[L(theta_1), ..., L(theta_D)]."""
        return [self.loss(dropout_state(self.chain, theta, kept, r, k, canonical=False))
                for k in range(1, self.chain.depth + 1)]


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
    losses = problem.nested_losses(theta, kept, r)
    best = max(losses)
    for g in reversed(range(problem.chain.depth)):
        def score(x: float, g: int = g) -> float:
            trial = list(r)
            trial[g] = float(x)
            return max(problem.nested_losses(theta, kept, trial))

        res = minimize_scalar(score, bounds=(0.5 / keep, 2.0 / keep), method="bounded",
                              options={"xatol": 1e-2 / keep, "maxiter": 25})
        if float(res.fun) < best:
            r[g] = float(res.x)
            losses = problem.nested_losses(theta, kept, r)
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
        losses = problem.nested_losses(theta, sets, r_start)
    else:
        if int(trials) < 1:
            raise ValueError(f"trials must be at least 1, got {trials}")
        gen = torch.Generator().manual_seed(int(seed))
        sizes = [kept_size(n, keep) for n in chain.sizes]
        sets, losses = None, None
        for t in range(int(trials)):
            cand = [torch.randperm(n, generator=gen)[:m].sort().values for n, m in zip(chain.sizes, sizes)]
            cand_losses = problem.nested_losses(theta, cand, r_start)
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
