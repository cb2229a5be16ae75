"""Memory estimated before it is spent: a config whose data, evaluation grid or curve would need more memory
than the machine has is refused (exit 2) naming the key and the estimate, instead of ending in a
``MemoryError`` or a swapping machine an hour later.

The estimates are deliberately simple upper-end counts of the big allocations (documented per function),
compared with the memory available now: ``MemAvailable`` (and a cgroup limit, when one is set) for the
host, ``torch.cuda.mem_get_info`` for a GPU.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from modeconn.io.options import ConfigError, to_container

__all__ = ["available_bytes", "data_bytes", "grid_bytes", "curve_bytes", "check_data", "check_run"]

BYTES_PER_POINT = 512  # a grid point: its t, every metric, step, segment (Python floats) and its JSON/CSV rows
CURVE_COPIES = 4       # a curve's bends: weights, gradients, SGD momentum and the point built from them
DATA_COPIES = 3        # synthetic data: the inputs, the draws they are made from, the teacher's logits


def _host_available() -> int | None:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def available_bytes(device: torch.device | None = None) -> int | None:
    """Memory available now on ``device`` (host memory for the CPU or None); None when unknown."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    return _host_available()


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _refuse_above(key: str, value, need: float, free: int | None, where: str) -> None:
    if free is not None and need > free:
        raise ConfigError(f"{key}={value} would need about {_gb(need)} of {where} memory, more than the "
                          f"{_gb(free)} available; lower {key}")


def data_bytes(data: Mapping) -> tuple[str, int, float] | None:
    """(the key that sets the size, its value, bytes) for data made from its options (``synthetic``: every
    example's inputs, ``DATA_COPIES`` times over); None for files of a fixed size."""
    if data.get("name") != "synthetic":
        return None
    shape = data.get("input_shape") or [16]
    shape = [shape] if isinstance(shape, int) else list(shape)
    n = int(data.get("num_train", 512)) + int(data.get("num_test", 128))
    return "data.num_train", data.get("num_train"), float(n) * math.prod(shape) * 4 * DATA_COPIES


def grid_bytes(num_points: int) -> float:
    """The evaluation grid's profile: ``BYTES_PER_POINT`` per point."""
    return float(num_points) * BYTES_PER_POINT


def curve_bytes(num_bends: int, parameters: int) -> float:
    """A trained curve: ``num_bends`` copies of the model's float32 parameters, ``CURVE_COPIES`` times over."""
    return float(num_bends) * parameters * 4 * CURVE_COPIES


def check_data(cfg) -> None:
    """Before the data is made: refuse a data size the host cannot hold (``data.num_train=1e9``)."""
    found = data_bytes(to_container(cfg.data))
    if found is not None:
        key, value, need = found
        _refuse_above(key, value, need, available_bytes(), "host")


def check_run(cfg, model: torch.nn.Module, device: torch.device) -> None:
    """Before any training: refuse an evaluation grid the host cannot hold (``eval.num_points``) and a
    curve the device cannot hold (``path.<name>.num_bends``)."""
    _refuse_above("eval.num_points", cfg.eval.num_points, grid_bytes(cfg.eval.num_points), available_bytes(), "host")
    parameters = sum(p.numel() for p in model.parameters())
    for name, options in (to_container(cfg.path) if cfg.get("path") is not None else {}).items():
        bends = (options or {}).get("num_bends")
        if isinstance(bends, int) and not isinstance(bends, bool):
            where = "GPU" if device.type == "cuda" else "host"
            _refuse_above(f"path.{name}.num_bends", bends, curve_bytes(bends, parameters), available_bytes(device), where)
