"""Memory estimated before it is spent: a config whose data, evaluation grid or curve would need more memory
than the machine has is refused (exit 2) naming the key and the estimate, instead of ending in a
``MemoryError`` or a swapping machine an hour later.

The estimates are deliberately simple upper-end counts of the big allocations (documented per function; the
model's parameters are counted on PyTorch's meta device, before anything is allocated), compared with the
memory available now: ``MemAvailable`` (and a cgroup limit, when one is set) for the
host, ``torch.cuda.mem_get_info`` for a GPU.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from modeconn.io.options import ConfigError, to_container

__all__ = ["available_bytes", "data_bytes", "grid_bytes", "model_parameters", "path_points",
           "check_data", "check_model", "check_run", "check_copies"]

BYTES_PER_POINT = 512  # a grid point: its t, every metric, step, segment (Python floats) and its JSON/CSV rows
CURVE_COPIES = 4       # per bend (AutoNEB: pivot): weights, gradients, SGD momentum and the point built from them
DATA_COPIES = 3        # synthetic data: the inputs, the draws they are made from, the teacher's logits
MODEL_COPIES = 6       # the model, both endpoints, gradients, optimiser state and a path point, each float32


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


def _refuse_above(key: str, value, need: float, free: int | None, where: str, lower: str | None = None) -> None:
    """ConfigError ``key=value would need about ...`` when ``need`` bytes exceed ``free`` (``value`` None: ``key``
    holds the keys and values already; ``lower``: what to lower, default ``key``)."""
    if free is not None and need > free:
        what = key if value is None else f"{key}={value}"
        raise ConfigError(f"{what} would need about {_gb(need)} of {where} memory, more than the "
                          f"{_gb(free)} available; lower {lower or key}")


def check_copies(key: str, value, copies: float, parameters: int, device: torch.device | None = None) -> None:
    """Refuse ``key=value`` when ``copies`` float32 copies of a model of ``parameters`` parameters exceed the memory
    of ``device`` (host memory for the CPU or None)."""
    where = "GPU" if device is not None and device.type == "cuda" else "host"
    _refuse_above(key, value, float(copies) * parameters * 4, available_bytes(device), where)


def model_parameters(build) -> int | None:
    """The parameter count of the model ``build()`` makes, built on PyTorch's meta device (no memory is
    allocated); None when the model cannot be built there (its own build then reports what is wrong)."""
    try:
        with torch.device("meta"):
            model = build()
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - any failure here is reported by the real build that follows
        return None


def _folder_bytes(data: Mapping) -> tuple[str, float, str] | None:
    """``data=folder`` resized to ``data.size``: every image file under ``root``'s train/ and test/ at that size."""
    size, root = data.get("size"), data.get("root")
    hw = [size, size] if isinstance(size, int) else list(size) if isinstance(size, list) else []
    if root is None or len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        return None
    base = Path(os.path.expanduser(str(root)))
    count = sum(1 for split in ("train", "test") if (base / split).is_dir()
                for p in (base / split).rglob("*") if p.is_file())
    channels = data.get("channels", 3) if data.get("channels") in (1, 3) else 3
    keys = f"data.size={size} ({count} images under data.root, {channels} channel(s))"
    return keys, float(count) * channels * math.prod(hw) * 4 * DATA_COPIES, "data.size"


def data_bytes(data: Mapping) -> tuple[str, float, str] | None:
    """(the keys that set the size with their values, bytes, what to lower) for data made from its options
    (``synthetic``: every example's inputs, ``DATA_COPIES`` times over; ``folder``: its images at ``data.size``);
    None for files of a fixed size."""
    if data.get("name") == "folder":
        return _folder_bytes(data)
    if data.get("name") != "synthetic":
        return None
    shape = data.get("input_shape") or [16]
    shape = [shape] if isinstance(shape, int) else list(shape)
    train, test = int(data.get("num_train", 512)), int(data.get("num_test", 128))
    keys = f"data.num_train={train}, data.num_test={test}, data.input_shape={shape}"
    return keys, float(train + test) * math.prod(shape) * 4 * DATA_COPIES, "them"


def grid_bytes(num_points: int) -> float:
    """The evaluation grid's profile: ``BYTES_PER_POINT`` per point."""
    return float(num_points) * BYTES_PER_POINT


def check_data(cfg) -> None:
    """Before the data is made: refuse a data size the host cannot hold (``data.num_train=1e9``)."""
    found = data_bytes(to_container(cfg.data))
    if found is not None:
        keys, need, lower = found
        _refuse_above(keys, None, need, available_bytes(), "host", lower=lower)


def check_model(cfg, build, device: torch.device) -> None:
    """Before the model is built: refuse one whose ``MODEL_COPIES`` copies the device cannot hold (``model.*``)."""
    parameters = model_parameters(build)
    if parameters is not None:
        node = to_container(cfg.model)
        options = {k: v for k, v in node.items() if k not in ("name", "_target_")}
        what = f"model {node.get('name') or node.get('_target_')} with {options} ({parameters:,} parameters)"
        where = "GPU" if device.type == "cuda" else "host"
        _refuse_above(what, None, float(MODEL_COPIES) * parameters * 4, available_bytes(device), where,
                      lower="its size (model.*)")


def path_points(name: str, options: Mapping) -> tuple[str, object, int] | None:
    """(the key, its value, how many copies of the parameters) a constructor holds at once: a curve's bends
    (``num_bends``), AutoNEB's pivots after its last insertion (``cycles``); None for the others."""
    bends = options.get("num_bends")
    if isinstance(bends, int) and not isinstance(bends, bool):
        return f"path.{name}.num_bends", bends, bends
    if name == "autoneb" or "cycles" in options:
        from modeconn.paths.autoneb_cycles import expand_cycles

        pivots = 2
        for cycle in expand_cycles(options.get("cycles"), options.get("iterations_scale", 1.0)):
            pivots += (pivots - 1) * cycle.count if cycle.rule == "equal" else (
                min(cycle.count, pivots - 1) if cycle.rule == "highest" else 0)
        return f"path.{name}.cycles", f"(up to {pivots:,} pivots)", pivots
    return None


def check_run(cfg, model: torch.nn.Module, device: torch.device) -> None:
    """Before any training: refuse an evaluation grid the host cannot hold (``eval.num_points``), a curve or
    AutoNEB chain the device cannot hold (``path.<name>.num_bends``, ``path.<name>.cycles``) and Figure 2's
    trained nets (``stability.figure2.trials``, each kept with its weights)."""
    _refuse_above("eval.num_points", cfg.eval.num_points, grid_bytes(cfg.eval.num_points), available_bytes(), "host")
    parameters = sum(p.numel() for p in model.parameters())
    for name, options in (to_container(cfg.path) if cfg.get("path") is not None else {}).items():
        found = path_points(name, options or {})
        if found is not None:
            key, value, points = found
            check_copies(key, value, points * CURVE_COPIES, parameters, device)
    figure2 = (to_container(cfg.stability) if cfg.get("stability") is not None else {}).get("figure2")
    trials = figure2.get("trials", 5) if isinstance(figure2, Mapping) else None  # 5: Figure2Options' default
    if isinstance(trials, int) and not isinstance(trials, bool):
        check_copies("stability.figure2.trials", trials, 2 * trials, parameters, device)
