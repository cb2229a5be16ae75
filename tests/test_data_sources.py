"""The user's data: ``data=tensors`` (.pt read weights-only, .npz without pickles) and ``data=folder``
(ImageFolder layout, resized, normalised), with the built-in sources' validation: every bad input one error
naming the key or the file."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from modeconn.data import NAMES, load
from modeconn.data.dataset import DatasetNotFoundError
from modeconn.io.checkpoint import UnreadableFileError


def arrays(n_train=12, n_test=6, shape=(3, 4, 4), classes=3, seed=0):
    g = np.random.default_rng(seed)
    return {"x_train": g.normal(size=(n_train, *shape)).astype(np.float32), "y_train": np.arange(n_train) % classes,
            "x_test": g.normal(size=(n_test, *shape)).astype(np.float32), "y_test": np.arange(n_test) % classes}


def test_both_sources_are_registered():
    assert "folder" in NAMES and "tensors" in NAMES


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_a_tensor_file_loads_exactly(tmp_path, suffix):
    blob = arrays()
    file = tmp_path / f"d{suffix}"
    if suffix == ".pt":
        torch.save({k: torch.as_tensor(v) for k, v in blob.items()}, file)
    else:
        np.savez(file, **blob)
    data = load("tensors", path=str(file))
    assert data.input_shape == (3, 4, 4) and data.num_classes == 3 and data.num_train == 12 and data.num_test == 6
    assert torch.equal(data.x_train, torch.as_tensor(blob["x_train"])) and data.y_test.dtype == torch.int64
    assert load("tensors", path=str(file), num_classes=5).num_classes == 5
    normal = load("tensors", path=str(file), normalize=True)
    assert torch.allclose(normal.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(normal.x_train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)


@pytest.mark.parametrize("change, words", [
    (lambda b: b.pop("y_test"), ["lacks y_test"]),
    (lambda b: b.update(y_train=b["y_train"].astype(np.float32)), ["y_train", "integer class indices"]),
    (lambda b: b.update(x_test=b["x_test"][:, :2]), ["x_train has examples of shape (3, 4, 4)", "(2, 4, 4)"]),
    (lambda b: b.update(y_test=b["y_test"][:-1]), ["x_test has 6 examples, y_test 5 labels"]),
    (lambda b: b.update(y_train=b["y_train"] - 1), ["train labels", "must lie in [0, 3)", "[-1, 1]"]),
    (lambda b: b.update(y_train=b["y_train"][:, None]), ["y_train must be 1-D"]),
    (lambda b: b["x_train"].__setitem__((0, 0, 0, 0), np.nan), ["x_train holds NaN"]),
    (lambda b: b.update(num_classes=np.array(2)), ["must lie in [0, 2)"]),
])
def test_bad_tensor_files_are_refused_naming_the_file_and_entry(tmp_path, change, words):
    blob = arrays()
    change(blob)
    file = tmp_path / "d.npz"
    np.savez(file, **blob)
    with pytest.raises(ValueError) as err:
        load("tensors", path=str(file))
    assert str(file) in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_tensor_files_are_read_without_running_code(tmp_path):
    torch.save({**{k: torch.as_tensor(v) for k, v in arrays().items()}, "hook": torch.nn.ReLU()}, tmp_path / "d.pt")
    with pytest.raises(UnreadableFileError, match="refused"):
        load("tensors", path=str(tmp_path / "d.pt"))
    blob = arrays()
    np.savez(tmp_path / "o.npz", **{**blob, "x_test": np.array([object()] * 6)})
    with pytest.raises(ValueError, match="object arrays are refused"):
        load("tensors", path=str(tmp_path / "o.npz"))
    with pytest.raises(DatasetNotFoundError, match="data.path .*nope.pt does not exist"):
        load("tensors", path=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="data.path must name"):
        load("tensors")
    with pytest.raises(ValueError, match="data.num_classes must be a positive integer"):
        np.savez(tmp_path / "d.npz", **blob)
        load("tensors", path=str(tmp_path / "d.npz"), num_classes=0)


def images(root, classes=("cat", "dog", "eel"), n=(4, 2), size=(10, 12), skip_test=()):
    g = np.random.default_rng(0)
    for split, count in zip(("train", "test"), n):
        for c, name in enumerate(classes):
            if split == "test" and name in skip_test:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = g.integers(0, 60, (*size, 3)) + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_an_image_folder_loads_with_train_class_indices_and_normalisation(tmp_path):
    root = images(tmp_path / "imgs", skip_test=("dog",))  # test/ lacks a class: eel must stay class 2
    data = load("folder", root=str(root))
    assert data.input_shape == (3, 10, 12) and data.num_classes == 3 and data.num_train == 12 and data.num_test == 4
    assert data.y_test.tolist() == [0, 0, 2, 2] and data.info["classes"] == ["cat", "dog", "eel"]
    assert torch.allclose(data.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    given = load("folder", root=str(root), size=[8, 8], channels=1, mean=0.5, std=0.25)
    assert given.input_shape == (1, 8, 8)
    raw = (given.x_train * 0.25 + 0.5)
    assert float(raw.min()) >= -1e-6 and float(raw.max()) <= 1 + 1e-6  # the given statistics, not computed ones
    assert load("folder", root=str(root), size=16).input_shape == (3, 16, 16)


def test_bad_image_folders_are_refused_naming_data_root(tmp_path):
    with pytest.raises(ValueError, match="data.root must name a folder"):
        load("folder")
    with pytest.raises(DatasetNotFoundError, match="data.root: .*missing does not exist"):
        load("folder", root=str(tmp_path / "missing"))
    only_train = images(tmp_path / "a")
    for f in (only_train / "test").rglob("*.png"):
        f.unlink()
    for d in sorted((only_train / "test").iterdir()):
        d.rmdir()
    (only_train / "test").rmdir()
    with pytest.raises(DatasetNotFoundError, match=r"a/test does not exist .*train/ and test/"):
        load("folder", root=str(only_train))
    mixed = images(tmp_path / "b")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(mixed / "train" / "cat" / "big.png")
    with pytest.raises(ValueError, match=r"images differ in size .*set data.size"):
        load("folder", root=str(mixed))
    assert load("folder", root=str(mixed), size=[10, 12]).num_train == 13
    foreign = images(tmp_path / "c")
    (foreign / "test" / "fox").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(foreign / "test" / "fox" / "0.png")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['fox'\] that train/ does not have"):
        load("folder", root=str(foreign))
    broken = images(tmp_path / "d")
    (broken / "train" / "cat" / "0.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"image .*cat/0.png cannot be read"):
        load("folder", root=str(broken), size=4)
    for key, value in (("size", [0, 4]), ("channels", 2), ("mean", [0.1, 0.2]), ("std", -1.0)):
        with pytest.raises(ValueError, match=f"data.{key} must"):
            load("folder", root=str(mixed), **{key: value})


@pytest.mark.slow  # a subprocess: about 5 s idle, more under load
def test_the_cli_refuses_a_bad_tensor_file_in_one_line(tmp_path):
    blob = arrays()
    blob.pop("x_test")
    np.savez(tmp_path / "d.npz", **blob)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    out = subprocess.run([sys.executable, "-m", "modeconn.run.cli", "data=tensors", "data.path=d.npz", "progress=false",
                          "path=[linear]", "hydra.run.dir=run"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"modeconn: error: data.path d.npz lacks x_test "
                                               "(it holds: x_train, y_train, y_test)"]
    assert not (tmp_path / "run").exists()
