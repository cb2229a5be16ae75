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


@torch.no_grad()
def _profile_batched(model: nn.Module, points: dict[str, Tensor], x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    buffers = dict(model.named_buffers())

    def logits(params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return functional_call(model, (params, buffers), (inputs,))

    many = vmap(logits, in_dims=(0, None))
    n_points = next(iter(points.values())).shape[0]
    loss, wrong = torch.zeros(n_points, dtype=torch.float64, device=x.device), torch.zeros(n_points, dtype=torch.float64, device=x.device)
    for start in range(0, len(x), batch_size):
        l, w = _accumulate(many(points, x[start : start + batch_size]), y[start : start + batch_size])
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
    ``batched=False`` evaluates one point at a time (the reference behaviour; same numbers).
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
    chunk = 1 if (use_bn or not batched) else point_chunk or max(1, min(len(times), int(4e7 // max(1, sum(p.numel() for p in model.parameters())))))
    bar = tqdm(total=len(times), desc=f"eval {name or path.name}", disable=not progress, leave=False)
    for start in range(0, len(times), chunk):
        chunk_ts = times[start : start + chunk]
        points = {k: v.to(dev) for k, v in path.points(chunk_ts).items() if k in names}
        flat = torch.cat([points[k].reshape(len(chunk_ts), -1).double() for k in names], 1)
        if previous is not None:
            flat = torch.cat([previous, flat])
        steps.extend(torch.linalg.vector_norm(flat[1:] - flat[:-1], dim=1).tolist() if len(flat) > 1 else [])
        previous = flat[-1:]
        point = None
        if chunk == 1:
            bn_inputs = splits["train"][0][:bn_items] if use_bn else None
            point = load_point(model, {k: v[0] for k, v in points.items()}, bn_inputs)
        for split, (x, y) in splits.items():
            if point is not None:
                loss, err = ([v] for v in _profile_point(point, x, y, batch_size))
            else:
                loss, err = (v.tolist() for v in _profile_batched(model, points, x, y, max(64, batch_size // len(chunk_ts))))
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


def _segment(knots: Sequence[float], t: float) -> int:
    return int(min(max(np.searchsorted(np.asarray(knots), t, side="right") - 1, 0), len(knots) - 2))
