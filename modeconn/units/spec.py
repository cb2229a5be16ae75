"""The unit-spec data model: which tensor axes of a model's state dict index its hidden units.

A *unit group* is a set of hidden units (channels / neurons) that must be permuted together. Its
``producers`` are the axes that create the units (a Linear/Conv weight's rows, its bias, the BatchNorm
parameters and buffers that act on them) and its ``consumers`` the axes that read them (the next layer's
weight columns). Permuting every producer and consumer axis of a group by the same permutation leaves the
network's function unchanged; :meth:`UnitSpec.permute` does that on a plain state dict.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["UnitAxis", "UnitGroup", "UnitSpec", "UnsupportedLayerError", "unit_slices"]


class UnsupportedLayerError(ValueError):
    """:func:`infer` met a layer or operation whose effect on the hidden units it cannot describe."""


@dataclass(frozen=True)
class UnitAxis:
    """One tensor axis indexed by a group's units."""
    name: str       # state-dict key (parameters *and* buffers such as BN running_mean)
    axis: int
    block: int = 1  # consecutive entries per unit along `axis` (conv -> flatten -> linear: H*W)


@dataclass
class UnitGroup:
    name: str
    size: int
    producers: list[UnitAxis]  # "rows": producing layers' weight rows, their bias, norm params/buffers
    consumers: list[UnitAxis]  # "columns": consuming layers' input axes
    #: module paths of the Linear/Conv layers whose outputs are these units (several when a residual
    #: addition merged groups); filled by :func:`infer`, optional for hand-written specs.
    layers: list[str] = field(default_factory=list)

    @property
    def axes(self) -> list[UnitAxis]:
        return [*self.producers, *self.consumers]


def unit_slices(axis: UnitAxis, units: Tensor, size: int) -> Tensor:
    """Indices along ``axis.axis`` of the entries that belong to ``units`` (in that order).

    With ``block == 1`` these are the unit indices themselves; otherwise unit ``j`` covers entries
    ``j*block .. (j+1)*block - 1``. ``size`` is the group size (used to check the unit indices).
    """
    units = torch.as_tensor(units, dtype=torch.long)
    if units.dim() != 1:
        raise ValueError(f"unit indices must be 1-D, got shape {tuple(units.shape)}")
    if units.numel() and (int(units.min()) < 0 or int(units.max()) >= size):
        raise IndexError(f"unit indices out of range for a group of {size} units")
    if axis.block == 1:
        return units
    offsets = torch.arange(axis.block, dtype=torch.long, device=units.device)
    return (units[:, None] * axis.block + offsets[None, :]).reshape(-1)


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


@dataclass
class UnitSpec:
    groups: list[UnitGroup]  # in forward order; hidden units only (never the input or the logits)
    output: list[str]        # state-dict keys of the output layer (weight, bias)

    # ------------------------------------------------------------------ queries
    def group(self, name: str) -> UnitGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no unit group {name!r}; groups: {[g.name for g in self.groups]}")

    @property
    def sizes(self) -> dict[str, int]:
        """``{group name: number of units}`` in forward order."""
        return {g.name: g.size for g in self.groups}

    def keys(self) -> set[str]:
        """Every state-dict key some group permutes."""
        return {ax.name for g in self.groups for ax in g.axes}

    def is_chain(self) -> bool:
        """True when the groups form a plain feed-forward chain: every group is produced by exactly one
        Linear/Conv layer and read by exactly one layer, which produces the next group (the output layer
        for the last group). Norm layers and elementwise operations in between are allowed; residual
        connections (merged groups) and branches are not."""
        layers = []
        for i, g in enumerate(self.groups):
            if g.layers:
                if len(g.layers) != 1:
                    return False
                layers.append(g.layers[0])
            elif i > 0:  # hand-written spec: the previous group's single consumer
                prev = {_module_of(ax.name) for ax in self.groups[i - 1].consumers}
                layers.append(next(iter(prev)) if len(prev) == 1 else None)
            else:
                layers.append(_module_of(g.producers[0].name) if g.producers else None)
        out_layer = _module_of(self.output[0]) if self.output else None
        for i, g in enumerate(self.groups):
            if layers[i] is None or layers[i] not in {_module_of(ax.name) for ax in g.producers}:
                return False
            consumers = {_module_of(ax.name) for ax in g.consumers}
            nxt = layers[i + 1] if i + 1 < len(self.groups) else out_layer
            if len(consumers) != 1 or nxt is None or consumers != {nxt}:
                return False
        return True

    # ------------------------------------------------------------------ permutations
    def random_perms(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One uniformly random permutation per group."""
        return {g.name: torch.randperm(g.size, generator=generator) for g in self.groups}

    def identity_perms(self) -> dict[str, Tensor]:
        return {g.name: torch.arange(g.size) for g in self.groups}

    def permute(self, state: Mapping[str, Tensor], perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A new state dict computing the same function, with group ``g``'s units reordered so that new
        unit ``i`` is old unit ``perms[g][i]``.

        Groups missing from ``perms`` are left alone; entries of ``state`` not touched by a permuted group
        (``num_batches_tracked``, the input layer's columns, ...) are the same tensor objects as in
        ``state``. Keys of the spec that ``state`` lacks are skipped, so a dict of parameters only (no
        buffers) works too.
        """
        out = dict(state)
        groups = {g.name: g for g in self.groups}
        hit = False
        for name, perm in perms.items():
            if name not in groups:
                raise KeyError(f"no unit group {name!r}; groups: {list(groups)}")
            g = groups[name]
            perm = torch.as_tensor(perm, dtype=torch.long).reshape(-1)
            if perm.numel() != g.size or not torch.equal(perm.sort().values, torch.arange(g.size)):
                raise ValueError(f"perms[{name!r}] is not a permutation of {g.size} units")
            for ax in g.axes:
                if ax.name not in out:
                    continue
                hit = True
                t = out[ax.name]
                out[ax.name] = t.index_select(ax.axis, unit_slices(ax, perm.to(t.device), g.size))
        if perms and not hit and any(groups[n].axes for n in perms):
            raise KeyError("none of the unit spec's keys is in the state dict "
                           f"(e.g. {next(ax.name for n in perms for ax in groups[n].axes)!r})")
        return out
