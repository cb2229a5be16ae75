"""The unit-spec data model: which tensor axes of a model's state dict index its hidden units.

A *unit group* is a set of hidden units (channels, neurons, embedding features, attention head
dimensions) that must be permuted together. Its ``producers`` are the axes that create the units (a
Linear/Conv weight's rows, its bias, the norm parameters and buffers that act on them, an embedding
table's columns) and its ``consumers`` the axes that read them (the next layers' weight columns). Permuting
every producer and consumer axis of a group by the same permutation leaves the network's function
unchanged; :meth:`UnitSpec.permute` does that on a plain state dict.

Shape of the model (settled; :mod:`modeconn.align` builds on it):

* :class:`UnitAxis` ``(name, axis, block=1, offset=0, within=None)``: entries
  ``offset .. offset + size*block - 1`` of axis ``axis`` of state entry ``name`` belong to the group, unit
  ``j`` covering the ``block`` consecutive entries from ``offset + j*block`` (``block`` = H*W for
  conv -> flatten -> linear; ``offset`` for concatenations and fused q/k/v projections). ``within`` is set
  only for a grouped convolution's input channels: axis ``axis`` then holds a unit's index *inside its
  block* and the tensor's axis ``within`` (cut into the group's ``blocks`` equal parts) says which block.
* :class:`UnitGroup` ``(name, size, producers, consumers, layers, blocks=1, tie=None, mixing=[])``:
  ``blocks > 1`` means the units are ``blocks`` consecutive blocks of ``size // blocks`` (attention heads,
  GroupNorm groups, grouped-convolution groups). A permutation must then map every block onto one whole
  block: it is a *block permutation* sigma (of the blocks) with an *inner permutation* per block.
  Groups with the same ``tie`` share one sigma (an attention's q/k group and its v/out group; a grouped
  convolution's input and output groups), their inner permutations stay independent (q and k share one
  inner permutation of each head dimension, v and the output projection another). ``mixing`` names the
  layers that read the units jointly (LayerNorm, GroupNorm, attention): permutations commute with them,
  but zeroing or rescaling single units does not, so per-unit constructions (channel dropout) refuse such
  groups (:meth:`UnitSpec.check_per_unit`).
* :class:`UnitSpec` ``(groups, output, skipped=[], covered=None, unaligned=None)``; ``unaligned`` (set by
  :func:`~modeconn.units.infer`) lists the axis ranges that index hidden units the spec leaves in place,
  each as one :class:`UnitAxis` of one unit of ``block`` entries. A permutation of the spec is a dict
  ``{group name: flat LongTensor}`` (new unit ``i`` = old unit ``perm[i]``); :func:`split_perm` /
  :func:`join_perm` convert between a flat permutation and (sigma, inner permutations).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["UnitAxis", "UnitGroup", "UnitSpec", "UnsupportedLayerError", "unit_slices", "split_perm",
           "join_perm"]


class UnsupportedLayerError(ValueError):
    """:func:`~modeconn.units.infer` met a layer or operation whose effect on the hidden units it cannot
    describe (or a construction met units it cannot treat one by one)."""


@dataclass(frozen=True)
class UnitAxis:
    """One tensor axis (or a range of it) indexed by a group's units."""
    name: str       # state-dict key (parameters *and* buffers such as BN running_mean)
    axis: int
    block: int = 1  # consecutive entries per unit along `axis` (conv -> flatten -> linear: H*W)
    offset: int = 0  # first entry of the group along `axis` (torch.cat, fused q/k/v projections)
    within: int | None = None  # grouped conv input: `axis` is the index inside a block, axis `within` the block


@dataclass
class UnitGroup:
    name: str
    size: int
    producers: list[UnitAxis]  # "rows": producing layers' weight rows, their bias, norm params/buffers
    consumers: list[UnitAxis]  # "columns": consuming layers' input axes
    #: module paths of the Linear/Conv layers whose outputs are these units (several when a residual
    #: addition merged groups); filled by :func:`infer`, optional for hand-written specs.
    layers: list[str] = field(default_factory=list)
    blocks: int = 1            # units form `blocks` consecutive blocks permuted as wholes (heads, GroupNorm)
    tie: str | None = None     # groups with one tie share the permutation of their blocks
    mixing: list[str] = field(default_factory=list)  # layers reading the units jointly (LayerNorm, attention)

    @property
    def axes(self) -> list[UnitAxis]:
        return [*self.producers, *self.consumers]

    @property
    def block_size(self) -> int:
        return self.size // self.blocks


def unit_slices(axis: UnitAxis, units: Tensor, size: int) -> Tensor:
    """Indices along ``axis.axis`` of the entries that belong to ``units`` (in that order).

    Unit ``j`` covers entries ``offset + j*block .. offset + (j+1)*block - 1``. ``size`` is the group size
    (used to check the unit indices).
    """
    units = torch.as_tensor(units, dtype=torch.long)
    if units.dim() != 1:
        raise ValueError(f"unit indices must be 1-D, got shape {tuple(units.shape)}")
    if units.numel() and (int(units.min()) < 0 or int(units.max()) >= size):
        raise IndexError(f"unit indices out of range for a group of {size} units")
    if axis.block == 1:
        return units + axis.offset if axis.offset else units
    offsets = torch.arange(axis.block, dtype=torch.long, device=units.device)
    return (units[:, None] * axis.block + offsets[None, :]).reshape(-1) + axis.offset


def split_perm(perm: Tensor, blocks: int) -> tuple[Tensor, Tensor]:
    """``(sigma, inner)`` of a flat permutation of ``blocks`` blocks: new block ``i`` is old block
    ``sigma[i]`` and its unit ``j`` is that block's unit ``inner[i, j]``. Raises ``ValueError`` when
    ``perm`` splits a block."""
    perm = torch.as_tensor(perm, dtype=torch.long).reshape(blocks, -1)
    s = perm.shape[1]
    sigma = perm[:, 0] // s
    if not torch.equal(perm // s, sigma[:, None].expand_as(perm)):
        raise ValueError(f"the permutation splits a block of {s} units")
    return sigma, perm - sigma[:, None] * s


def join_perm(sigma: Tensor, inner: Tensor) -> Tensor:
    """The flat permutation of :func:`split_perm`'s ``(sigma, inner)``."""
    inner = torch.as_tensor(inner, dtype=torch.long)
    return (torch.as_tensor(sigma, dtype=torch.long)[:, None] * inner.shape[1] + inner).reshape(-1)


def _full_index(ax: UnitAxis, perm: Tensor, size: int, length: int) -> Tensor:
    idx = unit_slices(ax, perm, size)
    if ax.offset == 0 and idx.numel() == length:
        return idx
    full = torch.arange(length, dtype=torch.long, device=perm.device)
    full[ax.offset:ax.offset + idx.numel()] = idx
    return full


def _gather_within(t: Tensor, ax: UnitAxis, inner: Tensor) -> Tensor:
    """Reorder axis ``ax.axis`` of ``t`` per block of axis ``ax.within``: rows of block ``i`` (already in
    the new block order) read their entries in the order ``inner[i]``."""
    v = t.movedim((ax.within, ax.axis), (0, 1))
    blocks, s = inner.shape
    rows = v.shape[0] // blocks
    v = v.reshape(blocks, rows, *v.shape[1:])
    idx = inner[:, None, :].expand(blocks, rows, s).reshape(blocks, rows, s, *([1] * (v.dim() - 3)))
    v = torch.gather(v, 2, idx.expand_as(v).to(v.device))
    return v.reshape(blocks * rows, *v.shape[2:]).movedim((0, 1), (ax.within, ax.axis))


@dataclass
class UnitSpec:
    groups: list[UnitGroup]  # in forward order; hidden units only (never the input or the logits)
    output: list[str]        # state-dict keys of the output layer (weight, bias)
    #: what :func:`~modeconn.units.infer` (``strict=False``) left unpermuted, and why
    skipped: list[str] = field(default_factory=list)
    covered: float | None = None  # coverage(model) when infer made the spec
    #: axis ranges holding hidden units left unpermuted (one UnitAxis of one unit of `block` entries each);
    #: None when unknown (a hand-written spec: a tensor no group touches then counts as unaligned)
    unaligned: list[UnitAxis] | None = None

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

    def ties(self) -> dict[str, list[str]]:
        """``{tie: names of the groups sharing that block permutation}``."""
        out: dict[str, list[str]] = {}
        for g in self.groups:
            if g.tie is not None:
                out.setdefault(g.tie, []).append(g.name)
        return out

    def _aligned_entries(self, name: str, p: Tensor) -> int:
        """How many entries of parameter ``name`` have every unit axis permuted."""
        if self.unaligned is None:
            return p.numel() if name in self.keys() or name in self.output else 0
        masks: dict[int, Tensor] = {}
        for ax in self.unaligned:
            if ax.name == name:
                if p.dim() == 0:
                    return 0
                m = masks.setdefault(ax.axis, torch.zeros(p.shape[ax.axis], dtype=torch.bool))
                m[ax.offset:ax.offset + ax.block] = True
        n = p.numel()
        for axis, m in masks.items():
            n = n // p.shape[axis] * int((~m).sum())
        return n

    def coverage(self, params: nn.Module | Mapping[str, Tensor]) -> float:
        """Fraction of the parameter entries (of ``model.named_parameters()``, tied ones once) whose unit
        axes are all permuted: an entry counts unless one of its indices is a hidden unit the spec leaves in
        place (``unaligned``); the input's and the output layer's units never move, so they count as aligned.
        For a hand-written spec (``unaligned is None``): entries of tensors some group or the output touches.
        1.0 for a model without parameters."""
        items = params.named_parameters() if isinstance(params, nn.Module) else params.items()
        total = hit = 0
        for name, p in items:
            total += p.numel()
            hit += self._aligned_entries(name, p)
        return hit / total if total else 1.0

    def unaligned_layers(self, params: nn.Module | Mapping[str, Tensor]) -> list[str]:
        """Module paths of the parameters with entries :meth:`coverage` does not count, in model order."""
        items = params.named_parameters() if isinstance(params, nn.Module) else params.items()
        out = [name.rsplit(".", 1)[0] if "." in name else name for name, p in items
               if self._aligned_entries(name, p) < p.numel()]
        return list(dict.fromkeys(out))

    def check_per_unit(self, what: str = "this construction") -> None:
        """Raise :class:`UnsupportedLayerError` if some group's units are read jointly (LayerNorm,
        GroupNorm, attention): zeroing or rescaling single units is then not a per-unit operation."""
        for g in self.groups:
            if g.mixing:
                raise UnsupportedLayerError(f"{what} does not support {g.mixing[0]}")

    # ------------------------------------------------------------------ permutations
    def random_perms(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One uniformly random permutation per group that respects its blocks and ties: one random
        block permutation per tie (or per untied blocked group), one random inner permutation per block."""
        sigmas: dict[str, Tensor] = {}
        out = {}
        for g in self.groups:
            if g.blocks == 1:
                out[g.name] = torch.randperm(g.size, generator=generator)
                continue
            key = g.tie if g.tie is not None else f"\0{g.name}"
            if key not in sigmas:
                sigmas[key] = torch.randperm(g.blocks, generator=generator)
            inner = torch.stack([torch.randperm(g.block_size, generator=generator) for _ in range(g.blocks)])
            out[g.name] = join_perm(sigmas[key], inner)
        return out

    def check_perms(self, perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``perms`` as LongTensors, checked: each a permutation of its group's units that keeps its blocks
        whole, groups of one tie moving their blocks alike (a tied group left out counts as unmoved)."""
        groups = {g.name: g for g in self.groups}
        out: dict[str, Tensor] = {}
        sigma_of: dict[str, tuple[str, Tensor]] = {}
        for name, perm in perms.items():
            if name not in groups:
                raise KeyError(f"no unit group {name!r}; groups: {list(groups)}")
            g = groups[name]
            perm = torch.as_tensor(perm, dtype=torch.long).reshape(-1).cpu()
            if perm.numel() != g.size or not torch.equal(perm.sort().values, torch.arange(g.size)):
                raise ValueError(f"perms[{name!r}] is not a permutation of {g.size} units")
            if g.blocks > 1:
                try:
                    sigma, _ = split_perm(perm, g.blocks)
                except ValueError as e:
                    raise ValueError(f"perms[{name!r}]: {e} (the group has {g.blocks} blocks)") from None
                if g.tie is not None:
                    if g.tie in sigma_of and not torch.equal(sigma_of[g.tie][1], sigma):
                        raise ValueError(f"perms[{name!r}] and perms[{sigma_of[g.tie][0]!r}] move the blocks of "
                                         f"tie {g.tie!r} differently")
                    sigma_of.setdefault(g.tie, (name, sigma))
            out[name] = perm
        for tie, (name, sigma) in sigma_of.items():
            missing = [n for n in self.ties()[tie] if n not in out]
            if missing and not torch.equal(sigma, torch.arange(len(sigma))):
                raise ValueError(f"perms[{name!r}] moves the blocks of tie {tie!r} but {missing} are not permuted")
        return out

    def permute(self, state: Mapping[str, Tensor], perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A new state dict computing the same function, with group ``g``'s units reordered so that new
        unit ``i`` is old unit ``perms[g][i]``.

        Groups missing from ``perms`` are left alone; entries of ``state`` not touched by a permuted group
        (``num_batches_tracked``, the input layer's columns, ...) are the same tensor objects as in
        ``state``. Keys of the spec that ``state`` lacks are skipped, so a dict of parameters only (no
        buffers) works too.
        """
        perms = self.check_perms(perms)
        out = dict(state)
        groups = {g.name: g for g in self.groups}
        hit = False
        within: list[tuple[UnitAxis, UnitGroup, Tensor]] = []
        for name, perm in perms.items():
            g = groups[name]
            for ax in g.axes:
                if ax.name not in out:
                    continue
                hit = True
                if ax.within is not None:
                    within.append((ax, g, perm))
                    continue
                t = out[ax.name]
                out[ax.name] = t.index_select(ax.axis, _full_index(ax, perm.to(t.device), g.size, t.shape[ax.axis]))
        for ax, g, perm in within:  # after the rows moved: block i of the rows is new block i
            out[ax.name] = _gather_within(out[ax.name], ax, split_perm(perm, g.blocks)[1])
        if perms and not hit and any(groups[n].axes for n in perms):
            raise KeyError("none of the unit spec's keys is in the state dict "
                           f"(e.g. {next(ax.name for n in perms for ax in groups[n].axes)!r})")
        return out

    # ------------------------------------------------------------------ hand-written specs
    @classmethod
    def from_axes(cls, axes: Mapping[str, Sequence[str | None]], shapes: nn.Module | Mapping[str, Tensor],
                  output: Sequence[str] = ()) -> "UnitSpec":
        """A spec from git-re-basin's form ``{state key: (group or None per axis)}``, e.g.
        ``{"fc1.weight": ("P1", None), "fc1.bias": ("P1",), "fc2.weight": (None, "P1")}``.

        ``shapes`` (a model or a state dict) gives the axis lengths: a group's size is the shortest of its
        axes, longer ones hold ``block`` consecutive entries per unit (conv -> flatten -> linear). Axis 0
        counts as a producer, other axes as consumers; groups keep their first-seen order; ``output``
        names the output layer's keys.
        """
        state = shapes.state_dict() if isinstance(shapes, nn.Module) else shapes
        members: dict[str, list[tuple[str, int, int]]] = {}
        for key, per_axis in axes.items():
            if key not in state:
                raise KeyError(f"from_axes: {key!r} is not a key of the state dict")
            shape = tuple(state[key].shape)
            if len(per_axis) != len(shape):
                raise ValueError(f"from_axes: {key!r} has {len(shape)} axes, got {len(per_axis)} entries")
            for axis, grp in enumerate(per_axis):
                if grp is not None:
                    members.setdefault(grp, []).append((key, axis, shape[axis]))
        groups = []
        for grp, mem in members.items():
            size = min(n for _, _, n in mem)
            prod, cons = [], []
            for key, axis, n in mem:
                if n % size:
                    raise ValueError(f"from_axes: axis {axis} of {key!r} has {n} entries, not a multiple of "
                                     f"group {grp!r}'s {size} units")
                (prod if axis == 0 else cons).append(UnitAxis(key, axis, n // size))
            groups.append(UnitGroup(grp, size, prod, cons))
        return cls(groups=groups, output=list(output))
