"""The checks a run makes before it writes anything or trains: what identifies its endpoints, whether the
endpoint files already in the run directory belong to this configuration, whether each selected path can
apply to the model, and given checkpoints brought to the model's dtypes.

An endpoint's *identity* is everything that determines its weights: the seed, the trainer settings
(:func:`modeconn.training.train.train` adds those), the model's options, the data's options and a digest
of its training split, and, unless ``allow_provenance_change=true``, the CPU thread count, the device type
and the torch version. A finished endpoint or a resume file made under another identity is refused with a
message naming the first differing key, before the run directory is touched.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path as FilePath
from typing import Any

import torch
from torch import nn

from modeconn.data import Dataset, example_input
from modeconn.io.checkpoint import CheckpointMismatchError
from modeconn.io.options import ConfigError, to_container

__all__ = ["endpoint_identity", "data_digest", "check_endpoint_files", "check_paths_apply", "to_model_dtypes"]

DATA_KEYS_IGNORED = ("root", "download")  # where the data is found, not what it is (its digest says that)


def _flat(prefix: str, node: Any) -> dict:
    if isinstance(node, Mapping):
        return {k: v for key, value in node.items() for k, v in _flat(f"{prefix}.{key}", value).items()}
    return {prefix: list(node) if isinstance(node, tuple) else node}


def data_digest(data: Dataset) -> str:
    """A short sha256 of the training split (inputs and labels, as stored): equal data, equal digest."""
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train):
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def endpoint_identity(cfg, data: Dataset, device: torch.device) -> dict:
    """Plain values (dotted keys, JSON-safe) that, with the seed and trainer settings, determine an endpoint."""
    model = to_container(cfg.model)
    options = {k: v for k, v in to_container(cfg.data).items() if k not in DATA_KEYS_IGNORED}
    out = {**_flat("model", model), **_flat("data", options), "data.train_sha256": data_digest(data),
           "data.augment": bool(data.augment)}
    if not cfg.get("allow_provenance_change", False):
        out.update({"threads": torch.get_num_threads(), "device": device.type, "torch": str(torch.__version__)})
    return out


def check_endpoint_files(cfg, data: Dataset, out_dir: FilePath, device: torch.device, build) -> dict:
    """Refuse (``ValueError`` naming the file and the first differing key) endpoint checkpoints or resume
    files in ``out_dir/endpoints`` made by another configuration; nothing is written or trained.
    ``build(seed)`` makes the untrained model of that seed. Returns the identity to train with."""
    from modeconn.training.train import TrainConfig, check_reusable

    identity = endpoint_identity(cfg, data, device)
    tcfg = TrainConfig(**to_container(cfg.trainer), device=str(device))
    for seed in (2 * cfg.seed, 2 * cfg.seed + 1):
        file = out_dir / "endpoints" / f"seed{seed}.pt"
        if file.exists() or FilePath(f"{file}.resume.pt").exists() or file.with_suffix(".json").exists():
            check_reusable(build(seed), tcfg, seed, file, identity)
    return identity


def check_paths_apply(cfg, model: nn.Module, data: Dataset, device: torch.device) -> None:
    """Refuse a selected path that cannot apply to the model (the Kuditipudi et al. constructions on a model
    without hidden units, or with residual connections), before the endpoints are trained."""
    from modeconn.kuditipudi.chain import Chain
    from modeconn.paths.registry import BUILDERS
    from modeconn.units import infer

    needing = [name for name in cfg.path if getattr(BUILDERS.get(name), "needs_chain", False)]
    if not needing:
        return
    try:
        Chain.from_spec(infer(model, example_input(data).to(device)))
    except ValueError as e:  # UnsupportedArchitectureError, UnsupportedLayerError
        raise ConfigError(f"path.{needing[0]} cannot apply to model {cfg.model.get('name') or 'the model'}: {e}; "
                          f"drop it (e.g. '~path.{needing[0]}') or choose another model") from None


def to_model_dtypes(state: Mapping[str, Any], model: nn.Module, path) -> dict:
    """``state`` with each floating tensor converted to the dtype of the model's (a float16 or float64
    checkpoint for a float32 model); an integer or boolean tensor where the model has a floating one is
    refused by key (:class:`CheckpointMismatchError`): casting it would invent weights."""
    out = dict(state)
    for key, ref in model.state_dict().items():
        value = state.get(key)
        if not (torch.is_tensor(value) and torch.is_tensor(ref)) or value.dtype == ref.dtype:
            continue
        if value.is_floating_point() and ref.is_floating_point():
            out[key] = value.to(ref.dtype)
        else:
            name = str(value.dtype).replace("torch.", "")
            raise CheckpointMismatchError(f"checkpoint {path}: {key} is {name}, but the model's is "
                                          f"{str(ref.dtype).replace('torch.', '')}; only floating-point weights "
                                          "are converted")
    return out
