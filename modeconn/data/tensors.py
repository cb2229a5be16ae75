"""``data=tensors data.path=FILE``: the user's own arrays, from a ``.pt`` (read weights-only) or ``.npz`` file
holding ``x_train``, ``y_train``, ``x_test``, ``y_test`` (inputs of any per-example shape, integer labels).

The class count is ``num_classes`` when given, else the file's ``num_classes`` entry, else one more than
the largest label. ``normalize: true`` standardises the inputs with the train split's per-channel (images:
dimension 1) or per-feature mean and std. Every problem is a ``ValueError`` naming ``data.path``'s file and
the entry.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeconn.data.dataset import Dataset, DatasetNotFoundError
from modeconn.io.checkpoint import safe_load

__all__ = ["load_tensors", "KEYS"]

KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read(file: Path) -> dict[str, Any]:
    if file.suffix == ".npz":
        if not zipfile.is_zipfile(file):  # numpy would read anything else as a pickle (and advise unpickling it)
            raise ValueError(f"data.path {file} is not a .npz archive (random bytes or another format)")
        try:
            with np.load(file, allow_pickle=False) as arrays:  # object arrays (pickles) are refused
                return {k: arrays[k] for k in arrays.files}
        except ValueError as e:
            raise ValueError(f"data.path {file}: {str(e).splitlines()[0]} (object arrays are refused)") from None
        except (OSError, EOFError) as e:
            raise ValueError(f"data.path {file} is not a readable .npz file ({e})") from None
    blob = safe_load(file, what="data.path file")
    if not isinstance(blob, dict):
        raise ValueError(f"data.path {file} holds a {type(blob).__name__}, not a dict with {', '.join(KEYS)}")
    return blob


def _tensor(value: Any, key: str, file: Path) -> torch.Tensor:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"data.path {file}: {key} is a {type(value).__name__}, not an array") from None
    if t.dim() == 0:
        raise ValueError(f"data.path {file}: {key} is a scalar, not an array of examples")
    return t


def _labels(y: torch.Tensor, key: str, file: Path) -> torch.Tensor:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"data.path {file}: {key} must hold integer class indices; got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"data.path {file}: {key} must be 1-D (one class index per example); got shape {tuple(y.shape)}")
    return y.to(torch.int64)


def _inputs(x: torch.Tensor, key: str, file: Path) -> torch.Tensor:
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"data.path {file}: {key} must hold real numbers; got dtype {x.dtype}")
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"data.path {file}: {key} holds NaN or infinite values")
    return x


def _standardise(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, x_train.dim())]  # per channel (dim 1) for images, per feature for vectors
    mean = x_train.mean(dim=dims, keepdim=True)
    std = x_train.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (x_train - mean) / std, (x_test - mean) / std


def load_tensors(path: str | os.PathLike | None = None, num_classes: int | None = None, normalize: bool = False,
                 augment: bool = False) -> Dataset:
    """The arrays of ``path`` as a :class:`Dataset` (see the module doc). ``augment``: random crops and flips
    of training batches (4-D image inputs only)."""
    if path is None:
        raise ValueError("data.path must name a .pt or .npz file with x_train, y_train, x_test, y_test")
    file = Path(os.path.expanduser(os.fspath(path)))
    if not file.is_file():
        raise DatasetNotFoundError(f"data.path {file} does not exist")
    blob = _read(file)
    missing = [k for k in KEYS if k not in blob]
    if missing:
        raise ValueError(f"data.path {file} lacks {', '.join(missing)} (it holds: {', '.join(map(str, blob)) or 'nothing'})")
    x_train, x_test = (_inputs(_tensor(blob[k], k, file), k, file) for k in ("x_train", "x_test"))
    y_train, y_test = (_labels(_tensor(blob[k], k, file), k, file) for k in ("y_train", "y_test"))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"data.path {file}: x_train has examples of shape {tuple(x_train.shape[1:])}, x_test of "
                         f"{tuple(x_test.shape[1:])}")
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(x) != len(y):
            raise ValueError(f"data.path {file}: x_{split} has {len(x)} examples, y_{split} {len(y)} labels")
    if len(y_train) == 0:
        raise ValueError(f"data.path {file}: x_train holds no examples")
    classes = _num_classes(num_classes, blob.get("num_classes"), y_train, y_test, file)
    if augment and x_train.dim() != 4:
        raise ValueError(f"data.augment needs image inputs (N, C, H, W); data.path {file} holds "
                         f"{tuple(x_train.shape)}")
    if normalize:
        x_train, x_test = _standardise(x_train, x_test)
    try:
        return Dataset("tensors", x_train, y_train, x_test, y_test, classes, tuple(x_train.shape[1:]), bool(augment),
                       info={"path": str(file)})
    except ValueError as e:  # labels outside [0, num_classes)
        raise ValueError(f"data.path {file}: {e}") from None


def _num_classes(given: Any, stored: Any, y_train: torch.Tensor, y_test: torch.Tensor, file: Path) -> int:
    value = given if given is not None else stored
    if value is None:
        return int(torch.cat([y_train, y_test]).max()) + 1
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) and np.asarray(value).size == 1:
        value = np.asarray(value).item()  # a number stored as an array
    key = "data.num_classes" if given is not None else f"data.path {file}: num_classes"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{key} must be a positive integer; got {value!r}")
    return int(value)
