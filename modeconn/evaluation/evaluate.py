"""Evaluate loss and error along a path, many points at once, and report every barrier.

Points are evaluated in chunks: the parameters of a chunk of t are stacked and one ``torch.func.vmap``'d
``functional_call`` runs them all on each data batch (:mod:`modeconn.evaluation.stacked`), instead of loading one
model at a time. BatchNorm statistics are recomputed at every point (see :mod:`modeconn.params.batchnorm`), for a
whole chunk at once. ``batched=False`` is the one-point-at-a-time reference. Evaluation is deterministic:
eval mode, no dropout, no augmentation, plain cross-entropy, fixed data subsets whose sizes are recorded.
"""
from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path as FilePath

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from modeconn.evaluation.barriers import barriers
from modeconn.params.batchnorm import STATISTICS_BATCH, has_batchnorm
from modeconn.io.checkpoint import atomic_write_bytes, atomic_write_json
from modeconn.io.jsonfile import Required, UnreadableFileError, read_json
from modeconn.params.checks import check_model_data, check_times
from modeconn.data import Dataset, materialize, resolve_device
from modeconn.params.path import Path
from modeconn.evaluation.scoring import score
from modeconn.evaluation.sequential import SequentialStack, sequential_layers, sequential_plan
from modeconn.evaluation.single import PointModel, ScoreQueue, profile_point
from modeconn.evaluation.stacked import (MIN_ROWS, StackedModel, batch_rows, budgets, is_convolutional, point_chunk,
                                         segment_of, stackable, waypoints, widest_activation)

SPLITS = ("train", "test")
Stack = StackedModel | SequentialStack
METRICS = ("loss", "error")


_NUM = (int, float, type(None))
#: what a path profile (``paths/<name>.json``, :meth:`PathEval.to_dict`) must hold to be read back
PROFILE_SHAPE = {"name": Required(str), "ts": Required([(int, float)]), "metrics": Required({str: [_NUM]}),
                 "steps": Required([(int, float)]), "knots": Required([(int, float)]), "labels": (list, type(None)),
                 "segments": Required([int]), "bound": _NUM, "barriers": Required({str: {str: _NUM}}),
                 "sizes": Required({str: int}), "seconds": Required((int, float)), "info": dict}


@dataclass
class PathEval:
    """Metrics along one path: ``metrics["train_loss"][i]`` is the train loss at ``ts[i]``."""

    name: str
    ts: list[float]
    metrics: dict[str, list[float]]
    steps: list[float]
    knots: list[float]
    labels: list[str] | None
    segments: list[int]
    bound: float | None
    barriers: dict[str, dict[str, float]]
    sizes: dict[str, int]
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def max_train_loss(self) -> float:
        return self.barriers["train_loss"]["max"]

    @property
    def within_bound(self) -> bool | None:
        """Whether the measured maximum train loss is at most the bound (1e-5 slack), if there is one."""
        return None if self.bound is None else self.max_train_loss <= self.bound + 1e-5

    def to_dict(self) -> dict:
        d = asdict(self)
        d["within_bound"] = self.within_bound
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PathEval":
        d = {k: v for k, v in d.items() if k != "within_bound"}
        return cls(**d)

    @classmethod
    def load(cls, path: str | FilePath) -> "PathEval":
        """A profile written by :meth:`save`; one :class:`UnreadableFileError` naming the file when it is not
        JSON, nested too deeply or not of :data:`PROFILE_SHAPE`."""
        doc = read_json(path, "path profile", PROFILE_SHAPE)
        try:
            return cls.from_dict(doc)
        except (TypeError, ValueError) as e:  # an unknown key
            raise UnreadableFileError(f"path profile {path} has the wrong shape ({e})") from None

    def to_csv(self) -> str:
        out = io.StringIO()
        keys = [k for k in (f"{s}_{m}" for s in SPLITS for m in METRICS) if k in self.metrics]
        writer = csv.writer(out)
        writer.writerow(["t", *keys, "segment", "label"])
        for i, t in enumerate(self.ts):
            seg = self.segments[i]
            label = self.labels[seg] if self.labels else ""
            writer.writerow([f"{t:.6f}", *(f"{self.metrics[k][i]:.6g}" for k in keys), seg, label])
        return out.getvalue()

    def save(self, out_dir: str | FilePath) -> FilePath:
        """Write ``<name>.json`` and ``<name>.csv`` atomically into ``out_dir``; returns the JSON path."""
        out = FilePath(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / f"{self.name}.json", self.to_dict())
        atomic_write_bytes(out / f"{self.name}.csv", self.to_csv().encode())
        return out / f"{self.name}.json"


def grid(num_points: int, knots: Sequence[float] = (0.0, 1.0)) -> list[float]:
    """A uniform grid of ``num_points`` plus every knot and t = 1/2, sorted and de-duplicated."""
    if num_points < 2:
        raise ValueError(f"eval.num_points must be at least 2; got {num_points}")
    ts = np.unique(np.round(np.concatenate([np.linspace(0, 1, num_points), np.asarray(knots, float), [0.5]]), 12))
    return [float(t) for t in ts]


def _split_tensors(data, test_data, max_items: int | None, device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    splits = {"train": materialize(data, "train", max_items, device)}
    if test_data is not None:
        splits["test"] = materialize(test_data, "test" if isinstance(test_data, Dataset) else "train", max_items, device)
    elif isinstance(data, Dataset):
        splits["test"] = materialize(data, "test", max_items, device)
    return splits


@torch.no_grad()
def _profile_batched(stacked: Stack, x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Mean loss and error of every point of the chunk loaded in ``stacked``, about ``batch_size``
    examples a batch (batches of equal size)."""
    n_points = len(stacked.ts)
    loss = torch.zeros(n_points, dtype=torch.float64, device=x.device)
    wrong = torch.zeros(n_points, dtype=torch.float64, device=x.device)
    n_batches = max(1, -(-len(x) // batch_size))
    rows = -(-len(x) // n_batches) if len(x) else batch_size
    for start in range(0, len(x), rows):
        l, w = score(stacked.logits(x[start : start + rows]), y[start : start + rows], stacked.class_dim,
                     scratch=stacked.scratch_logits)
        loss += l
        wrong += w
    return loss / len(x), wrong / len(x)


_profile_point = profile_point  # the one-point scorer (tests compare the evaluator's numbers with it)


def _chunk_size(model: nn.Module, n_points: int, x: Tensor, bn_inputs: Tensor | None, widest: int,
                device: torch.device) -> int:
    """Points evaluated together by the vmapped evaluation (see :func:`modeconn.evaluation.stacked.point_chunk`):
    room is left for a data batch of ``MIN_ROWS`` examples and, with BatchNorm, for a statistics batch. One
    at a time for convolutional models on a CPU, where a vmapped convolution (a grouped one) is slower than
    one model at a time."""
    if device.type == "cpu" and is_convolutional(model):
        return 1
    rows = min(len(x), MIN_ROWS)
    if bn_inputs is not None:
        rows = max(rows, min(len(bn_inputs), STATISTICS_BATCH))
    return point_chunk(n_points, sum(p.numel() for p in model.parameters()), widest, rows, device)


def _evaluate_chunk(single: PointModel | None, stacked: Stack | None, queue: ScoreQueue, ts: list[float],
                    points: dict[str, Tensor], splits: dict[str, tuple[Tensor, Tensor]], bn_inputs: Tensor | None,
                    rows_of) -> dict[str, list[float]]:
    """Loss and error of every split at the points of one chunk, through ``stacked`` all together; or
    (``stacked`` None, one point) through the private copy ``single``, whose logits join ``queue``: then the
    numbers of the queued points come back once it is full, else nothing yet (the queue is empty whenever a
    stacked chunk runs: a chunk only ever shrinks to one point). ``rows_of(n_items)``: examples a batch."""
    if stacked is None:
        single.load({k: v[0] for k, v in points.items()}, bn_inputs)
        full = queue.add({split: single.logits(x, rows_of(len(x))) for split, (x, _) in splits.items()})
        return queue.flush() if full else {}
    out: dict[str, list[float]] = {}
    stacked.load(ts, points)
    if bn_inputs is not None:
        stacked.statistics(bn_inputs)
    for split, (x, y) in splits.items():
        loss, err = (v.tolist() for v in _profile_batched(stacked, x, y, rows_of(len(x))))
        out[f"{split}_loss"], out[f"{split}_error"] = loss, err
    return out


def _param_names(model: nn.Module, path: Path) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    have = set(path.keys())
    missing = [n for n in names if n not in have]
    if missing:
        raise KeyError(f"the path does not cover the model's parameters {missing[:5]}: was it built for another model?")
    return names


def _plan(model: nn.Module, path: Path, n_points: int, splits: dict[str, tuple[Tensor, Tensor]],
          bn_inputs: Tensor | None, batched: bool, chunk: int | None, batch_size: int, dev: torch.device):
    """How to evaluate: (points a chunk, a factory of the stacked evaluator or None, ``rows_of(n_items,
    n_points)``: examples a data batch). A plain MLP goes through :class:`SequentialStack`, another model
    that keeps running statistics through the vmapped :class:`StackedModel`; ``batched=False`` one point at a
    time, at most ``batch_size`` examples a batch (on a CPU as many as keep the widest activation within the
    cache-sized budget: a conv net's forward over 256 examples at a time is about twice as fast as over 1437
    at once); a BatchNorm without running statistics one point at a time, exactly ``batch_size`` a batch."""
    x = splits["train"][0]
    if not stackable(model):  # a BatchNorm that normalises each eval batch by itself: the batch is in the numbers
        return 1, None, lambda n, c: batch_size
    if not batched:  # one point at a time, in batches whose activations fit the caches
        widest = widest_activation(model, x)
        return 1, None, lambda n, c: batch_rows(1, n, batch_size, widest, dev)
    layers = sequential_layers(model, x)
    if layers is not None:
        n_items = max(len(v[0]) for v in splits.values())
        planned, rows = sequential_plan(layers, n_points, sum(p.numel() for p in model.parameters()), n_items,
                                        bn_inputs is not None, batch_size, dev)
        return chunk or planned, lambda: SequentialStack(model, path, x, layers), lambda n, c: rows
    widest = widest_activation(model, x)
    chunk = chunk or _chunk_size(model, n_points, x, bn_inputs, widest, dev)
    return chunk, lambda: StackedModel(model, path, x), lambda n, c: batch_rows(c, n, batch_size, widest, dev)


def evaluate_path(
    model: nn.Module,
    path: Path,
    train_data,
    test_data=None,
    num_points: int = 61,
    *,
    ts: Sequence[float] | None = None,
    batch_size: int = 2048,
    point_chunk: int | None = None,
    max_items: int | None = None,
    bn_items: int = 2048,
    batched: bool = True,
    device: str | torch.device = "auto",
    name: str | None = None,
    progress: bool = True,
) -> PathEval:
    """Loss and error along ``path`` on train (and test) data, with every barrier.

    ``train_data`` / ``test_data``: a modeconn ``Dataset`` (its test split is used when ``test_data`` is
    None), an ``(inputs, targets)`` pair or an iterable of batches. The grid is ``num_points`` uniform
    points plus every knot and t = 1/2 (or exactly ``ts``). ``max_items`` caps each split (first items);
    BatchNorm statistics are recomputed at every point on the first ``bn_items`` training inputs.
    ``batched=False`` evaluates one point at a time (the reference behaviour; same numbers). Both choose their
    data batch (at most ``batch_size``; exactly ``batch_size`` for a BatchNorm without running statistics,
    whose numbers depend on it) to bound the memory of their activations, and the batched evaluation its
    point chunk (``point_chunk`` overrides it).
    """
    started = time.perf_counter()
    model = path.model if path.model is not None else model
    check_times(num_points, ts)  # the grid and the data are checked before anything is evaluated
    for key, value, low in (("batch_size", batch_size, 1), ("bn_items", bn_items, 1), ("point_chunk", point_chunk, 1),
                            ("max_items", max_items, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{key} must be an integer >= {low}" + (" or None" if key in ("point_chunk", "max_items")
                             else "") + f"; got {value!r}")
    check_model_data(model, train_data, "train_data")
    check_model_data(model, test_data, "test_data")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    names = _param_names(model, path)
    times = grid(num_points, path.knots) if ts is None else [float(t) for t in ts]
    splits = _split_tensors(train_data, test_data, max_items, dev)
    metrics = {f"{s}_{m}": [] for s in splits for m in METRICS}
    bn_inputs = splits["train"][0][:bn_items] if has_batchnorm(model) else None
    chunk, make_stack, rows_of = _plan(model, path, len(times), splits, bn_inputs, batched, point_chunk, batch_size, dev)
    n_params = sum(p.numel() for p in model.parameters())
    fetch = max(chunk, budgets(dev).parameters // max(1, n_params))  # points taken from the path at once
    single = PointModel(model, names) if chunk == 1 or make_stack is None else None
    stacked: Stack | None = None
    queue = ScoreQueue(splits)
    known = _segment_steps(path, times, names)  # straight segments: from their lengths, not from the points
    steps: list[float] = []
    previous: dict[str, Tensor] | None = None
    bar = tqdm(total=len(times), desc=f"eval {name or path.name}", disable=not progress, leave=False)
    for block in range(0, len(times), fetch):
        block_ts = times[block : block + fetch]
        block_points = {k: v.to(dev) for k, v in path.points(block_ts).items() if k in names}
        if known is None:
            steps.extend(_steps(block_points, names, previous))
            previous = {k: block_points[k][-1:].clone() for k in names}
        start = 0
        while start < len(block_ts):
            chunk_ts = block_ts[start : start + chunk]
            points = {k: v[start : start + len(chunk_ts)] for k, v in block_points.items()}
            if chunk > 1 and stacked is None:
                stacked = make_stack()
            if chunk == 1 and single is None:
                single = PointModel(model, names)
            try:
                values = _evaluate_chunk(single, stacked if chunk > 1 else None, queue, chunk_ts, points, splits,
                                         bn_inputs, lambda n, c=len(chunk_ts): rows_of(n, c))
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk //= 2  # the budget was not enough on this device: fewer points at a time, never a failure
                torch.cuda.empty_cache()
                continue
            for key, v in values.items():
                metrics[key].extend(v)
            start += len(chunk_ts)
            bar.update(len(chunk_ts))
    for key, v in queue.flush().items():
        metrics[key].extend(v)
    bar.close()
    steps = [0.0] + (steps if known is None else known)
    segments = [segment_of(path.knots, t) for t in times]
    result = PathEval(
        name=name or path.name,
        ts=times,
        metrics=metrics,
        steps=steps,
        knots=list(path.knots),
        labels=path.labels,
        segments=segments,
        bound=path.bound,
        barriers={k: barriers(times, v, steps) for k, v in metrics.items()},
        sizes={s: len(x) for s, (x, _) in splits.items()},
        seconds=time.perf_counter() - started,
        info=dict(path.info),
    )
    if any(not np.isfinite(v).all() for v in metrics.values()):
        result.info["warning"] = "non-finite loss along the path"
    return result


def _segment_steps(path: Path, times: Sequence[float], names: Sequence[str]) -> list[float] | None:
    """Distances between consecutive points of a path of straight segments (a line, a piecewise-linear
    path), as |s_i - s_(i-1)| times the segment's length (float64, computed once per segment), when every
    consecutive pair lies on one segment (a grid holding every knot does); else None (then :func:`_steps`
    measures them from the points)."""
    ways = waypoints(path)
    if ways is None:
        return None
    knots, lengths, out = list(path.knots), {}, []
    for a, b in zip(times, times[1:]):
        j = segment_of(knots, (a + b) / 2)  # a knot between two segments belongs to both
        lo, hi = knots[j], knots[j + 1]
        if not (lo <= a <= hi and lo < hi):
            return None
        if j not in lengths:
            ends = [torch.cat([w[k].reshape(-1) for k in names]).double() for w in (ways[j], ways[j + 1])]
            lengths[j] = float(torch.linalg.vector_norm(ends[1] - ends[0]))
        out.append(abs(b - a) / (hi - lo) * lengths[j])
    return out


def _steps(points: dict[str, Tensor], names: Sequence[str], previous: dict[str, Tensor] | None) -> list[float]:
    """Euclidean distances (float64) between consecutive points of a chunk, the first one measured from
    ``previous`` (the last point of the chunk before). Tensor by tensor and, on a CPU, in column blocks
    small enough to stay in cache, instead of one float64 copy of every parameter of the chunk."""
    first = next(iter(points.values()))
    n, dev = first.shape[0], first.device
    total = torch.zeros(n - 1 + (previous is not None), dtype=torch.float64, device=dev)
    if len(total) == 0:
        return []
    cols_per_block = max(1, (1 << 17) // n) if dev.type == "cpu" else None
    for k in names:
        p = points[k].reshape(n, -1)
        if previous is not None:
            total[0] += torch.linalg.vector_norm(p[0].double() - previous[k].reshape(-1).double()).square()
        if n < 2:
            continue
        step = cols_per_block or p.shape[1]
        for j in range(0, p.shape[1], step):
            block = p[:, j : j + step].double()
            total[len(total) - (n - 1) :] += torch.linalg.vector_norm(block[1:] - block[:-1], dim=1).square()
    return total.sqrt().tolist()
