"""``data=folder data.root=DIR``: an image folder in torchvision's ``ImageFolder`` layout, read whole.

``DIR/train/<class>/<image>`` and ``DIR/test/<class>/<image>``; classes are the train split's folder names in
sorted order (a test folder must name one of them). Images are read as RGB (``channels: 3``) or grayscale
(``channels: 1``), resized to ``size`` (``[h, w]`` or one number for a square; ``null``: every image must
already have one size), scaled to [0, 1] and normalised per channel by ``mean`` / ``std`` (``null``: the train
split's own). Every problem is an error naming ``data.root`` or the file.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from modeconn.data.dataset import Dataset, DatasetNotFoundError

__all__ = ["load_folder"]

SPLITS = ("train", "test")


def _size(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    values = [size] if isinstance(size, int) else list(size) if isinstance(size, Sequence) else [size]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"data.size must be null, a positive integer or [height, width]; got {size!r}")
    return int(values[0]), int(values[1])


def _stats(value: Any, key: str, channels: int) -> torch.Tensor | None:
    if value is None:
        return None
    values = [value] if isinstance(value, (int, float)) else list(value) if isinstance(value, Sequence) else None
    if values is None or len(values) not in (1, channels) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"data.{key} must be null, a number or {channels} numbers (one per channel); got {value!r}")
    if key == "std" and any(v <= 0 for v in values):
        raise ValueError(f"data.std must be positive; got {value!r}")
    return torch.tensor(values * (channels if len(values) == 1 else 1), dtype=torch.float32).view(-1, 1, 1)


def _split(folder: Path, classes: list[str] | None) -> tuple[list[tuple[str, int]], list[str]]:
    """The (file, class index) pairs of one split and its class names (the train split's when given)."""
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise DatasetNotFoundError(f"data.root: {folder} does not exist (data=folder needs train/ and test/ "
                                   "subfolders, each with one folder of images per class)")
    try:
        ds = ImageFolder(str(folder), allow_empty=classes is not None)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
        raise ValueError(f"data.root: {folder}: {str(e).splitlines()[0]}") from None
    if classes is None:
        return list(ds.samples), list(ds.classes)
    foreign = [c for c in ds.classes if c not in classes]
    if foreign:
        raise ValueError(f"data.root: {folder} has class folder(s) {foreign[:5]} that train/ does not have "
                         f"(train classes: {', '.join(classes[:10])})")
    index = {ds.class_to_idx[c]: classes.index(c) for c in ds.classes}
    return [(file, index[i]) for file, i in ds.samples], classes


def _image(file: str, channels: int, size: tuple[int, int] | None) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor, resize

    try:
        with Image.open(file) as img:
            img = img.convert("RGB" if channels == 3 else "L")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"data.root: image {file} cannot be read ({str(e).splitlines()[0]})") from None
    if size is not None:
        img = resize(img, list(size), antialias=True)
    return pil_to_tensor(img)


def _read(samples: list[tuple[str, int]], channels: int, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    images = [_image(file, channels, size) for file, _ in samples]
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        by_shape = {tuple(x.shape): file for x, (file, _) in zip(images, samples)}
        shown = "; ".join(f"{file} is {s[1]}x{s[2]}" for s, file in list(by_shape.items())[:2])
        raise ValueError(f"data.root: images differ in size ({shown}); set data.size=[height,width] to resize them")
    x = torch.stack(images).to(torch.float32).div_(255) if images else torch.zeros(0, channels, *(size or (1, 1)))
    return x, torch.tensor([label for _, label in samples], dtype=torch.int64)


def load_folder(root: str | os.PathLike | None = None, size: Any = None, channels: int = 3, mean: Any = None,
                std: Any = None, augment: bool = False) -> Dataset:
    """The images under ``root`` (see the module doc) as a :class:`Dataset`; ``augment``: random crops
    (padding 4) and horizontal flips of training batches."""
    if root is None:
        raise ValueError("data.root must name a folder with train/ and test/ subfolders (one folder per class)")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB); got {channels!r}")
    hw = _size(size)
    mean_t, std_t = _stats(mean, "mean", channels), _stats(std, "std", channels)
    base = Path(os.path.expanduser(os.fspath(root)))
    if not base.is_dir():
        raise DatasetNotFoundError(f"data.root: {base} does not exist")
    train, classes = _split(base / "train", None)
    test, _ = _split(base / "test", classes)
    x_train, y_train = _read(train, channels, hw)
    x_test, y_test = _read(test, channels, hw)
    if x_test.numel() and x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"data.root: test images are {tuple(x_test.shape[2:])}, train images {tuple(x_train.shape[2:])}; "
                         "set data.size=[height,width] to resize them")
    if mean_t is None:
        mean_t = x_train.mean(dim=(0, 2, 3)).view(-1, 1, 1)
    if std_t is None:
        std_t = x_train.std(dim=(0, 2, 3)).clamp_min(1e-8).view(-1, 1, 1)
    x_train, x_test = (x_train - mean_t) / std_t, (x_test - mean_t) / std_t
    info = {"root": str(base), "classes": classes, "mean": mean_t.flatten().tolist(), "std": std_t.flatten().tolist()}
    return Dataset("folder", x_train, y_train, x_test, y_test, len(classes), tuple(x_train.shape[1:]), bool(augment),
                   info=info)
