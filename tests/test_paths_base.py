import pytest
import torch

from modeconn.paths import PiecewiseLinearPath, linear


def states(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)} for _ in range(n)]


def test_linear_endpoints_are_exact_and_points_are_batched():
    a, b = states(0, 2)
    path = linear(a, b)
    assert all(torch.equal(path(0.0)[k], a[k]) for k in a)
    assert all(torch.equal(path(1.0)[k], b[k]) for k in b)
    pts = path.points([0.0, 0.3, 1.0])
    assert pts["w"].shape == (3, 4, 3)
    torch.testing.assert_close(pts["w"][1], 0.7 * a["w"] + 0.3 * b["w"])
    assert path.knots == [0.0, 1.0] and path.labels is None


def test_linear_refuses_mismatched_endpoints_and_bad_times():
    a, b = states(0, 2)
    with pytest.raises(ValueError, match="shapes differ"):
        linear(a, {"w": torch.zeros(5, 3), "b": b["b"]})
    with pytest.raises(ValueError, match="only in the first"):
        linear(a, {"w": b["w"]})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        linear(a, b)(1.5)


def test_piecewise_passes_through_every_waypoint_at_its_knot():
    ws = states(1, 4)
    path = PiecewiseLinearPath(ws, labels=["x", "y", "z"])
    assert path.knots == pytest.approx([0, 1 / 3, 2 / 3, 1])
    for w, t in zip(ws, path.knots):
        assert all(torch.equal(path(t)[k], w[k]) for k in w)
    mid = path((path.knots[1] + path.knots[2]) / 2)
    torch.testing.assert_close(mid["w"], (ws[1]["w"] + ws[2]["w"]) / 2)
    assert path.segment_of(path.knots[1]) == 1


def test_piecewise_arclength_and_explicit_knots():
    a = {"w": torch.zeros(2)}
    ws = [a, {"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([4.0, 0.0])}]
    assert PiecewiseLinearPath(ws, knots="arclength").knots == pytest.approx([0, 0.75, 1])
    assert PiecewiseLinearPath(ws, knots=[0, 0.2, 1]).knots == [0, 0.2, 1]
    with pytest.raises(ValueError, match="knots"):
        PiecewiseLinearPath(ws, knots=[0, 0.8, 0.5])
    with pytest.raises(ValueError, match="labels"):
        PiecewiseLinearPath(ws, labels=["only one"])


def test_a_point_exports_to_a_user_model():
    model = torch.nn.Linear(3, 4)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: torch.randn_like(v) for k, v in a.items()}
    model.load_state_dict(linear(a, b).state_dict(0.25))
    torch.testing.assert_close(model.weight.data, 0.75 * a["weight"] + 0.25 * b["weight"])
