"""Many points of a path through one model at once, and how many at a time.

The parameters of a chunk of points are stacked along a leading axis, and one ``torch.func.vmap``'d
``functional_call`` runs every point of the chunk on each data batch. :class:`StackedModel` adds two exact
shortcuts to that:

* **BatchNorm, per point.** Each point gets its own running statistics, computed for the whole chunk at
  once by a vmapped train-mode pass over the same batches as
  :func:`modeconn.params.batchnorm.recompute_statistics` (a cumulative average: ``momentum = 1/k`` at the k-th
  batch, which is what ``momentum=None`` does); the chunk is then evaluated in eval mode with them, each
  BatchNorm written as the scale and shift per channel it is (:class:`_ScaleShiftNorm`).
* **The first layer of a piecewise-linear path.** A Linear or Conv layer that reads the input directly is
  linear in its weights, so along a segment its outputs are the interpolation of its outputs at the
  segment's two waypoints. They are computed at the waypoints only and interpolated for every point.

The chunk of points and the data batch follow memory budgets per device (:func:`budgets`).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from modeconn.params.batchnorm import STATISTICS_BATCH
from modeconn.params.path import LinearPath, Path, PiecewiseLinearPath, State, segment_index

RUNNING_STATISTICS = ("running_mean", "running_var")
LINEAR_IN_WEIGHTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # exactly these: a subclass may change forward


@dataclass(frozen=True)
class Budget:
    """Memory a chunk may use, in tensor elements: its stacked parameters, and the widest activation of
    one data batch (one layer's output for every point of the chunk together)."""

    parameters: int
    activation: int


# On a CPU the widest activation should stay in the caches (a vmapped layer's bias and ReLU are
# memory-bound); a GPU wants large kernels, and gets a share of its memory.
CPU_BUDGET = Budget(parameters=40_000_000, activation=1 << 20)
MIN_ROWS = 256  # the data batch that keeps the batched matrix products efficient; the chunk leaves room for it


def budgets(device: torch.device) -> Budget:
    """The budget on ``device``: :data:`CPU_BUDGET` on a CPU; on a GPU 1/16 of its memory for the stacked
    parameters and 1/64 for the widest activation (float32 elements; at least 2^26)."""
    if device.type != "cuda":
        return CPU_BUDGET
    total = torch.cuda.get_device_properties(device).total_memory
    return Budget(parameters=max(CPU_BUDGET.parameters, total // 64), activation=max(1 << 26, total // 256))


def is_convolutional(model: nn.Module) -> bool:
    return any(isinstance(m, _ConvNd) for m in model.modules())


def stackable(model: nn.Module) -> bool:
    """Whether every BatchNorm keeps running statistics (one that normalises eval batches by their own
    statistics would give numbers that depend on the data batch)."""
    return all(m.track_running_stats for m in model.modules() if isinstance(m, _BatchNorm))


@torch.no_grad()
def widest_activation(model: nn.Module, x: Tensor) -> int:
    """Elements of the largest output of any leaf module for one example (one forward pass on x[:2]: a
    BatchNorm that normalises by the batch's statistics needs two)."""
    probe = x[:2]
    widest = [int(probe[:1].numel())]

    def hook(module, inputs, output):
        if isinstance(output, Tensor):
            widest.append(-(-int(output.numel()) // len(probe)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        model(probe)
    finally:
        for h in handles:
            h.remove()
    return max(widest)


def point_chunk(n_points: int, n_params: int, widest: int, rows: int, device: torch.device) -> int:
    """Points evaluated together: as many as the parameter budget allows and as leave a data batch of
    ``rows`` examples within the activation budget."""
    budget = budgets(device)
    by_params = budget.parameters // max(1, n_params)
    by_activations = budget.activation // max(1, rows * widest)
    return max(1, min(n_points, by_params, by_activations))


def batch_rows(n_points: int, n_items: int, batch_size: int, widest: int, device: torch.device) -> int:
    """Examples per data batch when ``n_points`` points share it (``n_points`` = 1 included).

    As many as keep the widest activation of the batch within the activation budget; on a GPU at least
    ``batch_size // n_points`` (the point-examples budget of ``batch_size``). At least 64, never more than
    ``batch_size`` (the one-point-at-a-time batch) nor the whole split.
    """
    rows = budgets(device).activation // max(1, n_points * widest)
    if device.type != "cpu":
        rows = max(rows, batch_size // n_points)
    rows = min(max(rows, 64), max(64, batch_size))
    return max(1, min(rows, n_items))


segment_of = segment_index  # the one segment look-up lives with the paths


def waypoints(path: Path) -> list[State] | None:
    """The waypoints of a path whose points are exactly the straight interpolation between them (a
    :class:`LinearPath` or a :class:`PiecewiseLinearPath`), else ``None``."""
    if type(path).points is LinearPath.points:
        return [path.theta_a, path.theta_b]
    if type(path).points is PiecewiseLinearPath.points:
        return path.waypoints
    return None


class _ScaleShiftNorm(_BatchNorm):
    """A BatchNorm whose eval mode is written out as a scale and a shift per channel, as PyTorch's kernel
    computes it. vmap runs that as plain broadcasts, while its rule for ``batch_norm`` moves the points
    into the channels (copies in and out: about three times slower on a CPU). Train mode is BatchNorm's."""

    @classmethod
    def replacing(cls, norm: _BatchNorm) -> "_ScaleShiftNorm":
        new = cls(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                  device=norm.running_mean.device, dtype=norm.running_mean.dtype)
        new.load_state_dict(norm.state_dict())
        return new.train(norm.training)

    def _check_input_dim(self, input: Tensor) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return super().forward(x)
        scale = 1 / torch.sqrt(self.running_var + self.eps)
        shift = -self.running_mean * scale
        if self.weight is not None:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x, scale.view(shape))


class _Given(nn.Module):
    """Stands in for the first layer: returns the outputs computed beforehand for the current point."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Tensor | None = None

    def forward(self, _input: Tensor) -> Tensor:
        return self.value


@torch.no_grad()
def first_layer(model: nn.Module, x: Tensor) -> tuple[str, tuple[int, ...]] | None:
    """The name of the layer whose outputs can be interpolated, and the per-example shape of its input.

    That is the first module with parameters to run, if it is a plain Linear or Conv layer, runs once, owns its
    parameters alone, and reads a reshaped view of the model's input (the same memory, batch axis first),
    found by one forward pass on ``x[:2]``; else ``None``.
    """
    probe = x[:2].contiguous()
    calls: list[tuple[str, nn.Module, tuple]] = []
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.append((n, mod, args))) for n, m in leaves]
    try:
        model(probe)
    finally:
        for h in handles:
            h.remove()
    owners = [(n, m, a) for n, m, a in calls if any(True for _ in m.parameters(recurse=False))]
    if not owners:
        return None
    name, layer, args = owners[0]
    if not name:  # the model is one layer (a user's bare nn.Linear): no first layer to share apart from it
        return None
    if type(layer) not in LINEAR_IN_WEIGHTS or sum(m is layer for _, m, _ in calls) != 1:
        return None
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    if any(ids.count(id(p)) != 1 for p in layer.parameters()):
        return None
    inp = args[0] if args else None
    if not (isinstance(inp, Tensor) and inp.data_ptr() == probe.data_ptr() and inp.numel() == probe.numel()
            and inp.is_contiguous() and inp.dim() >= 1 and inp.shape[0] == len(probe)):
        return None
    return name, tuple(inp.shape[1:])


class _SharedFirstLayer:
    """The first layer's outputs at a path's waypoints, interpolated to the points of a chunk."""

    def __init__(self, layer: nn.Module, name: str, input_shape: tuple[int, ...], path: Path,
                 waypoint_states: list[State], device: torch.device):
        self.layer, self.name, self.input_shape, self.knots = layer, name, input_shape, list(path.knots)
        local = [n for n, _ in layer.named_parameters()]
        self.keys = {f"{name}.{n}": n for n in local}
        self.ends = [{n: w[k].to(device) for k, n in self.keys.items()} for w in waypoint_states]
        self._segments: tuple[tuple[float, ...] | None, list[tuple[int, float]]] = (None, [])

    def segments(self, ts: Sequence[float]) -> list[tuple[int, float]]:
        """(segment, position in it) of every t, as the path computes its points."""
        out = []
        for t in ts:
            i = segment_of(self.knots, t)
            lo, hi = self.knots[i], self.knots[i + 1]
            out.append((i, 1.0 if hi <= lo else min(max((t - lo) / (hi - lo), 0.0), 1.0)))
        return out

    def _apply(self, params: dict[str, Tensor], inp: Tensor) -> Tensor:
        """The layer with ``params``: its own forward for a Linear or a convolution (``functional_call``
        costs more than a small layer's product), ``functional_call`` otherwise."""
        if type(self.layer) is nn.Linear:
            return F.linear(inp, params["weight"], params.get("bias"))
        if isinstance(self.layer, _ConvNd):
            return self.layer._conv_forward(inp, params["weight"], params.get("bias"))
        return functional_call(self.layer, params, (inp,))

    def outputs(self, ts: Sequence[float], points: State, x: Tensor, out: Tensor | None = None,
                features_first: bool = False) -> Tensor:
        """The layer's outputs at every t of a chunk on inputs ``x``: [len(ts), len(x), ...] (written into
        ``out`` when given; ``features_first``: a Linear layer's [len(ts), features, len(x)]). Interpolated
        between the waypoints' outputs when the chunk has more points than waypoints, else computed from the
        points' own parameters (``points``)."""
        inp = x.reshape(len(x), *self.input_shape)
        key = tuple(ts)
        if self._segments[0] != key:  # the same chunk's points for every data batch: looked up once
            self._segments = (key, self.segments(ts))
        segs = self._segments[1]
        if len({i for i, _ in segs}) + 1 >= len(ts):
            own = {n: points[k] for k, n in self.keys.items()}
            value = vmap(lambda p: functional_call(self.layer, p, (inp,)))(own)
            value = value.transpose(-1, -2) if features_first else value
            return value if out is None else out.copy_(value)
        at: dict[int, Tensor] = {}
        for w in sorted({j for i, _ in segs for j in (i, i + 1)}):
            at[w] = self._apply(self.ends[w], inp)
            at[w] = at[w].T.contiguous() if features_first else at[w]
        first = next(iter(at.values()))
        out = first.new_empty(len(ts), *first.shape) if out is None else out
        start = 0
        while start < len(segs):  # a run of points in one segment: one interpolation into its slice
            i, stop = segs[start][0], start
            while stop < len(segs) and segs[stop][0] == i:
                stop += 1
            s = torch.tensor([p for _, p in segs[start:stop]], dtype=first.dtype, device=first.device)
            n = stop - start
            torch.lerp(at[i].expand(n, *first.shape), at[i + 1].expand(n, *first.shape),
                       s.view(-1, *([1] * first.dim())), out=out[start:stop])
            start = stop
        return out


class StackedModel:
    """A private copy of ``model`` that evaluates a chunk of points of ``path`` at once.

    ``load(ts, points)`` takes a chunk (``points``: every parameter with a leading axis of points); with
    BatchNorm, ``statistics(inputs)`` then computes each point's statistics; ``logits(x)`` returns the
    chunk's eval-mode logits [points, len(x), classes]. ``share_first_layer`` enables the first-layer
    shortcut (piecewise-linear paths only).
    """

    class_dim = -1  # logits are [points, examples, classes]
    scratch_logits = False  # vmap's outputs may be views (an expanded output): never written to

    def __init__(self, model: nn.Module, path: Path, example: Tensor, share_first_layer: bool = True):
        self.model = copy.deepcopy(model).eval()
        for name, norm in [(n, m) for n, m in self.model.named_modules() if isinstance(m, _BatchNorm)]:
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, _ScaleShiftNorm.replacing(norm))
        self.norms = [m for m in self.model.modules() if isinstance(m, _BatchNorm)]
        self.first: _SharedFirstLayer | None = None
        self._given: _Given | None = None
        states = waypoints(path) if share_first_layer else None
        found = first_layer(self.model, example) if states is not None else None
        if found is not None:
            name, input_shape = found
            parent, _, child = name.rpartition(".")
            owner = self.model.get_submodule(parent)
            self.first = _SharedFirstLayer(getattr(owner, child), name, input_shape, path, states, example.device)
            self._given = _Given()
            setattr(owner, child, self._given)
        self.param_names = [n for n, _ in self.model.named_parameters()]
        self.stat_names = [n for n, _ in self.model.named_buffers() if n.rpartition(".")[2] in RUNNING_STATISTICS]
        self.buffers = {n: b for n, b in self.model.named_buffers() if n not in self.stat_names}
        self.ts: list[float] = []
        self.points: State = {}
        self.stats: State = {}

    def load(self, ts: Sequence[float], points: State) -> None:
        """Take the chunk at ``ts``; its BatchNorm statistics are reset (zero means, unit variances)."""
        self.ts, self.points = [float(t) for t in ts], points
        self.stats = {}
        for name in self.stat_names:
            buf = self.model.get_buffer(name)
            fill = 0.0 if name.endswith("running_mean") else 1.0
            self.stats[name] = torch.full((len(self.ts), *buf.shape), fill, dtype=buf.dtype, device=buf.device)

    def _forward(self, x: Tensor) -> Tensor:
        params = {k: self.points[k] for k in self.param_names}
        first = None if self.first is None else self.first.outputs(self.ts, self.points, x)

        def one(p: State, s: State, z: Tensor | None) -> Tensor:
            if self._given is not None:
                self._given.value = z
            return functional_call(self.model, (p, s, self.buffers), (x,))

        try:
            return vmap(one, in_dims=(0, 0, None if first is None else 0))(params, self.stats, first)
        finally:
            if self._given is not None:
                self._given.value = None

    @torch.no_grad()
    def statistics(self, inputs: Tensor, batch_size: int = STATISTICS_BATCH) -> None:
        """Every point's BatchNorm statistics on ``inputs``: batches of ``batch_size``, in train mode, a
        cumulative average, exactly as :func:`modeconn.params.batchnorm.recompute_statistics` computes them."""
        if not self.norms:
            return
        momenta = [m.momentum for m in self.norms]
        try:
            for m in self.norms:
                m.train()
            for k, start in enumerate(range(0, len(inputs), batch_size)):
                for m in self.norms:
                    m.momentum = 1.0 / (k + 1)
                self._forward(inputs[start : start + batch_size])
        finally:
            for m, momentum in zip(self.norms, momenta):
                m.momentum = momentum
                m.eval()

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Eval-mode logits of every point of the loaded chunk on ``x``: [points, len(x), classes]."""
        return self._forward(x)
