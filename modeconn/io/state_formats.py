"""What people save, as a plain state dict: wrappers, key prefixes, Lightning files and ``.safetensors``.

* wrappers: ``{"state_dict": ...}`` (PyTorch Lightning ``.ckpt``, many scripts), ``{"model_state_dict": ...}``,
  ``{"model": ...}``: the first entry that holds tensors is the state dict (:func:`unwrap`);
* prefixes: ``module.`` (DDP / DataParallel), ``model.`` (a LightningModule holding ``self.model``) and
  ``_orig_mod.`` (``torch.compile``), in any nesting, are stripped only when the stripped keys are then
  exactly the model's (:func:`match_prefixes`); a model whose own keys start with ``model.`` keeps them;
* Lightning's ``hyper_parameters`` (an ``AttributeDict``) load as a plain dict through torch's weights-only
  unpickler (:data:`PICKLE_STAND_INS`): no Lightning code is imported or run;
* ``.safetensors`` files load through the ``safetensors`` package, which stores tensors only.

Nothing here reads a pickle itself: :func:`modeconn.io.checkpoint.safe_load` does, weights-only.
"""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["WRAPPERS", "PREFIXES", "PICKLE_STAND_INS", "SAFETENSORS_HINT", "is_safetensors", "read_safetensors",
           "unwrap", "match_prefixes", "explain_mismatch", "log_notes"]

WRAPPERS = ("state_dict", "model_state_dict", "model")
PREFIXES = {"module.": "DDP", "model.": "Lightning", "_orig_mod.": "torch.compile"}
SAFETENSORS_HINT = "pip install safetensors"
_MAX_DEPTH = 3  # prefixes stripped at most (e.g. model._orig_mod.module.)
log = logging.getLogger(__name__)


class _AttributeDict:
    """Stand-in for Lightning's ``AttributeDict`` (a dict subclass): unpickles as an empty plain ``dict`` that
    the pickle's own items then fill."""

    def __new__(cls, *args: Any, **kwargs: Any) -> dict:  # type: ignore[misc]
        return {}


# (stand-in, the dotted name a pickle refers to) for torch.serialization.safe_globals
PICKLE_STAND_INS = [(_AttributeDict, f"{module}.AttributeDict") for module in (
    "lightning.fabric.utilities.data", "lightning_fabric.utilities.data",
    "pytorch_lightning.utilities.parsing", "lightning.pytorch.utilities.parsing")]


# ------------------------------------------------------------------------------------------ safetensors

def is_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes are a safetensors header (a little-endian u64 length, then ``{``)."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] < 100_000_000


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (on the CPU). Raises ``ImportError`` (with the install hint)
    without the ``safetensors`` package and ``ValueError`` for a damaged file."""
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(f"reading {path} (a safetensors file) needs the safetensors package: {SAFETENSORS_HINT}") from err
    try:
        return dict(load_file(os.fspath(path), device="cpu"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        text = str(e).strip().splitlines()
        raise ValueError(f"safetensors file {path} is truncated or corrupt ({text[0] if text else type(e).__name__})") from None


# ------------------------------------------------------------------------------------------ wrappers

def _tensors(obj: Any) -> int:
    return sum(torch.is_tensor(v) for v in obj.values()) if isinstance(obj, Mapping) else 0


def unwrap(obj: Any, what: str = "checkpoint") -> tuple[dict, list[str]]:
    """``(state dict, notes)`` from what a file holds: a bare state dict as it is, else the first of
    :data:`WRAPPERS` that holds tensors (nested wrappers too). ``notes`` say what was taken, for the log.
    Raises ``ValueError`` when ``obj`` is not a mapping."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what} does not hold a state dict (got {type(obj).__name__})")
    notes: list[str] = []
    for _ in range(_MAX_DEPTH):
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            break
        key = next((k for k in WRAPPERS if _tensors(obj.get(k)) or _wraps(obj.get(k))), None)
        if key is None:
            break
        kind = " (a PyTorch Lightning checkpoint)" if any("lightning" in str(k) for k in obj) else ""
        notes.append(f"took the state dict under {key!r}{kind}")
        obj = obj[key]
    return dict(obj), notes


def _wraps(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(_tensors(obj.get(k)) for k in WRAPPERS)


# ------------------------------------------------------------------------------------------ prefixes

def _strip(keys: list[str], prefix: str) -> list[str] | None:
    return [k[len(prefix):] for k in keys] if keys and all(k.startswith(prefix) for k in keys) else None


def _variants(keys: list[str]) -> list[tuple[list[str], list[str]]]:
    """Every ``(prefixes stripped, keys)`` reachable by stripping known prefixes off all keys, shortest first."""
    out, frontier = [], [([], keys)]
    for _ in range(_MAX_DEPTH):
        nxt = []
        for done, ks in frontier:
            for prefix in PREFIXES:
                stripped = _strip(ks, prefix)
                if stripped is not None:
                    nxt.append(([*done, prefix], stripped))
        out += nxt
        frontier = nxt
    return out


def match_prefixes(state: Mapping[str, Any], expected: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """``state`` with known prefixes stripped when (and only when) its keys then equal ``expected``'s (the
    model's state-dict keys); otherwise ``state`` unchanged. Returns ``(state, notes)``."""
    keys, want = list(state), set(expected)
    if set(keys) == want:
        return dict(state), []
    for done, stripped in _variants(keys):
        if set(stripped) == want:
            note = "stripped the prefix " + " then ".join(f"{p!r} ({PREFIXES[p]})" for p in done)
            return dict(zip(stripped, state.values())), [f"{note} from all {len(keys)} keys"]
    return dict(state), []


def explain_mismatch(state: Mapping[str, Any], expected: Mapping[str, Any],
                     stripped: list[str] = ()) -> tuple[dict, str]:
    """For a state that does not fit: ``(the state to show the differences of, a hint)``. The hint names a
    known prefix the keys carry (the differences are then shown without it), a common prefix that would
    make the keys fit if removed, or the file's entries that hold tensors; ``""`` when none applies.
    ``stripped``: the notes of :func:`match_prefixes` when it stripped a prefix (keys fit, shapes do not)."""
    if stripped:
        return dict(state), f" (compared after it {stripped[0]}: the keys fit, the shapes do not)"
    keys, want = list(state), set(expected)
    variants = _variants(keys)
    if variants:
        done, stripped = max(variants, key=lambda v: len(set(v[1]) & want))
        prefixes = " then ".join(f"{p!r} ({PREFIXES[p]})" for p in done)
        return (dict(zip(stripped, state.values())),
                f"; its keys carry the prefix {prefixes}, shown here without it: the keys still differ, so it was kept")
    first = {k.split(".", 1)[0] for k in keys}
    if len(first) == 1 and all("." in k for k in keys):
        prefix = f"{first.pop()}."
        if {k[len(prefix):] for k in keys} == want:
            return dict(state), (f"; every key starts with {prefix!r}: these are the weights of a submodule; save "
                                 f"that submodule's state_dict() or remove the prefix")
    holders = [f"{k!r} ({_tensors(v)} tensors)" for k, v in state.items() if _tensors(v)]
    if holders:
        return {k: v for k, v in state.items() if torch.is_tensor(v)}, (
            f"; the file's entries holding tensors: {', '.join(holders[:5])} (none of {', '.join(WRAPPERS)})")
    return dict(state), ""


def log_notes(path: str | os.PathLike, notes: list[str]) -> None:
    """Say in the log how a checkpoint's state dict was taken out of its file (nothing for a bare one)."""
    if notes:
        log.info("checkpoint %s: %s", path, "; ".join(notes))
