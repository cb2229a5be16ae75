"""The bundled data sources by name (``load``): scikit-learn's digits, a synthetic set, the MNIST subset and
torchvision's sets, the user's image folder (``folder``) or tensor file (``tensors``), each returned as a :class:`~modeconn.data.dataset.Dataset` of whole tensors."""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from modeconn.data.dataset import Dataset, DatasetNotFoundError, DeviceLike

# (torchvision class name, per-channel mean, per-channel std, augment)
_TORCHVISION = {
    "mnist": ("MNIST", (0.1307,), (0.3081,), False),
    "fashion_mnist": ("FashionMNIST", (0.2860,), (0.3530,), False),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
}
NAMES = ("digits", "synthetic", "mnist_subset", *_TORCHVISION, "folder", "tensors")



def load(name: str = "digits", root: str | os.PathLike | None = None, download: bool = False,
         device: DeviceLike = "cpu", **kw: Any) -> Dataset:
    """Load dataset ``name`` (one of ``NAMES``) as whole tensors on ``device``."""
    key = str(name).lower().replace("-", "_")
    if key == "digits":
        data = _load_digits(**kw)
    elif key == "synthetic":
        data = _load_synthetic(**kw)
    elif key == "mnist_subset":
        from modeconn.data.mnist_subset import load_mnist_subset

        data = load_mnist_subset(root, **kw)
    elif key in _TORCHVISION:
        data = _load_torchvision(key, root, download, **kw)
    elif key == "folder":  # the user's images: root/train/<class>/..., root/test/<class>/...
        from modeconn.data.folder import load_folder

        data = load_folder(root, **kw)
    elif key == "tensors":  # the user's arrays: a .pt or .npz file (data.path)
        from modeconn.data.tensors import load_tensors

        data = load_tensors(**kw)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")
    return data.to(device)


def _load_digits(image: bool = False) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    i_train, i_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2,
                                       stratify=y.numpy(), random_state=0)
    i_train, i_test = torch.as_tensor(i_train), torch.as_tensor(i_test)
    mean, std = x[i_train].mean(), x[i_train].std()  # global, from the train split
    x = (x - mean) / std
    shape = (1, 8, 8) if image else (64,)
    x = x.reshape(-1, *shape)
    return Dataset("digits", x[i_train], y[i_train], x[i_test], y[i_test], 10, shape)


def _load_synthetic(seed: int = 0, num_train: int = 512, num_test: int = 128,
                    input_shape: int | Iterable[int] = (16,), num_classes: int = 4,
                    noise: float = 0.1) -> Dataset:
    """Gaussian inputs labelled by a fixed random linear teacher (argmax of logits plus noise)."""
    shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(int(s) for s in input_shape)
    g = torch.Generator().manual_seed(int(seed))
    n, dim = num_train + num_test, 1
    for s in shape:
        dim *= s
    x = torch.randn(n, *shape, generator=g)
    teacher = torch.randn(dim, num_classes, generator=g) / dim ** 0.5
    logits = x.reshape(n, dim) @ teacher + noise * torch.randn(n, num_classes, generator=g)
    y = logits.argmax(1)
    return Dataset("synthetic", x[:num_train], y[:num_train], x[num_train:], y[num_train:],
                   int(num_classes), shape)


def _load_torchvision(key: str, root: str | os.PathLike | None, download: bool) -> Dataset:
    import torchvision.datasets as tvd

    cls_name, mean, std, augment = _TORCHVISION[key]
    root = os.path.abspath(os.path.expanduser(
        os.fspath(root) if root is not None else os.environ.get("MODECONN_DATA", "./data")))
    splits = []
    for train in (True, False):
        try:
            ds = getattr(tvd, cls_name)(root, train=train, download=download)
        except (RuntimeError, OSError) as err:  # "Dataset not found", URLError, failed downloads
            what = "could not be downloaded to" if download else "was not found in"
            raise DatasetNotFoundError(
                f"dataset {key!r} {what} {root} ({err}). Pass download=True "
                f"(CLI: data.download=true) with network access, or place the {cls_name} files "
                f"in {root} yourself.") from err
        x = torch.as_tensor(ds.data)  # uint8: (N, H, W) for MNIST-like, (N, H, W, C) for CIFAR
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = x.contiguous().to(torch.float32).div_(255)
        x.sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))
        splits += [x, torch.as_tensor(ds.targets, dtype=torch.int64)]
    num_classes = 100 if key == "cifar100" else 10
    return Dataset(key, *splits, num_classes, tuple(splits[0].shape[1:]), augment)


# ---------------------------------------------------------------------------------------- batching

