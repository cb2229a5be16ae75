"""REPAIR (Jordan et al., ICLR 2023) as a path transform: any path, with its variance collapse undone.

Averaging two networks' weights shrinks their units' pre-activation spread, and the error compounds with
depth. At every interior point t of a path, REPAIR measures each hidden unit's pre-activation mean and
standard deviation on training data and rescales the unit so they become (1-t)·stat_A + t·stat_B, the
interpolation of the endpoints' own statistics; layers are corrected in forward order, each measured after
the corrections before it. The affine correction is folded into the producing layer's weight rows and
bias, so every point keeps the model's architecture and ``evaluate_path`` needs no change. The endpoints
are returned exactly.

Where a hidden layer feeds a BatchNorm (or a LayerNorm / GroupNorm) directly, the norm's output is the
pre-activation and the correction goes into its weight and bias; BatchNorm layers are run on batch statistics, as the evaluator's
per-point recompute will see them. For such a layer the recompute alone (the "reset BN" baseline) already
restores a per-unit spread of |gamma_t| around beta_t; REPAIR replaces that by the interpolated endpoint
statistics and, above all, corrects the units no BatchNorm normalises: layers writing into a residual
stream, classifier layers, and every layer of a network without BatchNorm. A layer without bias gets only
its spread corrected (there is nowhere to fold a shift).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from modeconn.align.alignment import module_of, unit_dim
from modeconn.data import materialize
from modeconn.params.path import Path, State, as_times
from modeconn.units import UnitSpec, infer

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _producing_layers(net: nn.Module, spec: UnitSpec) -> list[str]:
    """Module paths of the Linear/Conv layers whose outputs are hidden units."""
    modules = dict(net.named_modules())
    out: list[str] = []
    for g in spec.groups:
        names = g.layers or [module_of(ax.name) for ax in g.producers if ax.axis == 0]
        out += [n for n in names if isinstance(modules.get(n), _LAYERS) and n not in out]
    return out


_NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _followed_by_norm(net: nn.Module, layers: list[str]) -> dict[str, str]:
    """``{layer: norm}`` for layers whose output goes only into a per-unit-affine norm (BatchNorm,
    LayerNorm over the last axis, GroupNorm), found by a torch.fx trace (an untraceable model gets no
    redirection): the norm's output is then the pre-activation, and its affine takes the correction."""
    try:
        gm = torch.fx.symbolic_trace(net)
    except Exception:  # noqa: BLE001 - then every site is the layer itself
        return {}
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) in layers and len(node.users) == 1:
            user = next(iter(node.users))
            norm = gm.get_submodule(str(user.target)) if user.op == "call_module" else None
            if isinstance(norm, _BatchNorm) or _affine_norm(norm):
                out[str(node.target)] = str(user.target)
    return out


def _affine_norm(m) -> bool:
    """A LayerNorm over the last axis or a GroupNorm, with a per-unit affine."""
    if isinstance(m, nn.LayerNorm):
        return m.elementwise_affine and m.weight is not None and m.weight.dim() == 1 and m.bias is not None
    return isinstance(m, nn.GroupNorm) and m.affine


def _channel_stats(y: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    cols = y.movedim(dim, -1).reshape(-1, y.shape[dim]).double()
    return cols.mean(0), cols.std(0, unbiased=False)


def repair_sites(net: nn.Module, spec: UnitSpec) -> list[str]:
    """The modules whose outputs REPAIR corrects: each hidden layer, or the norm it feeds directly."""
    layers = _producing_layers(net, spec)
    norms = _followed_by_norm(net, layers)
    return [norms.get(name, name) for name in layers]


def only_batchnorm(model: nn.Module, example: Tensor, spec: UnitSpec | None = None) -> bool:
    """Whether every site REPAIR would correct is a BatchNorm (e.g. torchvision's ResNets; not VGG-BN with
    hidden Linear layers, nor a pre-activation ResNet). There REPAIR only sets each BatchNorm's affine to
    the endpoints' interpolated output statistics, which on the straight line is the interpolated affine
    the point already has (up to BatchNorm's eps), while the evaluator recomputes the statistics at every
    point anyway: the REPAIR pass is then redundant."""
    net = copy.deepcopy(model).eval()
    sites = repair_sites(net, spec if spec is not None else infer(net, example))
    return bool(sites) and all(isinstance(net.get_submodule(s), _BatchNorm) for s in sites)


class RepairedPath(Path):
    """``inner`` with REPAIR applied at every interior t (see the module docstring)."""

    def __init__(self, inner: Path, model: nn.Module, inputs: Tensor, spec: UnitSpec | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.name = f"{inner.name}+repair"
        self.knots, self.labels, self.model = list(inner.knots), inner.labels, inner.model
        self.bound = None  # a construction's bound certifies the inner path, not this one
        self.net = copy.deepcopy(inner.model if inner.model is not None else model).eval()
        start = inner(0.0)
        dev = next(iter(start.values())).device
        self.net.to(dev)
        self.inputs = inputs.to(dev)
        self.spec = spec if spec is not None else infer(self.net, self.inputs[:2])
        self.sites = repair_sites(self.net, self.spec)
        self.stats_a, order = self._run(start)
        self.stats_b, _ = self._run(inner(1.0))
        self.sites = order  # forward order
        skipped = [s for s in self.sites if not self._foldable(s)[0]]
        self.info = {**inner.info, "repair": {"sites": len(self.sites), "items": len(self.inputs),
                                              "spread_only": [s for s in self.sites if not self._foldable(s)[1]],
                                              "skipped": skipped}}
        if inner.bound is not None:
            self.info["inner_bound"] = inner.bound

    def _foldable(self, site: str) -> tuple[bool, bool]:
        """(can its spread be corrected, can its mean be corrected)."""
        m = self.net.get_submodule(site)
        if isinstance(m, _BatchNorm):
            return m.affine, m.affine
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            return True, True
        return True, m.bias is not None

    def _run(self, params: Mapping[str, Tensor], targets: dict | None = None):
        """One forward pass at ``params`` on the repair inputs, BatchNorm on batch statistics.

        Without ``targets``: the (mean, std) of every site's output. With ``targets`` ({site: (mean, std)}):
        each site's output is corrected to them on the fly (so later sites see corrected inputs) and the
        per-unit (scale, shift) applied is returned."""
        self.net.load_state_dict(dict(params), strict=False)
        self.net.eval()
        for m in self.net.modules():
            if isinstance(m, _BatchNorm):
                m.train()
        found, order, handles = {}, [], []

        def hook(site):
            def fn(module, inputs, y):
                dim = unit_dim(module)
                mean, std = _channel_stats(y, dim)
                order.append(site)
                if targets is None:
                    found[site] = (mean, std)
                    return None
                t_mean, t_std = targets[site]
                spread, shift_ok = self._foldable(site)
                scale = torch.where(std > 1e-12, t_std / std.clamp_min(1e-300), torch.ones_like(std)) if spread \
                    else torch.ones_like(std)
                shift = t_mean - mean * scale if shift_ok else torch.zeros_like(mean)
                found[site] = (scale, shift)
                view = [1] * y.dim()
                view[dim] = -1
                return y * scale.to(y.dtype).view(view) + shift.to(y.dtype).view(view)
            return fn

        for site in self.sites:
            handles.append(self.net.get_submodule(site).register_forward_hook(hook(site)))
        try:
            with torch.no_grad():
                self.net(self.inputs)
        finally:
            for h in handles:
                h.remove()
            self.net.eval()
        return found, order

    def _repaired(self, point: State, t: float) -> State:
        targets = {s: tuple((1 - t) * a + t * b for a, b in zip(self.stats_a[s], self.stats_b[s]))
                   for s in self.sites}
        corrections, _ = self._run(point, targets)
        out = dict(point)
        for site, (scale, shift) in corrections.items():
            w, b = f"{site}.weight", f"{site}.bias"
            if w in out:
                out[w] = out[w] * scale.to(out[w].dtype).view(-1, *([1] * (out[w].dim() - 1)))
            if b in out:
                out[b] = out[b] * scale.to(out[b].dtype) + shift.to(out[b].dtype)
        return out

    def points(self, ts: Sequence[float] | Tensor) -> State:
        t = as_times(ts)
        inner = self.inner.points(t)
        rows = []
        for i, ti in enumerate(t.tolist()):
            point = {k: v[i] for k, v in inner.items()}
            rows.append(point if ti in (0.0, 1.0) else self._repaired(point, ti))
        return {k: torch.stack([r[k] for r in rows]) for k in inner}

    def to(self, device: torch.device | str) -> "RepairedPath":
        self.inner.to(device)
        self.net.to(device)
        self.inputs = self.inputs.to(device)
        for stats in (self.stats_a, self.stats_b):
            for s, v in stats.items():
                stats[s] = tuple(x.to(device) for x in v)
        return self


def repair(path: Path, model: nn.Module, data, *, max_items: int = 2048, spec: UnitSpec | None = None) -> Path:
    """``path`` with REPAIR at every interior t, on the first ``max_items`` training inputs of ``data``
    (a modeconn ``Dataset``, an ``(inputs, targets)`` pair or batches). ``spec`` (inferred when omitted)
    says which layers produce hidden units. ``path(0)`` and ``path(1)`` are the inner path's endpoints."""
    x, _ = materialize(data, max_items=max_items)
    return RepairedPath(path, model, x, spec)
