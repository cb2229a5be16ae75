import math

import numpy as np
import pytest

from modeconn.evaluation.barriers import barriers

TS = [0.0, 0.25, 0.5, 0.75, 1.0]
PROFILE = [1.0, 3.0, 2.0, 5.0, 2.0]


def test_every_definition_on_a_known_profile():
    b = barriers(TS, PROFILE, steps=[0.0, 1.0, 1.0, 1.0, 1.0])
    # chord line 1 + t: [1, 1.25, 1.5, 1.75, 2]; largest excess 5 - 1.75 at t = 0.75
    assert b["chord"] == pytest.approx(3.25)
    assert b["mean"] == pytest.approx(5.0 - 1.5)
    assert b["epsilon"] == pytest.approx(5.0 - 2.0)
    assert b["midpoint"] == pytest.approx(2.0 - 1.5)
    # trapezoids (1+3)/2, (3+2)/2, (2+5)/2, (5+2)/2 with equal steps
    assert b["length_weighted_mean"] == pytest.approx((2 + 2.5 + 3.5 + 3.5) / 4)
    assert b["argmax_t"] == 0.75
    assert (b["min"], b["max"], b["length"]) == (1.0, 5.0, 4.0)
    assert b["mean_value"] == pytest.approx(np.mean(PROFILE))


def test_length_weighting_uses_parameter_distance():
    b = barriers(TS, PROFILE, steps=[0.0, 3.0, 1.0, 0.0, 0.0])
    assert b["length_weighted_mean"] == pytest.approx((2 * 3 + 2.5 * 1) / 4)


def test_without_steps_t_spacing_is_used_and_length_is_unknown():
    b = barriers(TS, PROFILE)
    assert b["length_weighted_mean"] == pytest.approx((2 + 2.5 + 3.5 + 3.5) / 4)
    assert math.isnan(b["length"])


def test_flat_profile_has_no_barrier_and_unsorted_grid_is_sorted():
    b = barriers([1.0, 0.0, 0.5], [0.2, 0.2, 0.2])
    assert b["chord"] == b["mean"] == b["epsilon"] == b["midpoint"] == 0.0


def test_midpoint_is_interpolated_when_not_on_the_grid():
    assert barriers([0.0, 0.4, 1.0], [0.0, 1.0, 0.0])["midpoint"] == pytest.approx(1.0 * (0.5 / 0.6))


def test_grid_without_endpoints_is_refused():
    with pytest.raises(ValueError, match="endpoints"):
        barriers([0.1, 0.5, 1.0], [1, 2, 3])
