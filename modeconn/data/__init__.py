"""The data stage: datasets as whole tensors (:mod:`~modeconn.data.dataset`), the bundled sources by name
(:mod:`~modeconn.data.sources`, :mod:`~modeconn.data.mnist_subset`)."""
from modeconn.data.dataset import (Dataset, DatasetNotFoundError, DeviceLike, augment_batch, check_labels, describe,
                                   example_input, iter_batches, materialize, resolve_device)
from modeconn.data.sources import NAMES, load

__all__ = ["Dataset", "DatasetNotFoundError", "DeviceLike", "NAMES", "load", "iter_batches", "materialize",
           "resolve_device", "example_input", "describe", "augment_batch", "check_labels"]
