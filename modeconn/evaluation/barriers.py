"""Every barrier definition of the literature, from one profile of a metric along a path.

See docs/evaluation.md. ``values[i]`` is the metric at ``ts[i]``; the grid must contain t = 0 and t = 1
(the endpoints) and t = 0.5 (for the midpoint barrier). ``steps[i]`` is the parameter-space distance
between grid points i-1 and i (``steps[0]`` is ignored); without it the length-weighted mean uses t.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BARRIER_NAMES = ("chord", "mean", "epsilon", "midpoint", "length_weighted_mean")


def _value_at(ts: np.ndarray, values: np.ndarray, t: float) -> float:
    hits = np.flatnonzero(np.abs(ts - t) <= 1e-12)
    if len(hits):
        return float(values[hits[0]])
    return float(np.interp(t, ts, values))


def barriers(ts: Sequence[float], values: Sequence[float], steps: Sequence[float] | None = None) -> dict[str, float]:
    """All barriers of one metric profile, plus argmax t, min, max, mean and path length.

    - chord: max_t [L(t) - ((1 - t) L(0) + t L(1))]        (Entezari et al. 2022)
    - mean: max_t L(t) - (L(0) + L(1)) / 2                  (Frankle et al. 2020)
    - epsilon: max_t L(t) - max(L(0), L(1))                 (Kuditipudi et al. 2019)
    - midpoint: L(1/2) - (L(0) + L(1)) / 2
    - length_weighted_mean: sum (L_{i-1} + L_i)/2 * d_i / sum d_i   (Garipov et al. 2018, "int")
    """
    t = np.asarray(ts, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if t.ndim != 1 or t.shape != v.shape or len(t) < 2:
        raise ValueError("ts and values must be 1-D arrays of the same length >= 2")
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    if not (abs(t[0]) <= 1e-8 and abs(t[-1] - 1.0) <= 1e-8 + 1e-5):  # np.isclose's default tolerances
        raise ValueError("the grid must include both endpoints t = 0 and t = 1")
    d = np.diff(t) if steps is None else np.asarray(steps, dtype=np.float64)[order][1:]
    l0, l1 = float(v[0]), float(v[-1])
    i_max = int(np.argmax(v))
    total = float(d.sum())
    trapezoid = (v[:-1] + v[1:]) / 2
    return {
        "chord": float(np.max(v - ((1 - t) * l0 + t * l1))),
        "mean": float(v.max() - (l0 + l1) / 2),
        "epsilon": float(v.max() - max(l0, l1)),
        "midpoint": _value_at(t, v, 0.5) - (l0 + l1) / 2,
        "length_weighted_mean": float((trapezoid * d).sum() / total) if total > 0 else float(v.mean()),
        "argmax_t": float(t[i_max]),
        "min": float(v.min()),
        "max": float(v.max()),
        "mean_value": float(v.mean()),
        "start": l0,
        "end": l1,
        "length": total if steps is not None else float("nan"),
    }
