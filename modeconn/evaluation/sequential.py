"""Many points of a plain MLP at once, as batched matrix products into reused buffers.

For an ``nn.Sequential`` of Flatten, Linear, BatchNorm1d, ReLU, Dropout and Identity layers (modeconn's
``mlp`` and most hand-written MLPs) a chunk of points is evaluated without ``vmap``, features first: every
activation is a [points, features, examples] buffer, each Linear layer is one ``bmm`` of the chunk's stacked
weights into it plus the bias, ReLU runs in place, Dropout is off. Examples last make the per-feature work
(bias, BatchNorm's statistics over examples, the scorer's reductions over the classes) run along contiguous
rows. An eval-mode BatchNorm after a Linear is folded into that Linear's weights and bias (a pass over the
weights instead of two over the activations); elsewhere it is its per-channel scale and shift. Reusing the
buffers matters on a CPU: a fresh allocation above glibc's mmap threshold (128 KiB in a plain process) is
page-faulted in anew, which costs as much as the products of a small MLP, so they are kept per thread
from one evaluation to the next (:func:`workspace`). The first Linear layer of a piecewise-linear path is
interpolated between its waypoints' outputs (:class:`modeconn.evaluation.stacked._SharedFirstLayer`).
BatchNorm statistics are every point's own, a cumulative average over batches of
:data:`~modeconn.params.batchnorm.STATISTICS_BATCH` inputs in train mode, as
:func:`modeconn.params.batchnorm.recompute_statistics` computes them; the layers after the last BatchNorm
are skipped in that pass, and a Linear's bias before a BatchNorm (which the batch mean removes) is added to
the recorded mean instead of to the activations.
"""
from __future__ import annotations

import threading
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
    """Flat storage per layer, viewed as [points, features, examples] at each call: allocated once, reused.
    Holding more than ``limit`` elements in all, it lets go of the other layers' storage."""

    def __init__(self, limit: int | None = None) -> None:
        self.store: dict[int, Tensor] = {}
        self.limit = limit

    def get(self, i: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
        n = 1
        for s in shape:
            n *= s
        flat = self.store.get(i)
        if flat is None or flat.numel() < n or flat.dtype != like.dtype or flat.device != like.device:
            if self.limit is not None and sum(v.numel() for v in self.store.values()) + n > self.limit:
                self.store = {}
            flat = self.store[i] = torch.empty(n, dtype=like.dtype, device=like.device)
        return flat[:n].view(shape)


_WORKSPACE = threading.local()


def workspace(device: torch.device) -> _Buffers:
    """The buffers of a :class:`SequentialStack`: on a CPU the calling thread's, kept from one evaluation to
    the next (at most twice :data:`SEQUENTIAL_ACTIVATIONS` elements), so that an evaluation does not page
    in tens of MiB of fresh memory (a quarter of a small MLP's evaluation time in a plain process); on a
    GPU new ones (its caching allocator reuses memory anyway)."""
    if device.type != "cpu":
        return _Buffers()
    if getattr(_WORKSPACE, "buffers", None) is None:
        _WORKSPACE.buffers = _Buffers(limit=2 * SEQUENTIAL_ACTIVATIONS)
    return _WORKSPACE.buffers


class SequentialStack:
    """A chunk of points of a plain MLP (:func:`sequential_layers`) evaluated together.

    The interface of :class:`modeconn.evaluation.stacked.StackedModel`: ``load(ts, points)``, then with
    BatchNorm ``statistics(inputs)``, then ``logits(x)``, which returns [points, classes, len(x)]
    (:attr:`class_dim` 1) in a buffer that the next call overwrites (the next call of any stack of the same
    thread on a CPU: :func:`workspace`).
    """

    class_dim = 1
    scratch_logits = True  # the logits are this stack's own buffer, overwritten by the next call anyway

    def __init__(self, model: nn.Module, path: Path, example: Tensor, layers: list[tuple[str, nn.Module]],
                 share_first_layer: bool = True):
        self.layers = layers
        self.buffers = workspace(example.device)
        self.first: _SharedFirstLayer | None = None
        states = waypoints(path) if share_first_layer else None
        first_name, first = next((n, m) for n, m in layers if type(m) is nn.Linear)
        if states is not None:
            self.first = _SharedFirstLayer(first, first_name, (first.in_features,), path, states, example.device)
        norms = [i for i, (_, m) in enumerate(layers) if type(m) is nn.BatchNorm1d]
        self.last_norm = norms[-1] if norms else -1
        self.feeds_norm = _feeds_norm(layers)  # never the first Linear: it reads the inputs (or is shared)
        self.fed_by = {j: i for i, j in self.feeds_norm.items()}
        self.ts: list[float] = []
        self.points: dict[str, Tensor] = {}
        self.stats: dict[str, Tensor] = {}
        self.affine: dict[str, tuple[Tensor, Tensor]] = {}
        self.folded: dict[int, tuple[Tensor, Tensor]] = {}

    def load(self, ts: Sequence[float], points: dict[str, Tensor]) -> None:
        """Take the chunk at ``ts``; BatchNorm statistics are reset (zero means, unit variances)."""
        self.ts, self.points, self.affine, self.folded = [float(t) for t in ts], points, {}, {}
        self.stats = {}
        for name, m in self.layers:
            if type(m) is nn.BatchNorm1d:
                ref = m.running_mean
                self.stats[name] = torch.zeros(len(ts), 2, m.num_features, dtype=ref.dtype, device=ref.device)
                self.stats[name][:, 1] = 1.0

    def _linear(self, i: int, name: str, m: nn.Linear, h: Tensor, x: Tensor | None, batch: int | None) -> Tensor:
        """Layer ``i`` on ``h`` ([points, features, examples]) or, for the first Linear, on the inputs ``x``
        ([examples, features]). Followed by a BatchNorm: in eval mode that BatchNorm's scale and shift are
        folded into the weights and bias (:meth:`_folded`); in the statistics pass the bias is left out (the
        batch mean removes it; :meth:`_norm_train` adds it to the recorded mean)."""
        p = len(self.ts)
        w = self.points[f"{name}.weight"]
        out = self.buffers.get(i, (p, m.out_features, h.shape[-1]), w)
        if x is not None and self.first is not None:
            return self.first.outputs(self.ts, self.points, x, out=out, features_first=True)
        bias = self.points.get(f"{name}.bias") if m.bias is not None else None
        if i in self.feeds_norm:
            if batch is None:
                w, bias = self._folded(i, w, bias)
            else:
                bias = None
        torch.matmul(w, h, out=out)  # h of the inputs is [features, examples], broadcast over the points
        return out if bias is None else out.add_(bias.unsqueeze(2))

    def _folded(self, i: int, w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """Layer ``i``'s weights and bias with the eval-mode BatchNorm after it folded in: scale * W and
        scale * b + shift (a pass over the weights instead of two over the activations)."""
        if i not in self.folded:
            name, m = self.layers[self.feeds_norm[i]]
            scale, shift = self._eval_affine(name, m)
            self.folded[i] = (w * scale, shift.squeeze(2) + (0 if bias is None else bias * scale.squeeze(2)))
        return self.folded[i]

    def _scale_shift(self, name: str, m: nn.BatchNorm1d, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Normalisation by ``mean``/``var`` and the points' affine parameters as one scale and shift per
        point and unit, shaped to broadcast over the examples."""
        scale = torch.rsqrt(var + m.eps)
        if m.affine:
            scale = scale * self.points[f"{name}.weight"]
            shift = self.points[f"{name}.bias"] - mean * scale
        else:
            shift = -mean * scale
        return scale.unsqueeze(2), shift.unsqueeze(2)

    def _eval_affine(self, name: str, m: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
        if name not in self.affine:
            self.affine[name] = self._scale_shift(name, m, self.stats[name][:, 0], self.stats[name][:, 1])
        return self.affine[name]

    def _norm_train(self, i: int, name: str, m: nn.BatchNorm1d, h: Tensor, k: int) -> Tensor:
        """Normalise by the batch's statistics and fold them into the running ones (momentum 1/k). ``h`` is
        centred in place and its variance is a vector norm (``var_mean`` over the examples is some 20x
        slower on a CPU); the last BatchNorm of the pass only records its statistics."""
        n = h.shape[2]
        mean = h.mean(2, keepdim=True)
        var = torch.linalg.vector_norm(h.sub_(mean), dim=2).square_().div_(n)
        mean = mean.squeeze(2)
        linear = self.fed_by.get(i)
        if linear is not None and self.layers[linear][1].bias is not None:
            mean = mean + self.points[f"{self.layers[linear][0]}.bias"]  # the bias the statistics pass left out
        stats = self.stats[name]
        stats[:, 0].lerp_(mean, 1.0 / k)
        stats[:, 1].lerp_(var * (n / max(n - 1, 1)), 1.0 / k)
        if i == self.last_norm:
            return h
        scale = torch.rsqrt(var + m.eps)
        if not m.affine:
            return h.mul_(scale.unsqueeze(2))
        return h.mul_((scale * self.points[f"{name}.weight"]).unsqueeze(2)).add_(self.points[f"{name}.bias"].unsqueeze(2))

    def _run(self, x: Tensor, batch: int | None = None) -> Tensor:
        """Every point's output on ``x``; with ``batch`` (its 1-based index) the statistics pass, which
        stops after the last BatchNorm."""
        x = x.reshape(len(x), -1)
        h, inputs, folded = x.T, x, False  # ``inputs`` until the first Linear has read them
        for i, (name, m) in enumerate(self.layers):
            if batch is not None and i > self.last_norm:
                break
            kind = type(m)
            if kind is nn.Linear:
                folded = batch is None and i in self.feeds_norm
                h, inputs = self._linear(i, name, m, h, inputs, batch), None
            elif kind is nn.ReLU:
                h = torch.relu(h) if inputs is not None else h.relu_()
            elif kind is nn.BatchNorm1d:
                if batch is not None:
                    h = self._norm_train(i, name, m, h, batch)
                elif not folded:
                    scale, shift = self._eval_affine(name, m)
                    h = h.mul_(scale).add_(shift)
                folded = False
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
        """Eval-mode logits of every point of the loaded chunk on ``x``: [points, classes, len(x)]."""
        return self._run(x)


def _feeds_norm(layers: list[tuple[str, nn.Module]]) -> dict[int, int]:
    """Linear layer index -> the BatchNorm1d that reads its output directly (Dropout and Identity between
    them are identities in both passes), for every Linear but the first."""
    out = {}
    linears = [i for i, (_, m) in enumerate(layers) if type(m) is nn.Linear]
    for i in linears[1:]:
        j = i + 1
        while j < len(layers) and type(layers[j][1]) in (nn.Dropout, nn.Identity):
            j += 1
        if j < len(layers) and type(layers[j][1]) is nn.BatchNorm1d:
            out[i] = j
    return out


SEQUENTIAL_ACTIVATIONS = 1 << 23  # elements of every layer's output buffers together, on a CPU (32 MiB float32)
SCORE_ELEMENTS = 1 << 17  # point-examples of a data batch on a CPU (the scorer's [points, examples] temporaries)


def sequential_plan(layers: list[tuple[str, nn.Module]], n_points: int, n_params: int, n_items: int,
                    statistics: bool, batch_size: int, device: torch.device) -> tuple[int, int]:
    """(points a chunk, examples a data batch) for :class:`SequentialStack`: the points the parameter budget
    allows (:func:`modeconn.evaluation.stacked.budgets`), then the largest batch (at least ``MIN_ROWS``, at
    most ``batch_size`` and the largest split) whose buffers for the whole chunk stay within
    :data:`SEQUENTIAL_ACTIVATIONS` (on a GPU its activation budget) and, on a CPU, of at most
    :data:`SCORE_ELEMENTS` point-examples (at least 64 examples), then as many points as that batch and,
    with BatchNorm, the statistics batch leave room for."""
    budget = budgets(device)
    room = SEQUENTIAL_ACTIVATIONS if device.type == "cpu" else budget.activation
    width = sum(m.out_features for _, m in layers if type(m) is nn.Linear)
    want = max(1, min(n_points, budget.parameters // max(1, n_params)))
    rows = max(MIN_ROWS, room // max(1, want * width))
    if device.type == "cpu":
        rows = min(rows, max(64, SCORE_ELEMENTS // want))
    rows = max(1, min(rows, batch_size, n_items))
    per_point = max(rows, min(STATISTICS_BATCH, n_items) if statistics else 0) * width
    return max(1, min(want, room // max(1, per_point))), rows
