"""The one chain view of a feed-forward unit spec: hidden layers ``0..D-1``, then the output layer.

Kuditipudi et al.'s networks are chains x^1 = A_1 x^0, x^i = A_i phi(x^{i-1}). A model fits when its
:class:`~modeconn.units.UnitSpec` reads that way: every hidden unit group is produced by exactly one
Linear/Conv layer and read only by the layer producing the next group (the output layer for the last).
Norm layers, pooling, flatten and elementwise operations in between are fine; residual additions (merged
groups) and branches are not. Every construction and measurement of :mod:`modeconn.kuditipudi` starts from
:meth:`Chain.from_spec`, which says why a model does not fit.
"""
from __future__ import annotations

from dataclasses import dataclass

from modeconn.units import UnitAxis, UnitSpec

__all__ = ["Chain", "UnsupportedArchitectureError", "NotAChainError", "chain_layers"]


class UnsupportedArchitectureError(ValueError):
    """The model is not a plain feed-forward chain of hidden layers (e.g. it has residual connections)."""


NotAChainError = UnsupportedArchitectureError  # the name the noise-stability measurement raised it under


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def chain_layers(spec: UnitSpec) -> list[str] | None:
    """Module paths of the layers A_1..A_d (the producer of each hidden group, then the output layer), or
    ``None`` when the groups do not form a plain chain (see the module docstring)."""
    layers = []
    for i, g in enumerate(spec.groups):
        if g.layers:
            if len(g.layers) != 1:
                return None
            layers.append(g.layers[0])
        elif i > 0:  # hand-written spec: the previous group's single consumer
            prev = {_module_of(ax.name) for ax in spec.groups[i - 1].consumers}
            layers.append(next(iter(prev)) if len(prev) == 1 else None)
        else:
            layers.append(_module_of(g.producers[0].name) if g.producers else None)
    out_layer = _module_of(spec.output[0]) if spec.output else None
    for i, g in enumerate(spec.groups):
        if layers[i] is None or layers[i] not in {_module_of(ax.name) for ax in g.producers}:
            return None
        consumers = {_module_of(ax.name) for ax in g.consumers}
        nxt = layers[i + 1] if i + 1 < len(spec.groups) else out_layer
        if len(consumers) != 1 or nxt is None or consumers != {nxt}:
            return None
    return layers + [out_layer]


def _refusal(spec: UnitSpec) -> UnsupportedArchitectureError:
    merged = [g.layers for g in spec.groups if len(g.layers) > 1]
    return UnsupportedArchitectureError(
        "this construction needs a plain feed-forward chain of hidden layers (each hidden layer read "
        "only by the next one); residual connections and branches are not supported"
        + (f" (residual additions merge the outputs of {merged[0]})" if merged else ""))


@dataclass(frozen=True)
class Chain:
    """A unit spec read as a chain of hidden layers ``0..D-1`` followed by the output layer.

    ``rows[g]`` / ``cols[g]``: the producer / consumer axes of group ``g``; ``inputs[g]``: for each
    producer tensor of group ``g`` that also reads group ``g-1``, that consumer axis (the tensor's
    columns); ``output``: the output layer's state-dict keys; ``layers``: module paths of A_1..A_d.
    """

    spec: UnitSpec
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    rows: tuple[tuple[UnitAxis, ...], ...]
    cols: tuple[tuple[UnitAxis, ...], ...]
    inputs: tuple[dict, ...]
    output: tuple[str, ...]
    layers: tuple[str, ...]

    @property
    def depth(self) -> int:
        """D, the number of hidden layers."""
        return len(self.sizes)

    @property
    def keys(self) -> set[str]:
        """Every state-dict key the moves may change."""
        return {ax.name for g in range(self.depth) for ax in (*self.rows[g], *self.cols[g])} | set(self.output)

    @classmethod
    def from_spec(cls, spec: UnitSpec) -> "Chain":
        """Check that ``spec`` describes a plain chain and index it; raises
        :class:`UnsupportedArchitectureError` otherwise."""
        if not spec.groups:
            raise UnsupportedArchitectureError("the model has no hidden units: there is nothing to drop")
        spec.check_per_unit("this construction")  # LayerNorm / attention: units are not independent
        layers = chain_layers(spec)
        if layers is None:
            raise _refusal(spec)
        if not spec.output:
            raise UnsupportedArchitectureError("the unit spec names no output layer")
        groups = spec.groups
        output = tuple(spec.output)
        inputs: list[dict] = [{}]
        for g in range(len(groups)):
            consumers = groups[g].consumers
            if not consumers:
                raise UnsupportedArchitectureError(f"hidden layer {groups[g].name!r} is read by no layer")
            nxt = {ax.name for ax in groups[g + 1].producers} if g + 1 < len(groups) else set(output)
            stray = [ax.name for ax in consumers if ax.name not in nxt]
            if stray:
                raise UnsupportedArchitectureError(
                    f"hidden layer {groups[g].name!r} is read by {stray}, which do not belong to the next layer")
            if g + 1 < len(groups):
                inputs.append({ax.name: ax for ax in consumers})
        for ax in (a for grp in groups for a in grp.producers):
            if ax.name in output:
                raise UnsupportedArchitectureError(f"{ax.name!r} is both a hidden producer and an output key")
        return cls(spec, tuple(g.name for g in groups), tuple(int(g.size) for g in groups),
                   tuple(tuple(g.producers) for g in groups), tuple(tuple(g.consumers) for g in groups),
                   tuple(inputs), output, tuple(layers))
