"""Where curve training looks: stratified t, the golden-ratio sequence, the bends' density and its weights."""
import math

import pytest
import torch
from torch import nn

from modeconn.paths.curve_times import GOLDEN, GRID_TIMES, CurveTimes
from modeconn.paths.curve_fit import fit_curve
from modeconn.paths.curves import coefficients


def _times(m, sequence, density, kind="bezier", bends=3, rows=None, seed=0):
    c = coefficients(kind, bends, GRID_TIMES)
    mass = c[:, list(range(1, bends - 1)) if rows is None else rows].sum(1)
    return CurveTimes(m, sequence, density, mass, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
@pytest.mark.parametrize("sequence", ["random", "golden"])
@pytest.mark.parametrize("density", ["uniform", "bends"])
def test_the_weighted_estimate_is_the_mean_over_uniform_t(kind, sequence, density):
    """E[w f(t)] = integral of f over [0, 1] whatever the sampling (the objective stays Garipov et al.'s):
    f(t) = t (1 - t) (1 + 2 t) (zero at the fixed ends, as a trained bend's gradient is) integrates to 1/3,
    while unweighted draws from the bends' density give 0.4 (Bezier) or 5/12 (polychain) and would fail."""
    times = _times(4, sequence, density, kind)
    total, n = 0.0, 0
    for _ in range(3000):
        t, w = times.draw()
        total += sum(wj * tj * (1 - tj) * (1 + 2 * tj) for tj, wj in zip(t, w))
        n += len(t)
    assert total / n == pytest.approx(1 / 3, abs=1e-3)


def test_the_bends_density_cancels_a_quadratic_bezier_coefficient():
    """Quadratic Bezier, fixed ends: p(t) = 6 t (1 - t), so w(t) c(t) = 1/3 (to the grid's resolution, and
    at most 2/3 in the cells next to the ends): the trained bend's gradient no longer scales with where t
    fell, and the draws concentrate in the middle."""
    times = _times(1, "random", "bends")
    products, middle = [], 0
    for _ in range(4000):
        (t,), (w,) = times.draw()
        products.append((t, w * 2 * t * (1 - t)))
        middle += 0.25 <= t < 0.75
    assert max(abs(p - 1 / 3) for t, p in products if 0.05 < t < 0.95) < 1e-3
    assert max(p for _, p in products) <= 2 / 3
    assert middle / 4000 == pytest.approx(11 / 16, abs=0.03)  # 3t^2 - 2t^3 from 1/4 to 3/4; uniform: 1/2


def test_with_free_ends_the_bends_density_is_uniform():
    times = _times(3, "random", "bends", bends=4, rows=[0, 1, 2, 3])
    plain = CurveTimes(3, "random", "uniform", None, torch.Generator().manual_seed(0))
    for _ in range(50):
        (t, w), (u, one) = times.draw(), plain.draw()
        assert one == [1.0] * 3
        assert t == pytest.approx(u, abs=1e-9) and w == pytest.approx(one, abs=1e-9)


def test_the_golden_sequence_shifts_one_stratified_lattice_evenly():
    times = _times(4, "golden", "uniform")
    offsets = []
    for _ in range(100):
        t, _ = times.draw()
        v = t[0] * 4
        assert t == pytest.approx([(j + v) / 4 for j in range(4)], abs=1e-12)  # one offset for all strata
        offsets.append(v)
    steps = [(b - a) % 1.0 for a, b in zip(offsets, offsets[1:])]
    assert steps == pytest.approx([GOLDEN] * 99, abs=1e-9)
    counts = [sum(k / 10 <= v < (k + 1) / 10 for v in offsets) for k in range(10)]
    assert min(counts) >= 9 and max(counts) <= 11  # every tenth of [0, 1] holds 10 +- 1 of 100 offsets
    assert all(math.isfinite(v) and 0 <= v < 1 for v in offsets)


def test_unknown_sampling_options_are_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 3))
    a, b = nn.Sequential(nn.Linear(4, 3)).state_dict(), model.state_dict()
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match="t_sequence must be one of random, golden; got 'sobol'"):
        fit_curve(model, a, b, data, t_sequence="sobol", progress=False)
    with pytest.raises(ValueError, match="t_density must be one of uniform, bends; got 'beta'"):
        fit_curve(model, a, b, data, t_density="beta", progress=False)
