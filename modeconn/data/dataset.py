"""Datasets as whole tensors, and batch iteration over datasets, tensor pairs or batch iterables."""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

DeviceLike = Union[str, torch.device]

class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are absent (and were not, or could not be, downloaded)."""


def check_labels(labels: Tensor, num_classes: int, what: str = "labels") -> None:
    """Labels are integer class indices in ``[0, num_classes)``; else ``ValueError`` naming the bad range."""
    if not torch.is_tensor(labels):
        raise TypeError(f"{what} must be a tensor of class indices; got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{what} must be integer class indices (int64); got dtype {labels.dtype}")
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{what} must lie in [0, {num_classes}); got labels in [{lo}, {hi}]")



@dataclass
class Dataset:
    """Whole train/test splits as tensors (float inputs, int64 targets)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    augment: bool = False  # random crop (pad 4) + horizontal flip on training batches only
    info: dict = field(default_factory=dict)  # how the data was made (e.g. a split seed), for the run's record

    def __post_init__(self) -> None:
        """Refuse splits that disagree with ``num_classes`` or ``input_shape`` (at construction, not mid-run)."""
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"dataset {self.name!r}: num_classes must be a positive integer; got {self.num_classes!r}")
        self.input_shape = tuple(int(s) for s in self.input_shape)
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if len(x) != len(y):
                raise ValueError(f"dataset {self.name!r}: {split} inputs and labels differ in length: {len(x)} vs {len(y)}")
            if tuple(x.shape[1:]) != self.input_shape:
                raise ValueError(f"dataset {self.name!r}: {split} inputs have shape {tuple(x.shape[1:])} per example, "
                                 f"not input_shape {self.input_shape}")
            check_labels(y, self.num_classes, f"dataset {self.name!r}: {split} labels (num_classes={self.num_classes})")

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        """The (inputs, targets) of ``split`` ("train" or "test")."""
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def to(self, device: DeviceLike) -> Dataset:
        """A copy with all tensors on ``device`` ("auto" allowed)."""
        dev = resolve_device(device)
        return dataclasses.replace(
            self, x_train=self.x_train.to(dev), y_train=self.y_train.to(dev),
            x_test=self.x_test.to(dev), y_test=self.y_test.to(dev))


def resolve_device(device: DeviceLike) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else -> ``torch.device(device)``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def augment_batch(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip of a (N, C, H, W) batch."""
    if x.ndim != 4:
        raise ValueError(f"augment_batch expects a 4-D (N, C, H, W) batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    pad = 4
    gdev = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(n, generator=generator, device=gdev) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def _is_pair(data: Any) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, Tensor) for t in data))


def _move(x: Tensor, y: Tensor, device: DeviceLike | None) -> tuple[Tensor, Tensor]:
    if device is None:
        return x, y
    dev = resolve_device(device)
    return x.to(dev), y.to(dev)


def iter_batches(data: Any, batch_size: int | None = None, split: str = "train",
                 shuffle: bool = False, generator: torch.Generator | None = None,
                 augment: bool = False, device: DeviceLike | None = None,
                 ) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches from a Dataset (its ``split``), an (inputs, targets) pair, or an
    iterable of batches (yielded as given). ``batch_size=None`` gives the whole split as one batch.
    Augmentation happens only if ``augment`` and ``data.augment`` and ``split == "train"``."""
    if isinstance(data, Dataset):
        x, y = data.split(split)
        augment = augment and data.augment and split == "train"
    elif _is_pair(data):
        x, y = data
        augment = False
        if len(x) != len(y):
            raise ValueError(f"inputs and targets differ in length: {len(x)} vs {len(y)}")
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor, dict)):
        return _iter_given(data, device)
    else:
        raise TypeError("data must be a Dataset, an (inputs, targets) pair of tensors, or an "
                        f"iterable of (x, y) batches; got {type(data).__name__}")
    return _iter_tensors(x, y, batch_size, shuffle, generator, augment, device)


def _iter_given(batches: Iterable, device: DeviceLike | None) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in batches:
        if not _is_pair(batch):
            raise TypeError("each batch must be an (x, y) pair of tensors, got "
                            f"{type(batch).__name__}")
        yield _move(*batch, device)


def _iter_tensors(x: Tensor, y: Tensor, batch_size: int | None, shuffle: bool,
                  generator: torch.Generator | None, augment: bool,
                  device: DeviceLike | None) -> Iterator[tuple[Tensor, Tensor]]:
    n = len(y)
    if batch_size is None:
        batch_size = max(n, 1)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
        xb, yb = _move(xb, yb, device)
        if augment:
            xb = augment_batch(xb, generator)
        yield xb, yb


def materialize(data: Any, split: str = "train", max_items: int | None = None,
                device: DeviceLike | None = None) -> tuple[Tensor, Tensor]:
    """All of ``data`` (or its first ``max_items`` examples, an integer >= 1) as one ``(x, y)`` pair of tensors."""
    if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, numbers.Integral)
                                  or max_items < 1):
        raise ValueError(f"max_items must be null or an integer >= 1; got {max_items!r}")
    xs, ys, count = [], [], 0
    for xb, yb in iter_batches(data, split=split, device=device):
        if max_items is not None:
            xb, yb = xb[:max_items - count], yb[:max_items - count]
        xs.append(xb)
        ys.append(yb)
        count += len(yb)
        if max_items is not None and count >= max_items:
            break
    if not xs:
        raise ValueError("materialize: data yielded no batches")
    return (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))


def example_input(data: Any, n: int = 2) -> Tensor:
    """A small batch of ``n`` training inputs (e.g. for tracing a model)."""
    return materialize(data, max_items=n)[0]


def describe(data: Any) -> str:
    """A one-line summary of ``data``."""
    if isinstance(data, Dataset):
        return (f"{data.name}: {data.num_train} train / {data.num_test} test, input "
                f"{tuple(data.input_shape)}, {data.num_classes} classes, "
                f"{data.x_train.dtype} on {data.x_train.device}, augment={data.augment}"
                + (f", split seed {data.info['split_seed']}" if "split_seed" in data.info else ""))
    if _is_pair(data):
        x, y = data
        return f"tensors: {len(y)} examples, input {tuple(x.shape[1:])}, on {x.device}"
    return f"batches from {type(data).__name__}"
