"""Shared fixtures: the device the tensor tests run on, one torch thread, the digits subsets the path tests
train on, and the disk cache of trained test nets (see ``nets.py``).

``MODECONN_TEST_DEVICE`` (default ``cpu``; ``bench/gpu_check.sh`` sets ``cuda``) picks the device: tests
take the ``device`` fixture, and the data fixtures ``flat`` and ``images`` live on it, so the nets trained
on them and the paths built from them do too. Tests marked ``cuda`` only make sense on a GPU (memory
budgets, non-deterministic kernels) and are skipped without one: ``pytest -m cuda`` runs them.

Tests of an optional dependency carry ``@requires("module", extra="...")`` (``from conftest import requires``):
without the module they skip with the pip command that installs it, so ``pytest`` collects and passes under
``pip install -e .[test]`` alone (``.ci/run`` checks that in a second environment).
"""
import importlib.util
import os

import pytest
import torch

import nets
from modeconn import data as D
from nets import N_ITEMS


def installed(module: str) -> bool:
    """Whether ``module`` (dotted names too) can be imported, without importing it; False, not an error, when a
    parent package is missing (``importlib.util.find_spec("a.b")`` raises then)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ModuleNotFoundError for a missing parent; ValueError for a stub module
        return False


def requires(*modules: str, extra: str | None = None) -> pytest.MarkDecorator:
    """A mark that skips the test unless every one of ``modules`` is installed; the reason names the missing
    ones and, with ``extra``, the modeconn extra that brings them (``pip install 'modeconn[extra]'``)."""
    missing = [m for m in modules if not installed(m)]
    how = f" (pip install 'modeconn[{extra}]')" if extra else ""
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed{how}")


def _test_device() -> torch.device:
    name = os.environ.get("MODECONN_TEST_DEVICE", "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"MODECONN_TEST_DEVICE={name!r} is not a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"MODECONN_TEST_DEVICE={name!r} but torch sees no CUDA device")
    return dev


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the tensor tests (``MODECONN_TEST_DEVICE``). On a GPU, float32 matrix products and
    convolutions stay float32 (no TF32), which the tests' tolerances assume."""
    dev = _test_device()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _net_cache(request):
    """Trained test nets are kept under pytest's cache (``.pytest_cache``), keyed by what made them."""
    cache = getattr(request.config, "cache", None)
    nets.CACHE = None if cache is None else cache.mkdir("modeconn_nets")
    yield
    nets.CACHE = None


@pytest.fixture(scope="session")
def flat(device):
    ds = D.load("digits")
    return ds.x_train[:N_ITEMS].to(device), ds.y_train[:N_ITEMS].to(device)


@pytest.fixture(scope="session")
def images(device):
    ds = D.load("digits", image=True)
    return ds.x_train[:N_ITEMS].to(device), ds.y_train[:N_ITEMS].to(device)
