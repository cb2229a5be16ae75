"""Many points of a plain MLP at once, as batched matrix products into reused buffers.

For an ``nn.Sequential`` of Flatten, Linear, BatchNorm1d, ReLU, Dropout and Identity layers (modeconn's
``mlp`` and most hand-written MLPs) a chunk of points is evaluated without ``vmap``: each Linear layer is one
``baddbmm`` of the chunk's stacked weights into an output buffer kept for the whole evaluation, ReLU runs in
place, BatchNorm is its per-channel scale and shift, Dropout is off. Reusing the buffers matters on a CPU:
a fresh allocation above glibc's mmap threshold (128 KiB in a plain process) is page-faulted in anew at
every batch, which costs as much as the products of a small MLP. The first Linear layer of a
piecewise-linear path is interpolated between its waypoints' outputs
(:class:`modeconn.evaluation.stacked._SharedFirstLayer`). BatchNorm statistics are every point's own, a
cumulative average over batches of :data:`~modeconn.params.batchnorm.STATISTICS_BATCH` inputs in train mode,
as :func:`modeconn.params.batchnorm.recompute_statistics` computes them; the layers after the last
BatchNorm are skipped in that pass.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modeconn.params.batchnorm import STATISTICS_BATCH
from modeconn.params.path import Path
from modeconn.evaluation.stacked import MIN_ROWS, _SharedFirstLayer, budgets, waypoints

SUPPORTED = (nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Identity)  # exactly these types


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]] | None:
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            inner = _leaves(child, full + ".")
            if inner is None:
                return None
            out += inner
        elif type(child) in SUPPORTED:
            out.append((full, child))
        else:
            return None
    return out


def sequential_layers(model: nn.Module, example: Tensor) -> list[tuple[str, nn.Module]] | None:
    """The layers of ``model`` when it is a plain ``nn.Sequential`` this module runs exactly, else ``None``:
    only :data:`SUPPORTED` layers (nested Sequentials flattened), a Linear first among those with
    parameters, a Flatten (of every axis after the batch) only before it (or 2-D inputs), every BatchNorm1d
    after it and keeping running statistics, no parameter shared between layers."""
    if type(model) is not nn.Sequential:
        return None
    layers = _leaves(model)
    if not layers or not any(type(m) is nn.Linear for _, m in layers):
        return None
    seen_linear = flattened = False
    for _, m in layers:
        if type(m) is nn.Flatten:
            if seen_linear or m.start_dim != 1 or m.end_dim != -1:
                return None
            flattened = True
        elif type(m) is nn.Linear:
            seen_linear = True
        elif type(m) is nn.BatchNorm1d and (not seen_linear or not m.track_running_stats):
            return None
    if example.dim() != 2 and not flattened:
        return None
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    if len(ids) != len(set(ids)):
        return None
    return layers


class _Buffers:
    """Flat storage per layer, viewed as [points, rows, width] at each call: allocated once, reused."""

    def __init__(self) -> None:
        self.store: dict[int, Tensor] = {}

    def get(self, i: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
        n = 1
        for s in shape:
            n *= s
        flat = self.store.get(i)
        if flat is None or flat.numel() < n or flat.dtype != like.dtype or flat.device != like.device:
            flat = self.store[i] = torch.empty(n, dtype=like.dtype, device=like.device)
        return flat[:n].view(shape)


class SequentialStack:
    """A chunk of points of a plain MLP (:func:`sequential_layers`) evaluated together.

    The same interface as :class:`modeconn.evaluation.stacked.StackedModel`: ``load(ts, points)``, then with
    BatchNorm ``statistics(inputs)``, then ``logits(x)``, which returns [points, len(x), classes] in a
    buffer that the next call overwrites.
    """

    def __init__(self, model: nn.Module, path: Path, example: Tensor, layers: list[tuple[str, nn.Module]],
                 share_first_layer: bool = True):
        self.layers = layers
        self.buffers = _Buffers()
        self.first: _SharedFirstLayer | None = None
        states = waypoints(path) if share_first_layer else None
        first_name, first = next((n, m) for n, m in layers if type(m) is nn.Linear)
        if states is not None:
            self.first = _SharedFirstLayer(first, first_name, (first.in_features,), path, states, example.device)
        norms = [i for i, (_, m) in enumerate(layers) if type(m) is nn.BatchNorm1d]
        self.last_norm = norms[-1] if norms else -1
        self.ts: list[float] = []
        self.points: dict[str, Tensor] = {}
        self.stats: dict[str, Tensor] = {}
        self.affine: dict[str, tuple[Tensor, Tensor]] = {}

    def load(self, ts: Sequence[float], points: dict[str, Tensor]) -> None:
        """Take the chunk at ``ts``; BatchNorm statistics are reset (zero means, unit variances)."""
        self.ts, self.points, self.affine = [float(t) for t in ts], points, {}
        self.stats = {}
        for name, m in self.layers:
            if type(m) is nn.BatchNorm1d:
                ref = m.running_mean
                self.stats[name] = torch.zeros(len(ts), 2, m.num_features, dtype=ref.dtype, device=ref.device)
                self.stats[name][:, 1] = 1.0

    def _linear(self, i: int, name: str, m: nn.Linear, h: Tensor, shared: bool) -> Tensor:
        p, rows = len(self.ts), h.shape[-2]
        w = self.points[f"{name}.weight"]
        bias = self.points.get(f"{name}.bias") if m.bias is not None else None
        out = self.buffers.get(i, (p, rows, m.out_features), w)
        if shared and self.first is not None:
            return self.first.outputs(self.ts, self.points, h, out=out)
        a = h.unsqueeze(0).expand(p, *h.shape) if shared else h
        if bias is None:
            return torch.bmm(a, w.transpose(1, 2), out=out)
        return torch.baddbmm(bias.unsqueeze(1), a, w.transpose(1, 2), out=out)

    def _scale_shift(self, name: str, m: nn.BatchNorm1d, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Normalisation by ``mean``/``var`` and the points' affine parameters as one scale and shift per
        point and unit, shaped to broadcast over a batch."""
        scale = torch.rsqrt(var + m.eps)
        if m.affine:
            scale = scale * self.points[f"{name}.weight"]
            shift = self.points[f"{name}.bias"] - mean * scale
        else:
            shift = -mean * scale
        return scale.unsqueeze(1), shift.unsqueeze(1)

    def _norm_eval(self, name: str, m: nn.BatchNorm1d, h: Tensor) -> Tensor:
        if name not in self.affine:
            self.affine[name] = self._scale_shift(name, m, self.stats[name][:, 0], self.stats[name][:, 1])
        scale, shift = self.affine[name]
        return h.mul_(scale).add_(shift)

    def _norm_train(self, name: str, m: nn.BatchNorm1d, h: Tensor, k: int) -> Tensor:
        """Normalise by the batch's statistics and fold them into the running ones (momentum 1/k)."""
        var, mean = torch.var_mean(h, dim=1, correction=0)
        n = h.shape[1]
        stats = self.stats[name]
        stats[:, 0].lerp_(mean, 1.0 / k)
        stats[:, 1].lerp_(var * (n / max(n - 1, 1)), 1.0 / k)
        scale, shift = self._scale_shift(name, m, mean, var)
        return h.mul_(scale).add_(shift)

    def _run(self, x: Tensor, batch: int | None = None) -> Tensor:
        """Every point's output on ``x``; with ``batch`` (its 1-based index) the statistics pass, which
        stops after the last BatchNorm."""
        h, shared = x.reshape(len(x), -1), True
        for i, (name, m) in enumerate(self.layers):
            if batch is not None and i > self.last_norm:
                break
            kind = type(m)
            if kind is nn.Linear:
                h, shared = self._linear(i, name, m, h, shared), False
            elif kind is nn.ReLU:
                h = torch.relu(h) if shared else h.relu_()
            elif kind is nn.BatchNorm1d:
                h = self._norm_eval(name, m, h) if batch is None else self._norm_train(name, m, h, batch)
        return h

    @torch.no_grad()
    def statistics(self, inputs: Tensor, batch_size: int = STATISTICS_BATCH) -> None:
        """Every point's BatchNorm statistics on ``inputs``, batches of ``batch_size``, cumulative average."""
        if self.last_norm < 0:
            return
        for k, start in enumerate(range(0, len(inputs), batch_size)):
            self._run(inputs[start : start + batch_size], batch=k + 1)
        self.affine = {}

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Eval-mode logits of every point of the loaded chunk on ``x``: [points, len(x), classes]."""
        return self._run(x)


SEQUENTIAL_ACTIVATIONS = 1 << 23  # elements of every layer's output buffers together, on a CPU (32 MiB float32)


def sequential_plan(layers: list[tuple[str, nn.Module]], n_points: int, n_params: int, n_items: int,
                    statistics: bool, batch_size: int, device: torch.device) -> tuple[int, int]:
    """(points a chunk, examples a data batch) for :class:`SequentialStack`: the points the parameter budget
    allows (:func:`modeconn.evaluation.stacked.budgets`), then the largest batch (at least ``MIN_ROWS``, at
    most ``batch_size`` and the largest split) whose buffers for the whole chunk stay within
    :data:`SEQUENTIAL_ACTIVATIONS` (on a GPU its activation budget), then as many points as that batch and,
    with BatchNorm, the statistics batch leave room for."""
    budget = budgets(device)
    room = SEQUENTIAL_ACTIVATIONS if device.type == "cpu" else budget.activation
    width = sum(m.out_features for _, m in layers if type(m) is nn.Linear)
    want = max(1, min(n_points, budget.parameters // max(1, n_params)))
    rows = max(MIN_ROWS, room // max(1, want * width))
    rows = max(1, min(rows, batch_size, n_items))
    per_point = max(rows, min(STATISTICS_BATCH, n_items) if statistics else 0) * width
    return max(1, min(want, room // max(1, per_point))), rows
