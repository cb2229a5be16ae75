"""Checkpoint files: atomic writes, a state dict plus a JSON sidecar, architecture fingerprints.

A checkpoint is two files:

* ``path`` (e.g. ``model.pt``): ``torch.save`` of the state dict, every tensor on the CPU;
* ``path.with_suffix(".json")`` (e.g. ``model.json``): the caller's ``meta`` plus ``"fingerprint"``.

Both are written atomically (temporary file in the same folder, fsync, ``os.replace``), the weights
first and the sidecar last, so a sidecar on disk always describes complete weights next to it.

A *fingerprint* describes an architecture by the shapes of its state dict (parameters *and* buffers,
BatchNorm's ``num_batches_tracked`` included): ``{"digest": <16 hex chars>, "shapes": {key: [..]}}``.
Restrict it with ``keys=`` or ``parameters_only=True`` for parameter-only comparisons.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeconn.io.jsonfile import MissingFileError, UnreadableFileError, read_json
from modeconn.io.state_formats import (PICKLE_STAND_INS, explain_mismatch, is_safetensors, log_notes, match_prefixes,
                                       read_safetensors, unwrap)

__all__ = ["CheckpointMismatchError", "UnreadableFileError", "MissingFileError", "safe_load", "fingerprint",
           "describe_mismatch", "atomic_write_bytes", "atomic_write_json", "strict_json", "atomic_torch_save",
           "sidecar_path", "save_checkpoint", "load_checkpoint", "read_meta"]

_DIGEST_CHARS = 16


class CheckpointMismatchError(ValueError):
    """A checkpoint's state dict does not fit the model it is meant for."""


# UnreadableFileError, MissingFileError: defined with the JSON/YAML readers (modeconn.io.jsonfile)


# --------------------------------------------------------------------------- safe reading

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save(..., _use_new_zipfile_serialization=False)
_PICKLE_PROTOCOL = 0x80  # first byte of a pickle of protocol >= 2
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def safe_load(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu",
              restart_hint: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear :class:`UnreadableFileError` for every way
    the file can be bad: missing, empty, truncated, random bytes, or a pickle payload.

    Every file modeconn reads goes through here: tensors, numbers, strings and plain containers load;
    anything that would need unpickling other objects (and so could run code) is refused before any of
    it runs. ``what`` names the file's role in the message (``"resume file"``); ``restart_hint`` adds
    that deleting the file starts that step over. torch's own advice (load with ``weights_only=False``)
    never reaches the message.
    """
    path = Path(path)
    hint = f"; delete {path} to start that step over" if restart_hint else ""
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path}")
    if not path.is_file():
        raise UnreadableFileError(f"{what} {path} is not a file{hint}")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not head:
        raise UnreadableFileError(f"{what} {path} is empty{hint}")
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise UnreadableFileError(f"{what} {path} is truncated or corrupt (an incomplete archive){hint}")
    elif is_safetensors(head):  # tensors only by construction; read by the safetensors package
        try:
            return read_safetensors(path)
        except (ImportError, ValueError) as e:
            raise UnreadableFileError(f"{what}: {e}{hint}") from None
    elif not head.startswith(_LEGACY_MAGIC):
        kind = ("a plain Python pickle, not a PyTorch file (refused: unpickling it could run code)"
                if head[0] == _PICKLE_PROTOCOL else "not a PyTorch file (random bytes or another format)")
        raise UnreadableFileError(f"{what} {path} is {kind}{hint}")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(PICKLE_STAND_INS):  # Lightning's hparams
            warnings.simplefilter("ignore")  # e.g. torch's note on an unusual pickle protocol
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        holds = f" ({found.group(1)})" if found else ""
        raise UnreadableFileError(
            f"{what} {path} holds Python objects other than tensors, numbers and plain containers{holds}; "
            f"refused: loading them could run code{hint}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file; the message is what matters
        raise UnreadableFileError(f"{what} {path} is truncated or corrupt ({_reason(e)}){hint}") from None


def _reason(err: Exception) -> str:
    """The first sentence of torch's error, or only its type when that mentions ``weights_only``."""
    text = str(err).strip()
    if not text or "weights_only" in text:
        return type(err).__name__
    return text.splitlines()[0].split(". ")[0]


# --------------------------------------------------------------------------- fingerprints


def fingerprint(
    model_or_state: nn.Module | Mapping[str, Any],
    keys: Iterable[str] | None = None,
    parameters_only: bool = False,
) -> dict:
    """The architecture as ``{"digest": str, "shapes": {state-dict key: [sizes]}}``.

    ``model_or_state`` is an ``nn.Module`` (its ``state_dict()``: parameters and persistent buffers,
    ``num_batches_tracked`` too), a state dict, or an existing fingerprint (returned re-digested).
    ``keys`` restricts it to those state-dict keys (absent ones are skipped); ``parameters_only``
    (modules only) restricts it to ``model.named_parameters()``. The digest is a short sha256 over the
    sorted ``key: shape`` pairs, so it does not depend on key order.
    """
    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
        if parameters_only:
            names = {n for n, _ in model_or_state.named_parameters()}
            state = {k: v for k, v in state.items() if k in names}
        shapes = {k: list(v.shape) for k, v in state.items() if torch.is_tensor(v)}
    elif isinstance(model_or_state, Mapping):
        if parameters_only:
            raise TypeError("fingerprint(parameters_only=True) needs an nn.Module; pass keys= for a state dict")
        if _is_fingerprint(model_or_state):
            shapes = {k: [int(s) for s in v] for k, v in model_or_state["shapes"].items()}
        else:
            shapes = {k: list(v.shape) for k, v in model_or_state.items() if torch.is_tensor(v)}
    else:
        raise TypeError(f"fingerprint expects an nn.Module or a state dict, got {type(model_or_state).__name__}")
    if keys is not None:
        wanted = set(keys)
        shapes = {k: v for k, v in shapes.items() if k in wanted}
    return {"digest": _digest(shapes), "shapes": shapes}


def _is_fingerprint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("shapes"), Mapping) and "digest" in obj


def _digest(shapes: Mapping[str, list[int]]) -> str:
    text = json.dumps({k: list(shapes[k]) for k in sorted(shapes)}, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:_DIGEST_CHARS]


def _shapes_of(fp: Any) -> dict[str, list[int]]:
    if _is_fingerprint(fp):
        return {k: list(v) for k, v in fp["shapes"].items()}
    if isinstance(fp, (nn.Module, Mapping)):
        return fingerprint(fp)["shapes"]
    raise TypeError(f"expected a fingerprint, a state dict or a module, got {type(fp).__name__}")


def describe_mismatch(expected_fp: Any, got_fp: Any, limit: int = 5) -> str:
    """A human-readable difference between two fingerprints; ``""`` when they match.

    ``expected_fp`` is what the model wants, ``got_fp`` what the checkpoint holds (fingerprints, or
    anything ``fingerprint`` accepts). Lists the first ``limit`` missing keys, unexpected keys and
    shape differences, with counts.
    """
    exp, got = _shapes_of(expected_fp), _shapes_of(got_fp)
    missing = [k for k in exp if k not in got]
    unexpected = [k for k in got if k not in exp]
    differing = [k for k in exp if k in got and list(exp[k]) != list(got[k])]

    def more(items: list) -> str:
        return f", ... ({len(items) - limit} more)" if len(items) > limit else ""

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:limit]) + more(missing))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:limit]) + more(unexpected))
    if differing:
        shown = [f"{k} expected {list(exp[k])}, got {list(got[k])}" for k in differing[:limit]]
        parts.append(f"{len(differing)} shape difference(s): " + "; ".join(shown) + more(differing))
    return "; ".join(parts)


# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|failed writing", re.IGNORECASE)


def _atomic_write(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
            except RuntimeError as e:  # torch's zip writer reports a full disk as "unexpected pos" / "write failed"
                if not _WRITE_FAILED.search(str(e)):
                    raise
                raise OSError(errno.ENOSPC, "No space left on device (the previous file is kept)", str(path)) from None
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should be readable like any other
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    return _atomic_write(path, lambda f: f.write(data))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if torch.is_tensor(obj):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, torch.dtype) or isinstance(obj, torch.device):
        return str(obj)
    for attr in ("item", "tolist"):  # numpy scalars and arrays
        if hasattr(obj, attr):
            try:
                return getattr(obj, attr)()
            except (TypeError, ValueError):
                pass
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        return list(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def strict_json(obj: Any) -> Any:
    """``obj`` as plain JSON values: every non-finite float (NaN, inf) becomes ``None`` (JSON ``null``),
    at any depth; paths, tensors, numpy values, dataclasses and mappings are converted first."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):  # bool is an int
        return obj
    if isinstance(obj, Mapping):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): strict_json(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return strict_json(_json_default(obj))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON atomically (see :func:`strict_json`: NaN and inf are
    written as ``null``, never as the non-JSON tokens ``NaN``/``Infinity``)."""
    text = json.dumps(strict_json(obj), indent=2, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------- checkpoints


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of checkpoint ``path``: ``path.with_suffix(".json")``."""
    return Path(path).with_suffix(".json")


def _cpu_state(state_dict: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in state_dict.items():
        out[k] = v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
    return out


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``state_dict`` (tensors moved to the CPU) to ``path`` and ``meta`` plus ``"fingerprint"``
    to its sidecar ``path.with_suffix(".json")``, both atomically, weights first. Returns ``path``."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"checkpoint path {path} must not end in .json (that is the sidecar's name)")
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    state = _cpu_state(state_dict)
    sidecar = dict(meta or {})
    sidecar["fingerprint"] = fingerprint(state)
    atomic_torch_save(state, path)
    atomic_write_json(sidecar_path(path), sidecar)
    return path


def read_meta(path: str | os.PathLike) -> dict | None:
    """The sidecar of checkpoint ``path`` as a dict, or ``None`` when there is none (its values of the wrong
    type, e.g. ``{"metrics": 5}``, are an :class:`UnreadableFileError` naming the sidecar)."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    hint = f"delete it and {Path(path).name} to start that step over"
    meta = read_json(side, "checkpoint sidecar", SIDECAR_SHAPE, hint=hint)
    if meta.get("finished") and "metrics" not in meta:  # what a finished training returns when it is reused
        raise UnreadableFileError(f"checkpoint sidecar {side} marks a finished training but has no metrics; {hint}")
    return meta


# what a sidecar's values must be where modeconn reads them (other keys are the caller's own)
SIDECAR_SHAPE = {"finished": bool, "seed": (int, type(None)), "config": dict, "metrics": {str: (int, float, type(None))},
                 "identity": dict, "fingerprint": {"digest": str, "shapes": {str: [int]}}}


def _to_model_dtypes(state: Mapping[str, Any], model: nn.Module, path: Path) -> dict:
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


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    map_location: Any = "cpu",
) -> tuple[dict, dict]:
    """Read checkpoint ``path``: ``(state_dict, meta)`` (``meta`` is ``{}`` without a sidecar).

    Loads with :func:`safe_load` (weights-only; ``.safetensors`` too) and takes the state dict out of the
    formats of :mod:`modeconn.io.state_formats` (wrappers, Lightning; with ``model``, DDP / Lightning /
    torch.compile prefixes when the stripped keys are exactly the model's). With ``model``, the fingerprint
    is compared to the model's (parameters and buffers) and ``CheckpointMismatchError`` names the
    differences, and floating tensors are converted to the model's dtypes (float16 or float64 files for a
    float32 model; an integer tensor where the model's is floating is a ``CheckpointMismatchError`` naming
    it); the state is *not* loaded into the model (call ``model.load_state_dict``).
    """
    path = Path(path)
    state, notes = unwrap(safe_load(path, "checkpoint", map_location=map_location), f"checkpoint {path}")
    meta = read_meta(path) or {}
    if model is not None:
        expected = fingerprint(model)
        state, stripped = match_prefixes(state, expected["shapes"])
        if fingerprint(state)["digest"] != expected["digest"]:
            shown, hint = explain_mismatch(state, expected["shapes"], stripped)
            detail = describe_mismatch(expected, shown) or "fingerprints differ"
            raise CheckpointMismatchError(
                f"checkpoint {path} was made for a different architecture than the config's model: {detail}{hint}")
        state = _to_model_dtypes(state, model, path)
        notes += stripped
    log_notes(path, notes)
    return state, meta
