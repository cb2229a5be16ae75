"""Where on the curve each training step looks: the t of a step's points and their importance weights.

Curve training minimises the mean over t ~ U(0, 1) of the loss at phi(t); each step estimates it at m
stratified points t_j = F^-1((j + v_j) / m), j < m, weighting point j's loss by w_j = 1 / p(t_j) so that
the estimate stays unbiased for every choice below. Two independent choices:

* ``sequence``: ``"random"`` draws every v_j afresh from U(0, 1) (the reference: one t ~ U(0, 1) per
  batch when m = 1); ``"golden"`` gives all m the same offset v_k = frac(v_0 + k (sqrt 5 - 1) / 2) at step
  k (a randomly started golden-ratio sequence: each window of steps covers [0, 1] evenly, so the
  optimiser's momentum averages gradients from all along the curve instead of a random cluster);
* ``density``: ``"uniform"`` (p = 1, F = identity) or ``"bends"``, p(t) proportional to the summed basis
  coefficients of the trained bends. A trained bend's gradient is c_k(t) times the loss gradient at phi(t),
  so uniform t wastes draws near fixed endpoints where the coefficients vanish; under ``"bends"`` the
  weight cancels the coefficient for a quadratic Bezier curve (p = 6 t (1 - t); to the grid's
  resolution) and the draws concentrate where the barrier is. With free ends every bend is trained, the coefficients sum to one and
  ``"bends"`` is uniform.

The density is tabulated on a fine grid with a piecewise-linear CDF; the weights are that CDF's own
(piecewise-constant) inverse density, so the estimate is exactly unbiased.
"""
from __future__ import annotations

import bisect
import math

import torch

T_SEQUENCES = ("random", "golden")
T_DENSITIES = ("uniform", "bends")
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
GRID = 4096  # cells of the tabulated density
GRID_TIMES = torch.linspace(0.0, 1.0, GRID + 1, dtype=torch.float64)


class CurveTimes:
    """The m times and weights of each step, drawn from ``generator`` (whose state the training loop saves);
    ``offset`` (golden sequence) is the rest of the state, saved by the curve step."""

    def __init__(self, m: int, sequence: str, density: str, mass: torch.Tensor | None,
                 generator: torch.Generator) -> None:
        """``sequence`` / ``density``: from :data:`T_SEQUENCES` / :data:`T_DENSITIES` (checked by the
        caller); ``mass``: the trained bends' summed basis coefficients at :data:`GRID_TIMES` (``"bends"``)."""
        self.m, self.sequence, self.generator = int(m), sequence, generator
        self.uniform = density == "uniform"
        if not self.uniform:
            mass = mass.double().clamp_min(0.0)
            cells = (mass[1:] + mass[:-1]) / 2  # trapezoid mass of each cell (times GRID)
            cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cells.cumsum(0)])
            self.cdf = (cdf / cdf[-1]).tolist()
            self.cell_weight = [1.0 / (GRID * (hi - lo)) if hi > lo else math.inf  # never drawn if inf
                                for lo, hi in zip(self.cdf[:-1], self.cdf[1:])]
        self.offset = float(torch.rand(1, generator=generator, dtype=torch.float64)) if sequence == "golden" else 0.0

    def draw(self) -> tuple[list[float], list[float]]:
        """The next step's m times t_j (ascending) and weights w_j (all 1.0 for the uniform density)."""
        m = self.m
        if self.sequence == "golden":
            v = [self.offset] * m
            self.offset = (self.offset + GOLDEN) % 1.0
        else:
            v = torch.rand(m, generator=self.generator, dtype=torch.float64).tolist()
        u = [(j + vj) / m for j, vj in enumerate(v)]
        if self.uniform:
            return u, [1.0] * m
        ts, ws = [], []
        for uj in u:  # invert the piecewise-linear CDF; the weight is its inverse density on that cell
            i = min(bisect.bisect_right(self.cdf, uj) - 1, GRID - 1)  # cdf[i] <= u < cdf[i + 1]: mass > 0
            lo, hi = self.cdf[i], self.cdf[i + 1]
            ts.append((i + (uj - lo) / (hi - lo)) / GRID)
            ws.append(self.cell_weight[i])
        return ts, ws

