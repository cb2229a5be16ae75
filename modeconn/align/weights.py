"""Weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023), on any inferred unit spec.

Find permutations P of B's unit groups maximising sum over every permuted parameter tensor of
<W_A, P(W_B)>. Coordinate descent: groups in random order, each step solves one linear assignment for a
single group (or the groups of one tie, jointly) with every other group's current permutation applied,
until a sweep improves no group. Blocked groups (attention heads, conv groups) keep their blocks whole
(:mod:`modeconn.align.assign`); a grouped convolution is matched as its dense block-diagonal weight. The
cost of group g is C = sum over the (tensor, axis) pairs g touches of A_(axis) @ B_(axis)^T, each tensor
flattened to (units, rest) along that axis, so residual streams (one group read and written by many
layers), conv channels, conv -> linear flatten blocks and BatchNorm affine parameters all enter the same
way. Running statistics are permuted with their channels but never matched on: they are buffers, not
parameters. No data is needed.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from modeconn.align.alignment import Alignment, axis_index, check_states, fraction_permuted, resolve_spec, segment
from modeconn.align.assign import assign, steps
from modeconn.units import UnitAxis, UnitSpec


class _Problem:
    """A's parameters and B's, kept permuted by every group's current permutation, on one device."""

    def __init__(self, spec: UnitSpec, params: set[str], theta_a, theta_b, device, dtype):
        self.groups = [g for g in spec.groups if any(ax.name in params for ax in g.axes)]
        self.sizes = {g.name: g.size for g in self.groups}
        self.touch: dict[str, list] = {}  # tensor -> [(group, UnitAxis)]
        for g in self.groups:
            for ax in g.axes:
                if ax.name in params:
                    self.touch.setdefault(ax.name, []).append((g.name, ax))
        self.a = {k: theta_a[k].detach().to(device, dtype) for k in self.touch}
        self.b = {k: theta_b[k].detach().to(device, dtype) for k in self.touch}  # permuted as we go
        for k, axes in self.touch.items():  # grouped conv inputs: work on the dense block-diagonal weight
            for i, (g, ax) in enumerate(axes):
                if getattr(ax, "within", None) is not None:
                    blocks = next(x.blocks for x in self.groups if x.name == g)
                    self.a[k], self.b[k] = (_dense(t, ax, blocks) for t in (self.a[k], self.b[k]))
                    axes[i] = (g, UnitAxis(ax.name, ax.axis, ax.block))
        self.a_rows = {ax: segment(self.a[k], ax, self.sizes[g]) for k, axes in self.touch.items() for g, ax in axes}
        self.perms = {g.name: torch.arange(g.size, device=device) for g in self.groups}
        self.device = device

    def axes(self, group) -> list:
        """The group's (dense) axes on parameter tensors."""
        return [ax for k in dict.fromkeys(a.name for a in group.axes) if k in self.touch
                for g, ax in self.touch[k] if g == group.name]

    def cost(self, group) -> Tensor:
        """C[i, j]: summed inner product of A's unit i and B's unit j over every tensor the group touches,
        with every other group's current permutation applied to B."""
        n = group.size
        c = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for ax in self.axes(group):
            c += (self.a_rows[ax] @ segment(self.b[ax.name], ax, n).T).double()
        out = torch.empty_like(c)
        out[:, self.perms[group.name]] = c  # B's rows carry this group's permutation too: undo it
        return out

    def _moved(self, groups, perms) -> dict[str, Tensor]:
        """B's tensors touched by ``groups`` as they would be with ``perms`` (one per group)."""
        out: dict[str, Tensor] = {}
        for group, perm in zip(groups, perms):
            step = torch.argsort(self.perms[group.name])[perm]  # new unit i is now stored at step[i]
            for ax in self.axes(group):
                t = out.get(ax.name, self.b[ax.name])
                out[ax.name] = t.index_select(ax.axis, axis_index(ax, step, t.shape[ax.axis]))
        return out

    def set(self, groups, perms) -> None:
        self.b.update(self._moved(groups, perms))
        self.perms.update({g.name: p for g, p in zip(groups, perms)})

    def neighbours(self, groups) -> list[str]:
        """The groups whose permutations enter these groups' cost matrices (sharing a tensor with them;
        themselves too when coupled)."""
        names = {g.name for g in groups}
        keys = {ax.name for g in groups for ax in self.axes(g)}
        out = {n for k in keys for n, _ in self.touch[k]}
        return sorted(out if self.coupled(groups) else out - names)

    def coupled(self, groups) -> bool:
        """Whether some tensor carries these groups on two axes (a layer from a residual stream to itself,
        a grouped convolution), which makes the step's objective quadratic in its permutations."""
        names = {g.name for g in groups}
        keys = {ax.name for g in groups for ax in self.axes(g)}
        return any(sum(1 for name, _ in self.touch[k] if name in names) > 1 for k in keys)

    def exact_gain(self, groups, perms) -> float:
        moved = self._moved(groups, perms)
        return sum(_dot(self.a[k], moved[k]) - _dot(self.a[k], self.b[k]) for k in moved)

    def objective(self) -> float:
        return sum(_dot(self.a[k], self.b[k]) for k in self.touch)


def _dense(t: Tensor, ax, blocks: int) -> Tensor:
    """A grouped convolution's weight as the dense block-diagonal weight of the same function: axis
    ``ax.axis`` (a unit's index inside its block) widened to every block's units, zero off the blocks of
    axis ``ax.within``."""
    v = t.movedim((ax.within, ax.axis), (0, 1))
    rows, width = v.shape[0] // blocks, v.shape[1]
    dense = v.new_zeros(v.shape[0], width * blocks, *v.shape[2:])
    for k in range(blocks):
        dense[k * rows:(k + 1) * rows, k * width:(k + 1) * width] = v[k * rows:(k + 1) * rows]
    return dense.movedim((0, 1), (ax.within, ax.axis))


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)).double())


def weight_matching(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], *,
                    spec: UnitSpec | None = None, example_input=None, max_iter: int = 100, seed: int = 0,
                    device: str | torch.device | None = None, dtype: torch.dtype = torch.float64) -> Alignment:
    """Permute ``theta_b`` into ``theta_a``'s unit order by weight matching.

    ``spec``: the model's :class:`~modeconn.units.UnitSpec` (inferred from ``example_input`` when omitted).
    ``max_iter`` caps the sweeps; ``seed`` fixes the random group order. ``device`` (default: theta_b's)
    is where the cost matrices are computed (a GPU makes large models fast); the assignments run on the CPU.
    Returns an :class:`Alignment` whose ``objective`` has one entry before matching and one per sweep (it
    never decreases: a step is taken only when it raises the objective).
    """
    started = time.perf_counter()
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1 (sweeps over the layers); got {max_iter!r}")
    spec = resolve_spec(model, spec, example_input)
    check_states(model, spec, theta_a, theta_b)
    params = {k for k, _ in model.named_parameters()}
    dev = torch.device(device) if device is not None else next(iter(theta_b.values())).device
    prob = _Problem(spec, params, theta_a, theta_b, dev, dtype)
    order = steps(prob.groups)
    neighbours = [prob.neighbours(groups) for groups in order]
    version = {g.name: 0 for g in prob.groups}
    solved: dict[int, tuple] = {}
    gen = torch.Generator().manual_seed(seed)
    objective = [prob.objective()]
    cost_s = assign_s = 0.0
    sweeps, solves, improved = 0, 0, True
    while improved and sweeps < max_iter:
        sweeps += 1
        improved = False
        for i in torch.randperm(len(order), generator=gen).tolist():
            groups = order[i]
            seen = tuple(version[n] for n in neighbours[i])
            if solved.get(i) == seen:  # nothing it depends on moved since its last solve: same answer
                continue
            solved[i] = seen
            solves += 1
            t0 = time.perf_counter()
            costs = [prob.cost(g).cpu().numpy() for g in groups]
            t1 = time.perf_counter()
            cols = assign(costs, groups[0].blocks)
            t2 = time.perf_counter()
            cost_s, assign_s = cost_s + t1 - t0, assign_s + t2 - t1
            gain = tol = 0.0
            for g, c, col in zip(groups, costs, cols):
                rows, old = np.arange(g.size), prob.perms[g.name].cpu().numpy()
                gain += float(c[rows, col].sum() - c[rows, old].sum())
                tol += 1e-12 * (float(np.abs(c[rows, old]).sum()) + 1e-30)
            new = [torch.as_tensor(col, dtype=torch.long, device=dev) for col in cols]
            if gain > tol and prob.coupled(groups):  # the linear gain is only an estimate there
                gain = prob.exact_gain(groups, new)
            if gain > tol:
                prob.set(groups, new)
                improved = True
                for g in groups:
                    version[g.name] += 1
                solved[i] = tuple(version[n] for n in neighbours[i])
        objective.append(prob.objective())
    perms = {g.name: torch.arange(g.size) for g in spec.groups} | {k: v.cpu() for k, v in prob.perms.items()}
    theta = spec.permute(dict(theta_b), perms)
    info = {"sweeps": sweeps, "solves": solves, "converged": not improved, "cost_seconds": cost_s, "assign_seconds": assign_s,
            "device": str(dev)}
    return Alignment("weights", theta, perms, objective, fraction_permuted(model, spec),
                     time.perf_counter() - started, info)
