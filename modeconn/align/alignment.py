"""The result of aligning one network to another, and what every matcher shares.

An :class:`Alignment` holds the permutation of every unit group of a :class:`~modeconn.units.UnitSpec`
and ``theta``: network B's full state dict with its units reordered into network A's order. Because
:meth:`UnitSpec.permute` moves every producer and consumer axis of a group together, ``theta`` computes
the same function as B; only its position in parameter space changes (next to A's).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modeconn.params import checks
from modeconn.units import UnitSpec, infer, unit_slices


@dataclass
class Alignment:
    """Network B permuted into network A's unit order.

    ``theta``: B's full state dict (buffers and integer entries included) after the permutation;
    ``perms``: ``{group: LongTensor}``, new unit ``i`` of group ``g`` is B's old unit ``perms[g][i]``;
    ``objective``: the matching objective before matching and after every sweep (weight matching: the summed
    inner products of A's and permuted B's parameters; activation matching: the summed correlations of
    matched units); ``fraction_permuted``: the share of the model's parameter entries whose unit axes
    are all permuted (:meth:`~modeconn.units.UnitSpec.coverage`); ``seconds``: wall time; ``info``: method-specific facts (sweeps, time split, ...).
    """

    method: str
    theta: dict[str, Tensor]
    perms: dict[str, Tensor]
    objective: list[float]
    fraction_permuted: float
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def moved(self) -> dict[str, int]:
        """``{group: number of units whose position changed}``."""
        return {g: int((p != torch.arange(len(p))).sum()) for g, p in self.perms.items()}

    def summary(self) -> dict:
        """JSON-ready facts for reports (no tensors)."""
        return {"method": self.method, "objective": list(self.objective), "seconds": self.seconds,
                "fraction_permuted": self.fraction_permuted, "groups": len(self.perms),
                "units_moved": sum(self.moved.values()),
                "units": sum(len(p) for p in self.perms.values()),
                **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool, list))}}


#: the share of weight entries a spec may leave unaligned before alignment warns
UNALIGNED_WARNING = 0.05


def resolve_spec(model: nn.Module, spec: UnitSpec | None, example_input) -> UnitSpec:
    """``spec`` as given, or the one :func:`modeconn.units.infer` traces on ``example_input``; warns (naming
    the layers) when the spec leaves more than 5% of the weight entries unaligned."""
    if spec is None:
        if example_input is None:
            raise ValueError("alignment needs the model's unit spec: pass spec=modeconn.units.infer(model, x) or "
                             "example_input=x (a small batch of inputs) so it can be inferred")
        spec = infer(model, example_input)
    left = 1.0 - spec.coverage(model)
    if left > UNALIGNED_WARNING:
        layers = spec.unaligned_layers(model)
        named = ", ".join(map(repr, layers[:8])) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
        warnings.warn(f"the unit spec leaves {100 * left:.1f}% of the weights unaligned (units it cannot permute), "
                      f"in {named}; alignment cannot move them and may change little (spec.skipped says why)",
                      UserWarning, stacklevel=3)
    return spec


def check_states(model: nn.Module, spec: UnitSpec, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor]) -> None:
    """Both states hold every tensor the spec permutes, and fit together and the model
    (:func:`modeconn.params.checks.check_states`: keys, shapes, dtypes, finite values); clear errors otherwise."""
    for key in sorted(spec.keys()):
        for which, state in (("theta_a", theta_a), ("theta_b", theta_b)):
            if key not in state:
                raise KeyError(f"{which} lacks {key!r}, which the unit spec permutes: was it saved from "
                               "another architecture?")
    checks.check_states(theta_a, theta_b, model, what="states to align")


def fraction_permuted(model: nn.Module, spec: UnitSpec) -> float:
    """Share of ``model``'s parameter entries whose unit axes are all permuted (:meth:`UnitSpec.coverage`)."""
    return spec.coverage(model)


def module_of(key: str) -> str:
    """The module path of a state-dict key (``"features.0.weight"`` -> ``"features.0"``)."""
    return key.rsplit(".", 1)[0] if "." in key else ""


def axis_index(ax, units: Tensor, length: int) -> Tensor:
    """A full index of an axis of ``length`` entries that reorders this group's segment by ``units`` and
    leaves the rest of the axis in place."""
    idx = torch.arange(length, dtype=torch.long, device=units.device)
    seg = unit_slices(ax, units, len(units))
    idx[ax.offset:ax.offset + len(seg)] = seg
    return idx


def segment(t: Tensor, ax, size: int) -> Tensor:
    """The part of ``t`` along ``ax.axis`` that holds the group's ``size`` units, as a ``(size, -1)``
    matrix: one row per unit (its block and every other axis flattened into the row)."""
    part = t.narrow(ax.axis, ax.offset, size * ax.block)
    return part.movedim(ax.axis, 0).reshape(size, -1)


def unit_dim(module: nn.Module) -> int:
    """The axis of a module's input and output tensors that indexes its features: the last one for
    ``nn.Linear`` and ``nn.LayerNorm`` (which act on the last axis of N-D inputs), dimension 1 for
convolutions, BatchNorm and GroupNorm."""
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def unit_columns(x: Tensor, dim: int, size: int) -> Tensor:
    """``x`` as a ``(observations, size)`` matrix: one column per unit on axis ``dim``.

    When that axis holds ``size * block`` entries (a flattened conv map read by a Linear layer), unit ``j``
    owns entries ``j*block .. (j+1)*block-1`` and its ``block`` entries become extra observations.
    """
    x = x.movedim(dim, -1)
    block = x.shape[-1] // size
    if block * size != x.shape[-1]:
        raise ValueError(f"a tensor with {x.shape[-1]} features cannot hold {size} units")
    return x.reshape(-1, size, block).transpose(1, 2).reshape(-1, size)
