"""Plain state dicts, the one currency of paths and constructions: ``{name: tensor}`` keyed like a model's
``state_dict()``."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

State = dict[str, Tensor]

__all__ = ["State", "float_state", "interpolate", "states_equal"]


def float_state(state: Mapping[str, Tensor]) -> State:
    """The floating-point entries of a state dict (parameters and float buffers), detached."""
    return {k: v.detach() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], t: float) -> State:
    """The point at ``t`` of the straight segment a -> b: ``a`` and ``b`` themselves at 0 and 1 (shared
    tensors), ``torch.lerp`` in between; every piecewise-linear path and construction computes it so."""
    if t == 0.0:
        return dict(a)
    if t == 1.0:
        return dict(b)
    return {k: torch.lerp(a[k], b[k], t) for k in a}


def states_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Same keys and bitwise-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
