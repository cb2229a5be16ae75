"""A JSON codec for measurement results: numpy arrays as lists, non-finite floats as the strings
"inf", "-inf", "nan" (strict JSON has no literal for them), and back."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["encode", "decode", "decode_float", "decode_array"]


def encode(a: Any) -> Any:
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return [encode(float(v)) for v in a.reshape(-1)]
    if isinstance(a, (list, tuple)):
        return [encode(v) for v in a]
    if isinstance(a, dict):
        return {k: encode(v) for k, v in a.items()}
    if isinstance(a, (float, np.floating)):
        f = float(a)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(a, np.integer):
        return int(a)
    if isinstance(a, np.bool_):
        return bool(a)
    return a


def decode_float(v: Any) -> Any:
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


def decode(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [decode(x) for x in v]
    return decode_float(v)


def decode_array(v: Any) -> np.ndarray | None:
    return None if v is None else np.asarray([decode_float(x) for x in v], dtype=np.float64)
