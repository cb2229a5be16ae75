"""Algorithm 1 of Kuditipudi et al. (2019): a random dropout copy of a network.

``Dropout(A_i, p)`` draws, for every column j of A_i (i >= 2), delta_j = 0 with probability p and
delta_j = 1/(1-p) otherwise, and multiplies column j by delta_j. Column j of A_i is read by hidden unit j of
layer i-1, so in unit-spec terms: for every hidden group, each unit is dropped independently with
probability p; the group's *consumer* axes (the next layer's input axis, with its ``block`` of entries per
unit, e.g. the H*W columns of a channel after a flatten) are zeroed for dropped units and multiplied by
1/(1-p) for kept ones. Producers (rows, biases, norm parameters) are left alone, so the input layer's
columns and the output layer's rows are never touched: the input and the logits are never dropped.

This is the noise-path constructor's first move (Theorem 2, with p = 3/4) and the perturbation along which
:func:`modeconn.kuditipudi.noise_stability.noise_stability` measures interlayer smoothness.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from modeconn.units import UnitSpec, infer

__all__ = ["random_dropout", "dropout_masks", "apply_dropout"]


def _spec_of(model_or_spec: nn.Module | UnitSpec, example_input) -> UnitSpec:
    if isinstance(model_or_spec, UnitSpec):
        return model_or_spec
    if isinstance(model_or_spec, nn.Module):
        if example_input is None:
            raise ValueError("random_dropout: pass example_input to infer the unit spec of a model "
                             "(or pass the UnitSpec itself)")
        return infer(model_or_spec, example_input)
    raise TypeError(f"expected an nn.Module or a UnitSpec, got {type(model_or_spec).__name__}")


def dropout_masks(spec: UnitSpec, p: float, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Per hidden group, a bool mask of dropped units, each unit dropped independently with probability p.

    Draws one ``torch.rand(size)`` per group, in the spec's (forward) order, from ``generator``.
    """
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
    gdev = generator.device if generator is not None else torch.device("cpu")
    return {g.name: torch.rand(g.size, generator=generator, device=gdev).lt(p).cpu() for g in spec.groups}


def apply_dropout(spec: UnitSpec, theta: Mapping[str, Tensor], dropped: Mapping[str, Tensor], p: float
                  ) -> dict[str, Tensor]:
    """A copy of ``theta`` with Algorithm 1 applied for the given dropped units.

    ``dropped[group]`` is a bool mask (length = group size) or a LongTensor of dropped unit indices. Every
    consumer axis of the group has the dropped units' entries zeroed and the kept ones scaled by 1/(1-p).
    Tensors not touched are the same objects as in ``theta``. Raises ``KeyError`` when a consumer key is
    missing from ``theta``.
    """
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
    out = dict(theta)
    scale = 1.0 / (1.0 - p)
    groups = {g.name: g for g in spec.groups}
    for name, which in dropped.items():
        if name not in groups:
            raise KeyError(f"no unit group {name!r}; groups: {list(groups)}")
        g = groups[name]
        which = torch.as_tensor(which)
        if which.dtype == torch.bool:
            if which.numel() != g.size:
                raise ValueError(f"dropped[{name!r}] mask has {which.numel()} entries, group has {g.size}")
            mask = which.reshape(-1).cpu()
        else:
            mask = torch.zeros(g.size, dtype=torch.bool)
            idx = which.reshape(-1).long().cpu()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= g.size):
                raise IndexError(f"dropped[{name!r}] has unit indices out of range for {g.size} units")
            mask[idx] = True
        factors = torch.where(mask, torch.tensor(0.0, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
        for ax in g.consumers:
            if ax.name not in out:
                raise KeyError(f"random_dropout: theta lacks {ax.name!r}, a consumer of unit group {name!r}")
            t = out[ax.name]
            if not torch.is_floating_point(t):
                raise TypeError(f"{ax.name!r} is not a floating-point tensor")
            per_entry = factors.repeat_interleave(ax.block).to(device=t.device, dtype=t.dtype)
            if per_entry.numel() != t.shape[ax.axis]:
                raise ValueError(f"{ax.name!r} axis {ax.axis} has length {t.shape[ax.axis]}, expected "
                                 f"{g.size} units x block {ax.block}")
            shape = [1] * t.dim()
            shape[ax.axis] = -1
            out[ax.name] = t * per_entry.reshape(shape)
    return out


def random_dropout(model_or_spec: nn.Module | UnitSpec, theta: Mapping[str, Tensor] | None, p: float,
                   generator: torch.Generator | None = None, example_input=None
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Algorithm 1 (Kuditipudi et al. 2019) on every hidden group at once.

    Each hidden unit is dropped independently with probability ``p``: its outgoing columns (the group's
    consumer axes, ``block`` entries per unit) are zeroed; every kept unit's outgoing columns are scaled by
    exactly 1/(1-p). Input and output are never dropped; rows, biases and norm parameters are unchanged.

    ``model_or_spec`` is a :class:`~modeconn.units.UnitSpec`, or a model (then ``example_input`` is needed
    to infer its spec; ``theta=None`` then means the model's own state dict). Returns
    ``(theta_hat, dropped)`` with ``dropped[group name]`` the sorted LongTensor of dropped unit indices.
    Deterministic given the ``generator`` state (one ``torch.rand(size)`` per group, in forward order).
    """
    spec = _spec_of(model_or_spec, example_input)
    if theta is None:
        if not isinstance(model_or_spec, nn.Module):
            raise ValueError("random_dropout: theta is required when a UnitSpec is given")
        theta = model_or_spec.state_dict()
    masks = dropout_masks(spec, p, generator)
    theta_hat = apply_dropout(spec, theta, masks, p)
    dropped = {name: torch.nonzero(m, as_tuple=False).reshape(-1) for name, m in masks.items()}
    return theta_hat, dropped
