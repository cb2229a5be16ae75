"""Shared fixtures: one torch thread (tiny nets run as fast, and far faster on a busy machine) and the
digits subsets the path tests train on."""
import pytest
import torch

from modeconn import data as D
from nets import N_ITEMS


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def flat():
    ds = D.load("digits")
    return ds.x_train[:N_ITEMS], ds.y_train[:N_ITEMS]


@pytest.fixture(scope="session")
def images():
    ds = D.load("digits", image=True)
    return ds.x_train[:N_ITEMS], ds.y_train[:N_ITEMS]
