"""Weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023), on any inferred unit spec.

Find permutations P of B's unit groups maximising sum over every permuted parameter tensor of
<W_A, P(W_B)>. Coordinate descent: groups in random order, each step solves one linear assignment for a
single group with every other group's current permutation applied, until a sweep improves no group. The
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
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from modeconn.align.alignment import Alignment, axis_index, check_states, fraction_permuted, resolve_spec, segment
from modeconn.units import UnitSpec


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
        self.a_rows = {ax: segment(self.a[k], ax, self.sizes[g]) for k, axes in self.touch.items() for g, ax in axes}
        self.perms = {g.name: torch.arange(g.size, device=device) for g in self.groups}
        self.device = device

    def cost(self, group) -> Tensor:
        """C[i, j]: summed inner product of A's unit i and B's unit j over every tensor the group touches,
        with every other group's current permutation applied to B."""
        n = group.size
        c = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for ax in group.axes:
            if ax.name in self.touch:
                c += (self.a_rows[ax] @ segment(self.b[ax.name], ax, n).T).double()
        out = torch.empty_like(c)
        out[:, self.perms[group.name]] = c  # B's rows carry this group's permutation too: undo it
        return out

    def _moved(self, group, perm: Tensor) -> dict[str, Tensor]:
        """B's tensors touched by ``group`` as they would be with ``perm`` for that group."""
        inverse = torch.argsort(self.perms[group.name])
        step = inverse[perm]  # new unit i is currently stored at position step[i]
        out = {}
        for ax in group.axes:
            if ax.name in self.touch:
                t = out.get(ax.name, self.b[ax.name])
                out[ax.name] = t.index_select(ax.axis, axis_index(ax, step, t.shape[ax.axis]))
        return out

    def set(self, group, perm: Tensor) -> None:
        self.b.update(self._moved(group, perm))
        self.perms[group.name] = perm

    def self_coupled(self, group) -> bool:
        """Whether some tensor carries this group on two axes (a layer from a residual stream to itself),
        which makes the group's objective quadratic in its permutation."""
        return any(sum(1 for name, _ in self.touch[ax.name] if name == group.name) > 1
                   for ax in group.axes if ax.name in self.touch)

    def exact_gain(self, group, perm: Tensor) -> float:
        moved = self._moved(group, perm)
        return sum(_dot(self.a[k], moved[k]) - _dot(self.a[k], self.b[k]) for k in moved)

    def objective(self) -> float:
        return sum(_dot(self.a[k], self.b[k]) for k in self.touch)


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
    spec = resolve_spec(model, spec, example_input)
    check_states(spec, theta_a, theta_b)
    params = {k for k, _ in model.named_parameters()}
    dev = torch.device(device) if device is not None else next(iter(theta_b.values())).device
    prob = _Problem(spec, params, theta_a, theta_b, dev, dtype)
    gen = torch.Generator().manual_seed(seed)
    objective = [prob.objective()]
    cost_s = assign_s = 0.0
    sweeps, improved = 0, True
    while improved and sweeps < max_iter:
        sweeps += 1
        improved = False
        for i in torch.randperm(len(prob.groups), generator=gen).tolist():
            g = prob.groups[i]
            t0 = time.perf_counter()
            c = prob.cost(g).cpu().numpy()
            t1 = time.perf_counter()
            _, col = linear_sum_assignment(c, maximize=True)
            t2 = time.perf_counter()
            cost_s, assign_s = cost_s + t1 - t0, assign_s + t2 - t1
            rows, old = np.arange(g.size), prob.perms[g.name].cpu().numpy()
            gain = float(c[rows, col].sum() - c[rows, old].sum())
            tol = 1e-12 * (float(np.abs(c[rows, old]).sum()) + 1e-30)
            new = torch.as_tensor(col, dtype=torch.long, device=dev)
            if gain > tol and prob.self_coupled(g):  # the linear gain is only an estimate there
                gain = prob.exact_gain(g, new)
            if gain > tol:
                prob.set(g, new)
                improved = True
        objective.append(prob.objective())
    perms = {g.name: torch.arange(g.size) for g in spec.groups} | {k: v.cpu() for k, v in prob.perms.items()}
    theta = spec.permute(dict(theta_b), perms)
    info = {"sweeps": sweeps, "converged": not improved, "cost_seconds": cost_s, "assign_seconds": assign_s,
            "device": str(dev)}
    return Alignment("weights", theta, perms, objective, fraction_permuted(model, spec),
                     time.perf_counter() - started, info)
