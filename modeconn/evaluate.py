"""Evaluate loss and error along a path, many points at once, and report every barrier.

Points are evaluated in chunks: the parameters of a chunk of t are stacked and one ``torch.func.vmap``'d
``functional_call`` runs them all on each data batch, instead of loading one model at a time. Models
with BatchNorm recompute their statistics at every point (see :mod:`modeconn.batchnorm`), so they are
evaluated one point at a time. Evaluation is deterministic: eval mode, no dropout, no augmentation,
plain cross-entropy, fixed data subsets whose sizes are recorded.
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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from modeconn.barriers import barriers
from modeconn.batchnorm import has_batchnorm, load_point
from modeconn.checkpoint import atomic_write_bytes, atomic_write_json
from modeconn.data import Dataset, materialize, resolve_device
from modeconn.paths.base import Path

SPLITS = ("train", "test")
METRICS = ("loss", "error")


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
        import json

        return cls.from_dict(json.loads(FilePath(path).read_text()))

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


def _accumulate(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and summed errors per point; logits are [points, batch, classes]."""
    p, b, c = logits.shape
    loss = F.cross_entropy(logits.reshape(p * b, c).float(), y.repeat(p), reduction="none").view(p, b)
    wrong = (logits.argmax(-1) != y.unsqueeze(0)).view(p, b)
    return loss.double().sum(1), wrong.double().sum(1)


# Batched evaluation: the largest activation (elements of one layer's output, all points of a chunk
# together) that one data batch may produce. On a CPU it should stay in the caches (the elementwise work of a
# vmapped layer, bias and ReLU, is memory-bound); a GPU wants large kernels. PARAMETER_BUDGET bounds the
# stacked parameters of a chunk (elements); MIN_ROWS is the data batch that keeps the batched matrix
# products efficient, which the point chunk leaves room for.
ACTIVATION_BUDGET = {"cpu": 1 << 20, "cuda": 1 << 26}
PARAMETER_BUDGET = 40_000_000
MIN_ROWS = 256


@torch.no_grad()
def _widest_activation(model: nn.Module, x: Tensor) -> int:
    """Elements of the largest output of any leaf module for one example (one forward pass on x[:1])."""
    widest = [int(x[:1].numel())]

    def hook(module, inputs, output):
        if isinstance(output, Tensor):
            widest.append(int(output.numel()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return max(widest)


def _budget(device: torch.device) -> int:
    return ACTIVATION_BUDGET.get(device.type, ACTIVATION_BUDGET["cuda"])


def _point_chunk(n_points: int, n_params: int, widest: int, n_items: int, device: torch.device,
                 convolutional: bool = False) -> int:
    """Points evaluated together: as many as the parameter budget allows and as leave a data batch of
    ``MIN_ROWS`` examples (or the whole split) within the activation budget. One at a time for
    convolutional models on a CPU, where a vmapped convolution (a grouped one) is slower than one model
    at a time."""
    if convolutional and device.type == "cpu":
        return 1
    by_params = PARAMETER_BUDGET // max(1, n_params)
    by_activations = _budget(device) // max(1, min(n_items, MIN_ROWS) * widest)
    return max(1, min(n_points, by_params, by_activations))


def _batch_rows(n_points: int, n_items: int, batch_size: int, widest: int, device: torch.device) -> int:
    """Examples per data batch when ``n_points`` points share it (``n_points`` = 1 included).

    As many as keep the widest activation of the batch within the activation budget; on a GPU at least
    ``batch_size // n_points`` (the point-examples budget of ``batch_size``). At least 64, never more than
    ``batch_size`` (the one-point-at-a-time batch) nor the whole split.
    """
    rows = _budget(device) // max(1, n_points * widest)
    if device.type != "cpu":
        rows = max(rows, batch_size // n_points)
    rows = min(max(rows, 64), max(64, batch_size))
    return max(1, min(rows, n_items))


def _lift_malloc_thresholds() -> None:
    """Allocate and free one 31 MiB block (its pages are never touched).

    glibc serves blocks above its mmap threshold (128 KiB at start) with fresh mmapped pages and returns
    freed heap tops above its trim threshold to the system, so the activations of every data batch would
    be page-faulted in anew; freeing an mmapped block raises both thresholds to its size (up to 32 MiB)
    for the rest of the process, after which batches reuse the heap. This alone made the batched
    evaluation of the default MLP a quarter faster on a 2-core CPU; elsewhere it costs one allocation."""
    block = torch.empty(31 << 20, dtype=torch.uint8)
    del block


@torch.no_grad()
def _profile_batched(model: nn.Module, points: dict[str, Tensor], x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Summed-then-averaged loss and error of every point in ``points`` (stacked), ``batch_size`` examples a batch."""
    buffers = dict(model.named_buffers())

    def logits(params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return functional_call(model, (params, buffers), (inputs,))

    many = vmap(logits, in_dims=(0, None))
    n_points = next(iter(points.values())).shape[0]
    if x.device.type == "cpu":
        _lift_malloc_thresholds()
    loss, wrong = torch.zeros(n_points, dtype=torch.float64, device=x.device), torch.zeros(n_points, dtype=torch.float64, device=x.device)
    rows = -(-len(x) // -(-len(x) // batch_size)) if len(x) else batch_size  # same number of batches, equal sizes
    for start in range(0, len(x), rows):
        l, w = _accumulate(many(points, x[start : start + rows]), y[start : start + rows])
        loss += l
        wrong += w
    return loss / len(x), wrong / len(x)


@torch.no_grad()
def _profile_point(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    loss = wrong = 0.0
    for start in range(0, len(x), batch_size):
        l, w = _accumulate(model(x[start : start + batch_size]).unsqueeze(0), y[start : start + batch_size])
        loss += float(l)
        wrong += float(w)
    return loss / len(x), wrong / len(x)


def _param_names(model: nn.Module, path: Path) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    have = set(path.keys())
    missing = [n for n in names if n not in have]
    if missing:
        raise KeyError(f"the path does not cover the model's parameters {missing[:5]}: was it built for another model?")
    return names


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
    ``batched=False`` evaluates one point at a time, ``batch_size`` examples a batch (the reference
    behaviour; same numbers). The batched evaluation chooses its point chunk (``point_chunk`` overrides it)
    and its data batch (at most ``batch_size``) to bound the memory of its activations.
    """
    started = time.perf_counter()
    model = path.model if path.model is not None else model
    dev = resolve_device(device)
    model = model.to(dev).eval()
    names = _param_names(model, path)
    times = grid(num_points, path.knots) if ts is None else [float(t) for t in ts]
    splits = _split_tensors(train_data, test_data, max_items, dev)
    metrics = {f"{s}_{m}": [] for s in splits for m in METRICS}
    steps: list[float] = []
    previous: dict[str, Tensor] | None = None
    use_bn = has_batchnorm(model)
    widest = _widest_activation(model, splits["train"][0]) if batched else None
    if use_bn or not batched:
        chunk = 1
    else:
        n_params = sum(p.numel() for p in model.parameters())
        conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        chunk = point_chunk or _point_chunk(len(times), n_params, widest, len(splits["train"][0]), dev, conv)
    bar = tqdm(total=len(times), desc=f"eval {name or path.name}", disable=not progress, leave=False)
    for start in range(0, len(times), chunk):
        chunk_ts = times[start : start + chunk]
        points = {k: v.to(dev) for k, v in path.points(chunk_ts).items() if k in names}
        steps.extend(_steps(points, names, previous))
        previous = {k: points[k][-1:].clone() for k in names}
        point = None
        if chunk == 1:
            bn_inputs = splits["train"][0][:bn_items] if use_bn else None
            point = load_point(model, {k: v[0] for k, v in points.items()}, bn_inputs)
        for split, (x, y) in splits.items():
            rows = batch_size if widest is None else _batch_rows(len(chunk_ts), len(x), batch_size, widest, dev)
            if point is not None:
                loss, err = ([v] for v in _profile_point(point, x, y, rows))
            else:
                loss, err = (v.tolist() for v in _profile_batched(model, points, x, y, rows))
            metrics[f"{split}_loss"].extend(loss)
            metrics[f"{split}_error"].extend(err)
        bar.update(len(chunk_ts))
    bar.close()
    steps = [0.0] + steps
    segments = [_segment(path.knots, t) for t in times]
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


def _segment(knots: Sequence[float], t: float) -> int:
    return int(min(max(np.searchsorted(np.asarray(knots), t, side="right") - 1, 0), len(knots) - 2))
