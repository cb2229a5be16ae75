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


def test_the_registry_builds_every_path_the_same_way_and_infers_the_spec_once(tmp_path):
    import inspect

    from modeconn.paths.dropout import dropout_path
    from modeconn.paths.registry import PathContext, build_path

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    a, b = model.state_dict(), {k: v + 1 for k, v in model.state_dict().items()}
    data = (torch.randn(10, 4), torch.randint(0, 3, (10,)))
    ctx = PathContext(model=model, theta_a=a, theta_b=b, data=data, device=torch.device("cpu"), work_dir=tmp_path)
    path = build_path("linear", ctx)
    assert path.name == "linear" and torch.equal(path(1.0)["0.weight"], b["0.weight"])
    assert "spec" not in vars(ctx)  # the straight line needs no unit spec: none was inferred
    extras = ctx.extras("dropout", inspect.signature(dropout_path).parameters)
    assert extras["spec"] is ctx.spec and [g.size for g in ctx.spec.groups] == [6]
    assert ctx.extras("dropout", inspect.signature(dropout_path).parameters)["spec"] is extras["spec"]


def test_a_bound_is_the_certificates_whole_path_bound():
    from modeconn.params.certificate import Bound, Certificate

    path = linear({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    assert path.bound is None and path.certificate is None
    path.bound = 0.5
    assert path.bound == 0.5 and path.certificate.path_bound == 0.5
    partial = Certificate("test", 3, 10, (Bound("the whole path", "O~(eps)", 0, 3, False),
                                          Bound("segment 1", "max(L1, L2)", 1, 2, True, 0.25, {"L1": 0.25, "L2": 0.1})))
    path.certify(partial)
    assert path.bound is None and Certificate.from_dict(path.info["certificate"]) == partial


def test_the_report_renders_a_certificate_from_its_data():
    from modeconn.params.certificate import Bound, Certificate
    from modeconn.reporting.report_md import certificate_lines

    whole = Certificate("Theorem 1", 4, 100, (Bound("the whole path", "max(L_a, L_b) + eps", 0, 4, True, 0.3,
                                                    {"L_a": 0.1, "L_b": 0.2, "eps": 0.1}),))
    (line,) = certificate_lines("dropout", whole, 0.25)
    assert "max(L_a, L_b) + eps = 0.3000 (L_a 0.1000, L_b 0.2000, eps 0.1000)" in line and "holds" in line
    (line,) = certificate_lines("dropout", whole, 0.35)
    assert "measured max 0.3500: VIOLATED" in line
    partial = Certificate("Theorem 2", 5, 100, (Bound("the whole path", "O~(eps)", 0, 5, False),
                                                Bound("the Lemma 2 part", "max(L1, L2)", 1, 4, True, 0.2,
                                                      {"L1": 0.2, "L2": 0.1}, measured=0.19)), {"dropout A": 0.4})
    (line,) = certificate_lines("noise", partial, 0.4)
    assert "the whole path: O~(eps)" in line and "max(L1, L2) = 0.2000" in line and "measured 0.1900" in line
    assert "dropout A measured 0.4000" in line and "whole path measured max 0.4000" in line
