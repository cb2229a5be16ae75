"""Activation matching: pair units whose activations on training data correlate most.

A group's activations are observed where its units are read: the input of every layer that consumes
the group (the next Linear/Conv), which is the producing layer's output after its nonlinearity, norm and
pooling (a group no layer reads as plain input features is observed at its producing layers' outputs). Conv maps are flattened over batch and space (and over the H*W block of a conv -> linear
flatten); a residual stream is observed at every layer that reads it. Per group (per tie of
blocked groups), one linear assignment maximises the summed Pearson correlations of matched units. Groups are solved in forward order;
permuting earlier groups does not change any unit's activation values (only their order), so one pass of
each network over the data measures every group as it would be seen on the already-permuted prefix.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from modeconn.align.alignment import (Alignment, check_states, fraction_permuted, module_of, resolve_spec,
                                      unit_columns, unit_dim)
from modeconn.align.assign import assign, steps
from modeconn.data import iter_batches, materialize
from modeconn.units import UnitSpec


class _Moments:
    """Running first and second moments of paired observations (a, b) of one group's units."""

    def __init__(self, n: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.count, self.sa, self.sb, self.saa, self.sbb, self.sab = 0, z(n), z(n), z(n), z(n), z(n, n)

    def add(self, a: Tensor, b: Tensor) -> None:
        a, b = a.double(), b.double()
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self) -> Tensor:
        """Pearson correlation of A's unit i with B's unit j (0 where a unit never varies)."""
        n = max(self.count, 1)
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - ma[:, None] * mb[None, :]
        sa = (self.saa / n - ma ** 2).clamp_min(0).sqrt()
        sb = (self.sbb / n - mb ** 2).clamp_min(0).sqrt()
        denom = sa[:, None] * sb[None, :]
        return torch.where(denom > 1e-12, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


def _observers(model: nn.Module, spec: UnitSpec) -> dict[str, list[tuple[str, object, bool]]]:
    """``{group: [(module path, unit axis, reads_input)]}``: where each group's activations are observed.

    The layers that read the group (consumer axes on a layer's input features); a group nobody reads as
    a plain input feature (a depthwise conv, say) is observed at its producing layers' outputs instead."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    out = {}
    for g in spec.groups:
        seen, obs = set(), []
        for ax in g.consumers:
            path = module_of(ax.name)
            m, w = modules.get(path), params.get(ax.name)
            reads = isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and ax.name == f"{path}.weight" \
                and ax.axis == 1 and getattr(m, "groups", 1) == 1 and w is not None
            if reads and (path, ax.offset) not in seen:
                seen.add((path, ax.offset))
                obs.append((path, ax, True))
        if not obs:
            for ax in g.producers:
                path = module_of(ax.name)
                if ax.axis == 0 and ax.name == f"{path}.weight" and isinstance(modules.get(path), nn.Module):
                    obs.append((path, ax, False))
        out[g.name] = obs
    return out


def _columns(x: Tensor, module: nn.Module, ax, size: int) -> Tensor:
    """The group's units in a layer's input (or output) ``x`` as an ``(observations, size)`` matrix."""
    dim = unit_dim(module) % x.dim()
    part = x.narrow(dim, ax.offset, size * ax.block)
    return unit_columns(part, dim, size)


def activation_matching(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], data, *,
                        spec: UnitSpec | None = None, max_items: int = 2048, batch_size: int = 256) -> Alignment:
    """Permute ``theta_b`` into ``theta_a``'s unit order by the correlation of unit activations.

    ``data``: training data (a modeconn ``Dataset``, an ``(inputs, targets)`` pair or batches); its first
    ``max_items`` inputs are used, ``batch_size`` at a time, both networks in eval mode. ``objective`` is
    ``[summed correlation of units in B's own order, summed correlation of the matched units]``;
    ``info["mean_correlation"]`` gives the matched mean per group.
    """
    started = time.perf_counter()
    x, _ = materialize(data, max_items=max_items)
    spec = resolve_spec(model, spec, x[:2])
    check_states(model, spec, theta_a, theta_b)
    net_a, net_b = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    net_a.load_state_dict(dict(theta_a), strict=False)
    net_b.load_state_dict(dict(theta_b), strict=False)
    dev = next(iter(theta_a.values())).device
    net_a.to(dev), net_b.to(dev)
    observers = _observers(model, spec)
    moments = {g.name: _Moments(g.size, dev) for g in spec.groups}
    seen: dict[tuple, Tensor] = {}

    def hook(group, ax, side):
        def capture(module, inputs, output=None):
            x = inputs[0] if output is None else output
            cols = _columns(x.detach(), module, ax, group.size)
            if side == "a":
                seen[group.name, ax] = cols
            else:
                moments[group.name].add(seen.pop((group.name, ax)), cols)
        return capture

    handles = []
    for g in spec.groups:
        for path, ax, reads_input in observers[g.name]:
            for side, net in (("a", net_a), ("b", net_b)):
                m = net.get_submodule(path)
                register = m.register_forward_pre_hook if reads_input else m.register_forward_hook
                handles.append(register(hook(g, ax, side)))
    try:
        with torch.no_grad():
            for xb, _ in iter_batches((x, torch.zeros(len(x))), batch_size=batch_size, device=dev):
                net_a(xb)
                net_b(xb)
    finally:
        for h in handles:
            h.remove()
    perms, before, after, mean_corr = {}, 0.0, 0.0, {}
    for groups in steps(spec.groups):
        corrs = [moments[g.name].correlation().cpu() for g in groups]
        for g, corr, col in zip(groups, corrs, assign([c.numpy() for c in corrs], groups[0].blocks)):
            perms[g.name] = torch.as_tensor(col, dtype=torch.long)
            matched = corr[torch.arange(g.size), perms[g.name]]
            before, after = before + float(corr.diagonal().sum()), after + float(matched.sum())
            mean_corr[g.name] = float(matched.mean())
    theta = spec.permute(dict(theta_b), perms)
    info = {"items": len(x), "mean_correlation": mean_corr}
    return Alignment("activations", theta, perms, [before, after], fraction_permuted(model, spec),
                     time.perf_counter() - started, info)
