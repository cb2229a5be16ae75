"""Trained curves between two solutions (Garipov et al. 2018): Bezier curves and polygonal chains.

A curve is phi(t) = sum_k c_k(t) w_k over control points ("bends") w_0 = theta_a, ..., w_{n-1} = theta_b.
``kind="bezier"`` uses the Bernstein basis of degree n - 1; ``kind="polychain"`` uses hat functions on the
uniform knots k / (n - 1) (straight segments through the bends). :class:`CurvePath` is a plain
:class:`~modeconn.params.path.Path`, so the evaluator measures it like any other path and every point
exports as a plain state dict.

:func:`~modeconn.paths.curve_fit.fit_curve` trains the interior bends of a curve for *any* ``nn.Module``:
no curve twin of the model class is written. As in the reference, t ~ U(0, 1) is drawn at each step (or, by
choice, several stratified t per batch, a golden-ratio sequence of t across steps and t drawn where the
trained bends weigh most, importance-weighted: :mod:`modeconn.paths.curve_times`), weight decay
is ``0.5 * wd * ||phi(t)||^2`` on the sampled point (reported apart from the loss), the optimiser is SGD
with momentum 0.9 and the learning rate is flat for the first half of the epochs, then decays linearly to
1% by 90%. BatchNorm layers use the batch's statistics during training (as in the reference); their running
statistics are recomputed at every evaluated t by :func:`modeconn.evaluation.evaluate.evaluate_path`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from modeconn.io.checkpoint import safe_load
from modeconn.params.path import Path, State, as_times, check_compatible, float_state

KINDS = ("bezier", "polychain")
INITS = ("line", "scaled")  # where the interior bends start: on the straight line, or there at the ends' norms
CHECKPOINT_FORMAT = "modeconn.curve/3"  # /3: the t sampler's state; resuming needs it
READABLE_FORMATS = ("modeconn.curve/2", CHECKPOINT_FORMAT)  # the bends and settings, as load_curve reads them


# ------------------------------------------------------------------------------------------- basis

def _check_kind(kind: str, num_bends: int) -> str:
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"curve kind must be one of {KINDS}; got {kind!r}")
    if int(num_bends) < 2:
        raise ValueError(f"a curve needs at least 2 bends (its endpoints); got num_bends={num_bends}")
    return kind


def coefficient_row(kind: str, num_bends: int, t: float) -> list[float]:
    """The n = ``num_bends`` basis coefficients c_k(t) at one t (Python floats).

    Exact one-hot rows at t = 0 and t = 1 (and, for a polychain, at every knot k / (n - 1)).
    """
    n = int(num_bends)
    t = float(t)
    if kind == "bezier":
        d = n - 1
        return [math.comb(d, k) * t**k * (1.0 - t) ** (d - k) for k in range(n)]  # 0.0 ** 0 == 1.0
    s = t * (n - 1)
    r = round(s)
    if abs(s - r) < 1e-9:  # a knot: exactly one bend
        s = float(r)
    return [max(0.0, 1.0 - abs(s - k)) for k in range(n)]


def coefficients(kind: str, num_bends: int, ts: Sequence[float] | Tensor | float) -> Tensor:
    """Basis coefficients ``[len(ts), num_bends]`` (float64) of a ``kind`` curve at times ``ts``."""
    kind = _check_kind(kind, num_bends)
    t = as_times(ts)
    return torch.tensor([coefficient_row(kind, num_bends, ti) for ti in t.tolist()], dtype=torch.float64).reshape(
        len(t), int(num_bends))


# ------------------------------------------------------------------------------------------- path

class CurvePath(Path):
    """phi(t) = sum_k c_k(t) bends[k]; ``bends[0]`` / ``bends[-1]`` are the endpoints.

    ``bends`` are state dicts over the same floating-point keys (parameters and float buffers; BatchNorm
    running statistics carried by a curve are never used: the evaluator recomputes them at every t). A
    polychain's ``knots`` are its bends' times k / (n - 1), so evaluation grids include every bend.
    ``points`` returns the bends themselves (copies, bit for bit) wherever the basis is one-hot: at t = 0
    and t = 1, and at a polychain's knots.
    """

    def __init__(self, bends: Sequence[Mapping[str, Tensor]], kind: str = "bezier", info: dict | None = None) -> None:
        super().__init__()
        self.kind = _check_kind(kind, len(bends))
        self.name = self.kind
        self.bends: list[State] = [float_state(b) for b in bends]
        for i, bend in enumerate(self.bends[1:], 1):
            check_compatible(self.bends[0], bend, what=f"bends 0 and {i}")
        n = len(self.bends)
        self.knots = [k / (n - 1) for k in range(n - 1)] + [1.0] if self.kind == "polychain" else [0.0, 1.0]
        self.info = dict(info or {})

    @classmethod
    def straight(cls, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], kind: str = "bezier",
                 num_bends: int = 3) -> "CurvePath":
        """An untrained curve: interior bends evenly spaced on the straight line (the line itself)."""
        a, b = float_state(theta_a), float_state(theta_b)
        check_compatible(a, b)
        n = int(num_bends)
        _check_kind(kind, n)
        interior = [{k: torch.lerp(a[k], b[k], i / (n - 1)) for k in a} for i in range(1, n - 1)]
        return cls([a, *interior, b], kind)

    @property
    def num_bends(self) -> int:
        return len(self.bends)

    @property
    def theta_a(self) -> State:
        return self.bends[0]

    @property
    def theta_b(self) -> State:
        return self.bends[-1]

    def coefficients(self, ts: Sequence[float] | Tensor | float) -> Tensor:
        """Basis coefficients ``[len(ts), num_bends]`` (float64)."""
        return coefficients(self.kind, self.num_bends, ts)

    def points(self, ts: Sequence[float] | Tensor) -> State:
        c = self.coefficients(ts)
        exact = [int(row.argmax()) if (row == 1).sum() == 1 and (row == 0).sum() == len(row) - 1 else None
                 for row in c]
        out: State = {}
        for key, ref in self.bends[0].items():
            w = c.to(device=ref.device, dtype=ref.dtype)
            used = [k for k in range(self.num_bends) if bool((c[:, k] != 0).any())]
            view = (-1,) + (1,) * ref.dim()
            acc = torch.zeros((len(c), *ref.shape), dtype=ref.dtype, device=ref.device)
            for k in used:
                acc.add_(w[:, k].reshape(view) * self.bends[k][key].unsqueeze(0))
            for i, k in enumerate(exact):
                if k is not None:
                    acc[i].copy_(self.bends[k][key])
            out[key] = acc
        return out

    def __repr__(self) -> str:
        return f"CurvePath(kind={self.kind!r}, bends={self.num_bends})"


def load_curve(checkpoint_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CurvePath:
    """The curve stored in a :func:`fit_curve` checkpoint (finished or not; ``info`` says how far)."""
    ckpt = safe_load(checkpoint_path, what="curve checkpoint", map_location=map_location, restart_hint=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        raise ValueError(f"curve checkpoint {checkpoint_path} is not a {CHECKPOINT_FORMAT} file; delete "
                         f"{checkpoint_path} to start that step over")
    return CurvePath(ckpt["bends"], ckpt["settings"]["kind"], info=curve_info(ckpt["settings"], ckpt["history"]))


def curve_info(settings: dict, history: Sequence[Mapping[str, float]]) -> dict:
    """A curve's ``info``: its settings, epochs done and one list per recorded quantity."""
    return {"settings": dict(settings), "epochs_done": len(history),
            **{k: [h[k] for h in history] for k in ("train_loss", "regularizer", "lr", "seconds")}}
