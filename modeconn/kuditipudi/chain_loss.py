"""The loss along a chain: a model prepared once for the Kuditipudi constructions, and its loss at any
state dict.

:class:`ChainLoss` holds the eval-mode module (BatchNorm folded into the preceding Conv/Linear layer, so
"zero a unit's row" zeroes the unit), its :class:`~modeconn.kuditipudi.chain.Chain`, and the training data
materialized once. Losses are the mean plain cross-entropy (float32 logits, float64 sum) on all of it.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from modeconn.params.batchnorm import fold_batchnorm, has_batchnorm
from modeconn.data import materialize
from modeconn.kuditipudi.chain import Chain
from modeconn.kuditipudi.edits import OUTPUT
from modeconn.params.state import State, float_state, interpolate
from modeconn.units import UnitSpec, infer

__all__ = ["ChainLoss", "prepare_endpoints", "measure_segments"]


class ChainLoss:
    """A model prepared for the constructions: eval-mode (BatchNorm-folded) module, its chain, the data.

    ``spec``: the model's unit spec when the caller has it (inferred once per run); without BatchNorm it is
    the module's spec, with BatchNorm it is checked to be a chain and the folded module's spec (its norm
    axes gone) is inferred. ``None``: inferred here.
    """

    def __init__(self, model: nn.Module, theta: Mapping[str, Tensor], data, max_items: int | None,
                 batch_size: int, device=None, spec: UnitSpec | None = None) -> None:
        theta = dict(theta)
        first = next((v for v in theta.values() if torch.is_tensor(v)), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        self.folded = has_batchnorm(model)
        self.x, self.y = materialize(data, "train", max_items, self.device)
        self.batch_size = int(batch_size)
        if self.folded:  # a residual model should hear that, not that its BN cannot fold
            Chain.from_spec(spec if spec is not None else infer(copy.deepcopy(model).to(self.device), self.x[:2]))
            spec = None
        module = fold_batchnorm(model, theta) if self.folded else copy.deepcopy(model)
        self.module = module.to(self.device).eval()
        if spec is None:
            spec = infer(self.module, self.x[:2])
        self.chain = Chain.from_spec(spec)
        self.theta = self._state(self.module.state_dict() if self.folded else theta)

    def prepare(self, model: nn.Module, theta: Mapping[str, Tensor]) -> State:
        """``theta`` (a state dict of ``model``) as a float state dict of the (folded) module, on the device."""
        return self._state(fold_batchnorm(model, theta).state_dict() if self.folded else theta)

    def _state(self, theta: Mapping[str, Tensor]) -> State:
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


def prepare_endpoints(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], data,
                      max_items: int | None, batch_size: int, device, spec: UnitSpec | None = None
                      ) -> tuple[ChainLoss, State, State]:
    """A :class:`ChainLoss` for ``model`` and both endpoints in its (BatchNorm-folded) parametrisation.

    The endpoints may differ only in tensors the chain's moves act on; anything else (say, a frozen
    embedding) could not be moved by the construction, so it is refused.
    """
    problem = ChainLoss(model, theta_a, data, max_items, batch_size, device, spec)
    a, b = problem.theta, problem.prepare(model, theta_b)
    for k in a:
        if k not in problem.chain.keys and not torch.equal(a[k], b[k]):
            raise ValueError(f"{k!r} differs between the endpoints but no move of this construction changes it")
    return problem, a, b


def measure_segments(problem: ChainLoss, states: Sequence[State], labels: Sequence[str],
                     known: Mapping[int, float], check_points: int) -> tuple[list[float], list[float], int]:
    """Loss at every state and the measured maximum of every segment: constant segments are their ends'
    loss; output-layer segments are also evaluated at ``check_points - 2`` interior points."""
    knot = [known[i] if i in known else problem.loss(states[i]) for i in range(len(states))]
    evaluations = len(states) - len(known)
    seg = []
    for i, label in enumerate(labels):
        m = max(knot[i], knot[i + 1])
        if label == OUTPUT:
            for j in range(1, check_points - 1):
                m = max(m, problem.loss(interpolate(states[i], states[i + 1], j / (check_points - 1))))
                evaluations += 1
        seg.append(m)
    return knot, seg, evaluations
