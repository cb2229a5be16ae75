import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeconn.batchnorm import load_point, recompute_statistics
from modeconn.evaluate import PathEval, evaluate_path, grid
from modeconn.paths import PiecewiseLinearPath, linear
from modeconn.plots import plot_paths


def data(n=300, d=10, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes] * 2).argmax(1)
    return x, y


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))


def bn_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def plain_metrics(model, x, y):
    with torch.no_grad():
        out = model.eval()(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) != y).float().mean().item()


def test_batched_and_one_at_a_time_agree():
    x, y = data()
    model, a, b = mlp(0), mlp(1).state_dict(), mlp(2).state_dict()
    path = linear(a, b)
    fast = evaluate_path(model, path, (x, y), (x[:100], y[:100]), num_points=13, batch_size=64, progress=False)
    slow = evaluate_path(model, path, (x, y), (x[:100], y[:100]), num_points=13, batch_size=64, batched=False, progress=False)
    for key in fast.metrics:
        torch.testing.assert_close(torch.tensor(fast.metrics[key]), torch.tensor(slow.metrics[key]), atol=1e-5, rtol=0)
    assert fast.ts == slow.ts and len(fast.ts) == 13


def test_endpoints_reproduce_their_own_metrics():
    x, y = data()
    model, a, b = mlp(0), mlp(1), mlp(2)
    ev = evaluate_path(model, linear(a.state_dict(), b.state_dict()), (x, y), num_points=5, progress=False)
    for t_index, end in ((0, a), (-1, b)):
        loss, err = plain_metrics(end, x, y)
        assert ev.metrics["train_loss"][t_index] == pytest.approx(loss, abs=1e-6)
        assert ev.metrics["train_error"][t_index] == pytest.approx(err, abs=1e-7)


def test_batchnorm_statistics_are_recomputed_at_every_point_endpoints_included():
    x, y = data()
    model, a, b = bn_net(0), bn_net(1), bn_net(2)
    for end in (a, b):  # checkpoint statistics computed the way the evaluator computes them
        recompute_statistics(end, x[:128], batch_size=512)
    ev = evaluate_path(model, linear(a.state_dict(), b.state_dict()), (x, y), num_points=5, bn_items=128, progress=False)
    for t_index, end in ((0, a), (-1, b)):
        loss, err = plain_metrics(end, x, y)
        assert ev.metrics["train_loss"][t_index] == pytest.approx(loss, abs=1e-6)
        assert ev.metrics["train_error"][t_index] == pytest.approx(err, abs=1e-7)
    # stale statistics (fresh buffers) would give another number: the recomputation matters
    stale = bn_net(1)
    stale.load_state_dict({k: v for k, v in a.state_dict().items() if "running" not in k}, strict=False)
    assert plain_metrics(stale, x, y)[0] != pytest.approx(ev.metrics["train_loss"][0], abs=1e-4)
    mid = load_point(model, linear(a.state_dict(), b.state_dict())(0.5), x[:128])
    assert ev.metrics["train_loss"][ev.ts.index(0.5)] == pytest.approx(plain_metrics(mid, x, y)[0], abs=1e-6)


def test_grid_holds_uniform_points_every_knot_and_the_midpoint():
    assert grid(3, [0, 0.1, 1]) == [0.0, 0.1, 0.5, 1.0]
    assert grid(4) == pytest.approx([0, 1 / 3, 0.5, 2 / 3, 1])
    with pytest.raises(ValueError, match="num_points"):
        grid(1)


def test_piecewise_knots_are_evaluated_and_labelled(tmp_path):
    x, y = data()
    ws = [mlp(s).state_dict() for s in range(3)]
    path = PiecewiseLinearPath(ws, knots=[0, 0.3, 1], labels=["first", "second"])
    path.bound = 10.0
    ev = evaluate_path(mlp(0), path, (x, y), num_points=5, progress=False, name="pw")
    assert 0.3 in ev.ts and ev.segments[ev.ts.index(0.3)] == 1
    assert ev.within_bound is True
    ev.save(tmp_path)
    again = PathEval.load(tmp_path / "pw.json")
    assert again.metrics == ev.metrics and again.barriers == ev.barriers
    csv = (tmp_path / "pw.csv").read_text().splitlines()
    assert csv[0].startswith("t,train_loss,train_error") and "second" in csv[-1]
    assert json.loads((tmp_path / "pw.json").read_text())["within_bound"] is True
    png = plot_paths([ev, evaluate_path(mlp(0), linear(ws[0], ws[2]), (x, y), num_points=5, progress=False)],
                     tmp_path / "fig.png")
    assert png.stat().st_size > 1000


def test_steps_measure_parameter_distance():
    x, y = data()
    a, b = mlp(1).state_dict(), mlp(2).state_dict()
    ev = evaluate_path(mlp(0), linear(a, b), (x, y), num_points=11, progress=False)
    dist = torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in a)).item()
    assert ev.barriers["train_loss"]["length"] == pytest.approx(dist, rel=1e-9)


def test_a_path_for_another_model_is_refused():
    x, y = data()
    path = linear({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    with pytest.raises(KeyError, match="another model"):
        evaluate_path(mlp(0), path, (x, y), num_points=3, progress=False)
