"""The path abstraction: a function from t in [0, 1] to a model's parameters.

Every constructor in modeconn returns a :class:`Path` and every evaluator accepts one. A path maps t to a
plain ``{name: tensor}`` dict keyed like the model's state dict, so any ``nn.Module`` can be evaluated at
a point through ``torch.func.functional_call`` or by ``load_state_dict``; no model class is rewritten.
``path(0)`` and ``path(1)`` are the endpoints exactly (``torch.lerp`` is exact at both ends).
"""
from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from modeconn.params.checks import check_compatible, check_model_data, check_states
from modeconn.params.certificate import Certificate
from modeconn.params.state import State, float_state, interpolate


def check_endpoints(theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], model: torch.nn.Module | None = None,
                    data=None) -> None:
    """The one check every constructor makes first, before any work: the endpoints have the same keys,
    shapes and dtypes (and fit ``model``), hold no NaN or infinity, and ``model`` runs on ``data`` with
    labels inside its outputs. Raises ``ValueError`` saying what differs (see :mod:`modeconn.params.checks`)."""
    check_states(theta_a, theta_b, model)
    if model is not None and data is not None:
        check_model_data(model, data)


def as_times(ts: Sequence[float] | Tensor | float) -> Tensor:
    """Times as a 1-D float64 tensor, checked to lie in [0, 1]."""
    t = torch.as_tensor(ts, dtype=torch.float64).reshape(-1)
    if t.numel() and (t.min() < 0 or t.max() > 1 or torch.isnan(t).any()):
        raise ValueError(f"path times must lie in [0, 1]; got {t.tolist()[:8]}")
    return t


def _lerp_stacked(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """Stacked interpolation between a and b at weights w (exact at 0 and 1)."""
    w = w.to(a.dtype).reshape(-1, *([1] * a.dim()))
    return torch.lerp(a.unsqueeze(0).expand(w.shape[0], *a.shape), b.unsqueeze(0).expand(w.shape[0], *b.shape), w)


def segment_index(knots: Sequence[float], t: float) -> int:
    """Index of the segment of a path with these ``knots`` that contains t (a knot belongs to the segment it
    starts; the last knot to the last segment)."""
    return min(max(bisect.bisect_right(list(knots), float(t)) - 1, 0), len(knots) - 2)


class Path:
    """Base class: subclasses implement :meth:`points`.

    Attributes: ``name``; ``knots`` (t of each waypoint, 0 first and 1 last); ``labels`` (one per segment
    or ``None``); ``certificate`` (what a theorem proves about this path, a
    :class:`~modeconn.params.certificate.Certificate`, or ``None``) and ``bound`` (its exact loss bound over
    the whole path, or ``None``); ``model`` (the module the
    path lives in when it differs from the caller's, e.g. after BatchNorm folding, else ``None``);
    ``info`` (constructor-specific facts for reports).
    """

    name: str = "path"

    def __init__(self) -> None:
        self.knots: list[float] = [0.0, 1.0]
        self.labels: list[str] | None = None
        self.certificate: Certificate | None = None
        self.model: torch.nn.Module | None = None
        self.info: dict = {}

    @property
    def bound(self) -> float | None:
        """The exact loss bound over the whole path, from :attr:`certificate` (None without one)."""
        return None if self.certificate is None else self.certificate.path_bound

    @bound.setter
    def bound(self, value: float | None) -> None:
        self.certificate = None if value is None else Certificate.given(value, self.num_segments)

    def certify(self, certificate: Certificate) -> None:
        """Attach what the construction proves (also to ``info``, so that evaluations carry it)."""
        self.certificate = certificate
        self.info["certificate"] = certificate.to_dict()

    def points(self, ts: Sequence[float] | Tensor) -> State:
        """Parameters at every t, each tensor with a leading axis of ``len(ts)``."""
        raise NotImplementedError

    def __call__(self, t: float) -> State:
        return {k: v[0] for k, v in self.points([float(t)]).items()}

    def state_dict(self, t: float) -> State:
        """A plain, detached state dict at t, ready for ``model.load_state_dict(..., strict=False)``."""
        return {k: v.clone() for k, v in self(t).items()}

    def keys(self) -> list[str]:
        return list(self(0.0).keys())

    @property
    def num_segments(self) -> int:
        return len(self.knots) - 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, segments={self.num_segments})"


class LinearPath(Path):
    """The straight line (1 - t) theta_a + t theta_b."""

    name = "linear"

    def __init__(self, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor]) -> None:
        super().__init__()
        check_endpoints(theta_a, theta_b)
        self.theta_a, self.theta_b = float_state(theta_a), float_state(theta_b)

    def points(self, ts: Sequence[float] | Tensor) -> State:
        t = as_times(ts)
        return {k: _lerp_stacked(a, self.theta_b[k], t.to(a.device)) for k, a in self.theta_a.items()}

    def keys(self) -> list[str]:
        return list(self.theta_a)


def linear(theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor]) -> LinearPath:
    """The straight path between two state dicts of the same architecture."""
    return LinearPath(theta_a, theta_b)


def linear_path(model: torch.nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor],
                data=None) -> LinearPath:
    """:func:`linear` with every constructor's arguments ``(model, theta_a, theta_b, data)``, so a run builds
    the straight line like any other path (the model and data are not needed for it)."""
    return LinearPath(theta_a, theta_b)


def _distance(a: State, b: State) -> float:
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)))


class PiecewiseLinearPath(Path):
    """Straight segments through waypoints; waypoint i sits at ``knots[i]``.

    ``knots`` default to ``"uniform"`` placement; ``"arclength"`` spaces them by parameter distance.
    ``labels`` name the move each segment makes (one per segment).
    """

    name = "piecewise"

    def __init__(
        self,
        waypoints: Sequence[Mapping[str, Tensor]],
        knots: Sequence[float] | str | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if len(waypoints) < 2:
            raise ValueError("a piecewise-linear path needs at least two waypoints")
        self.waypoints = [float_state(w) for w in waypoints]
        for i, w in enumerate(self.waypoints[1:], 1):
            check_compatible(self.waypoints[0], w, what=f"waypoints 0 and {i}")
        n = len(self.waypoints) - 1
        if labels is not None and len(labels) != n:
            raise ValueError(f"{n} segments need {n} labels; got {len(labels)}")
        self.labels = list(labels) if labels is not None else None
        self.knots = self._place_knots(knots)

    def _place_knots(self, knots: Sequence[float] | str | None) -> list[float]:
        n = len(self.waypoints) - 1
        if knots is None or knots == "uniform":
            return [i / n for i in range(n)] + [1.0]
        if knots == "arclength":
            lengths = [_distance(a, b) for a, b in zip(self.waypoints[:-1], self.waypoints[1:])]
            total = sum(lengths)
            if total == 0:
                return self._place_knots("uniform")
            cum, out = 0.0, [0.0]
            for length in lengths[:-1]:
                cum += length
                out.append(cum / total)
            return out + [1.0]
        if isinstance(knots, str):
            raise ValueError(f"knots must be 'uniform', 'arclength' or a list of times; got {knots!r}")
        k = [float(x) for x in knots]
        if len(k) != n + 1 or k[0] != 0.0 or k[-1] != 1.0 or any(b < a for a, b in zip(k, k[1:])):
            raise ValueError(f"knots must be {n + 1} non-decreasing times from 0 to 1; got {k}")
        return k

    def keys(self) -> list[str]:
        return list(self.waypoints[0])

    def segment_of(self, t: float) -> int:
        """Index of the segment that contains t (a knot belongs to the segment it starts)."""
        return segment_index(self.knots, t)

    def points(self, ts: Sequence[float] | Tensor) -> State:
        t = as_times(ts)
        out: dict[str, list[Tensor]] = {k: [] for k in self.waypoints[0]}
        for ti in t.tolist():
            i = self.segment_of(ti)
            lo, hi = self.knots[i], self.knots[i + 1]
            s = 1.0 if hi <= lo else min(max((ti - lo) / (hi - lo), 0.0), 1.0)
            point = interpolate(self.waypoints[i], self.waypoints[i + 1], s)
            for k in out:
                out[k].append(point[k])
        return {k: torch.stack(v) for k, v in out.items()}
