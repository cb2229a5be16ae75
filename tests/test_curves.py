"""Trained curves (Garipov et al. 2018): the basis, the path, fitting, resuming, BatchNorm."""
import math

import pytest
import torch
from torch import nn

from modeconn import data as D
from modeconn import models
from modeconn.params.batchnorm import load_point, recompute_statistics
from modeconn.evaluation.evaluate import _profile_point, evaluate_path
from modeconn.paths import linear
from modeconn.paths.curve_times import GRID_TIMES, CurveTimes
from modeconn.paths.curve_fit import CurveStep, FlatCurve, fit_curve
from modeconn.paths.curves import CurvePath, coefficients, load_curve
from modeconn.training.train import NonFiniteLossError, TrainConfig, train


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trained(build, data, seed, epochs, lr=0.05, batch_size=64):
    torch.manual_seed(seed)
    model = build()
    train(model, data, TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=1e-4, device="cpu"),
          seed=seed, progress=False)
    return _state(model)


@pytest.fixture(scope="module")
def digits():
    return D.load("digits")


@pytest.fixture(scope="module")
def mlp_ends(digits):
    def build():
        return models.build("mlp", digits.input_shape, 10, hidden=(64, 64))
    return build, _trained(build, digits, 0, 20), _trained(build, digits, 1, 20)


# ------------------------------------------------------------------------------------------ basis

def test_bezier_basis_is_bernstein_and_exact_at_the_ends():
    ts = torch.linspace(0, 1, 11, dtype=torch.float64)
    c = coefficients("bezier", 3, ts)
    expected = torch.stack([(1 - ts) ** 2, 2 * ts * (1 - ts), ts**2], 1)
    assert torch.allclose(c, expected, atol=1e-15)
    assert torch.allclose(coefficients("bezier", 5, ts).sum(1), torch.ones(11, dtype=torch.float64))
    for n in (2, 3, 4, 7):
        c = coefficients("bezier", n, [0.0, 1.0])
        assert c[0].tolist() == [1.0] + [0.0] * (n - 1)
        assert c[1].tolist() == [0.0] * (n - 1) + [1.0]


def test_polychain_basis_is_hat_functions_on_uniform_knots():
    n = 5
    knots = [k / (n - 1) for k in range(n)]
    c = coefficients("polychain", n, knots)
    assert torch.equal(c, torch.eye(n, dtype=torch.float64))  # exactly one bend at every knot
    c = coefficients("polychain", n, [0.1, 0.6])
    assert torch.allclose(c[0], torch.tensor([0.6, 0.4, 0, 0, 0], dtype=torch.float64))
    assert torch.allclose(c[1], torch.tensor([0, 0, 0.6, 0.4, 0], dtype=torch.float64))
    many = coefficients("polychain", 50, [1 / 49 * k for k in range(50)])  # k/49 * 49 is not always k
    assert torch.equal(many, torch.eye(50, dtype=torch.float64))
    with pytest.raises(ValueError, match="kind"):
        coefficients("spline", 3, [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        coefficients("bezier", 3, [1.5])


# ------------------------------------------------------------------------------------------- path

def test_curve_path_is_a_path_exact_at_its_bends():
    g = torch.Generator().manual_seed(0)
    bends = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g),
              "steps": torch.tensor(7)} for _ in range(4)]
    for kind in ("bezier", "polychain"):
        curve = CurvePath(bends, kind)
        assert curve.name == kind and curve.num_bends == 4 and "steps" not in curve.keys()
        pts = curve.points([0.0, 0.3, 1.0])
        assert pts["w"].shape == (3, 4, 3)
        assert torch.equal(curve(0.0)["w"], bends[0]["w"]) and torch.equal(curve(1.0)["b"], bends[-1]["b"])
        assert torch.equal(pts["w"][0], bends[0]["w"]) and torch.equal(pts["w"][2], bends[-1]["w"])
        c = curve.coefficients([0.3])[0].float()
        assert torch.allclose(pts["w"][1], sum(c[k] * bends[k]["w"] for k in range(4)), atol=1e-6)
        exported = curve.state_dict(0.3)
        assert set(exported) == {"w", "b"} and exported["w"].data_ptr() != pts["w"].data_ptr()
    chain = CurvePath(bends, "polychain")
    assert chain.knots == [0.0, 1 / 3, 2 / 3, 1.0] and chain.num_segments == 3
    for k, t in enumerate(chain.knots):
        assert torch.equal(chain(t)["w"], bends[k]["w"])
    assert CurvePath(bends, "bezier").knots == [0.0, 1.0]
    with pytest.raises(ValueError, match="architecture"):
        CurvePath([bends[0], {"w": torch.zeros(4, 3)}])


def test_straight_curve_is_the_line():
    g = torch.Generator().manual_seed(1)
    a = {"w": torch.randn(5, 5, generator=g)}
    b = {"w": torch.randn(5, 5, generator=g)}
    ts = [0.0, 0.2, 0.5, 0.9, 1.0]
    line = linear(a, b).points(ts)["w"]
    for kind in ("bezier", "polychain"):
        for n in (3, 5):
            pts = CurvePath.straight(a, b, kind, n).points(ts)["w"]
            assert torch.allclose(pts, line, atol=1e-6), (kind, n)


# ---------------------------------------------------------------------------------------- fitting

def test_fitted_bezier_is_far_below_the_line(digits, mlp_ends):
    build, a, b = mlp_ends
    model = build()
    before = _state(model)
    curve = fit_curve(model, a, b, digits, "bezier", 3, epochs=15, lr=0.05, wd=1e-4, batch_size=64,
                      device="cpu", progress=False)
    assert isinstance(curve, CurvePath) and curve.name == "bezier"
    # the endpoints exactly, the model untouched
    assert all(torch.equal(curve(0.0)[k], a[k]) for k in curve.keys())
    assert all(torch.equal(curve(1.0)[k], b[k]) for k in curve.keys())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training
    # what was recorded
    info = curve.info
    assert len(info["train_loss"]) == len(info["regularizer"]) == len(info["lr"]) == 15
    assert info["settings"]["kind"] == "bezier" and info["settings"]["num_bends"] == 3
    assert info["lr"][0] == 0.05 and math.isclose(info["lr"][-1], 0.0005)  # flat, then down to 1%
    assert all(r > 0 for r in info["regularizer"]) and info["train_loss"][-1] < info["train_loss"][0]
    # the barrier
    line_eval = evaluate_path(model, linear(a, b), digits, num_points=21, progress=False)
    curve_eval = evaluate_path(model, curve, digits, num_points=21, progress=False)
    line_eps = line_eval.barriers["train_loss"]["epsilon"]
    assert line_eps > 0.1  # the straight line has a real barrier
    assert curve_eval.max_train_loss < 0.5 * line_eps
    assert curve_eval.barriers["train_loss"]["epsilon"] < 0.25 * line_eps
    assert curve_eval.metrics["train_loss"][0] == line_eval.metrics["train_loss"][0]  # same endpoint
    assert curve_eval.info["settings"]["kind"] == "bezier"
    # any point is a plain state dict of the model
    point = build()
    point.load_state_dict(curve.state_dict(0.5), strict=False)
    assert torch.equal(point.state_dict()["1.weight"], curve(0.5)["1.weight"])


def test_polychain_fits_and_its_knots_are_its_bends(digits, mlp_ends):
    build, a, b = mlp_ends
    chain = fit_curve(build(), a, b, digits, "polychain", 3, epochs=3, batch_size=128, device="cpu", progress=False)
    assert chain.knots == [0.0, 0.5, 1.0]
    assert all(torch.equal(chain(0.5)[k], chain.bends[1][k]) for k in chain.keys())
    assert not torch.equal(chain.bends[1]["1.weight"], linear(a, b)(0.5)["1.weight"])  # trained
    ev = evaluate_path(build(), chain, digits, num_points=5, progress=False)
    assert 0.5 in ev.ts and ev.segments[-1] == 1


def test_free_ends_adam_and_several_t_per_step(digits, mlp_ends):
    build, a, b = mlp_ends
    curve = fit_curve(build(), a, b, digits, "bezier", 4, epochs=2, fixed_ends=False, optimizer="adam", lr=1e-3,
                      t_per_step=3, batch_size=128, device="cpu", progress=False)
    assert curve.num_bends == 4 and curve.info["settings"]["t_per_step"] == 3
    assert not torch.equal(curve(0.0)["1.weight"], a["1.weight"])  # the endpoints moved
    assert all(torch.equal(curve(0.0)[k], curve.bends[0][k]) for k in curve.keys())
    with pytest.raises(ValueError, match="num_bends >= 3"):
        fit_curve(build(), a, b, digits, "bezier", 2, epochs=1, progress=False)
    with pytest.raises(ValueError, match="do not fit the model"):
        fit_curve(models.build("mlp", (64,), 10, hidden=(32,)), {"x": torch.zeros(1)}, {"x": torch.ones(1)},
                  digits, epochs=1, progress=False)
    partial = [{k: v for k, v in end.items() if k != "1.weight"} for end in (a, b)]
    with pytest.raises(KeyError, match=r"lack the model's parameters \['1.weight'\]"):
        fit_curve(build(), *partial, digits, epochs=1, progress=False)


@pytest.mark.parametrize("batchnorm, sampling", [(False, ("random", "uniform")), (True, ("random", "uniform")),
                                                 (False, ("golden", "bends"))],
                         ids=["mlp", "conv-batchnorm", "mlp-golden-bends"])
def test_several_t_per_step_split_the_batch_each_part_through_its_own_point(batchnorm, sampling):
    """t_per_step = 4: one vmapped call whose loss is each quarter of the batch through the curve's point at
    its own stratified t (BatchNorm: each quarter's own batch statistics), times that t's importance weight,
    plus the weighted weight decay, with the gradient of that."""
    torch.manual_seed(0)
    if batchnorm:
        x, y = torch.randn(32, 2, 6, 6), torch.randint(0, 5, (32,))
        def build():
            return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    else:
        x, y = torch.randn(32, 7), torch.randint(0, 5, (32,))
        def build():
            return nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 5))
    a, b, model = build().state_dict(), build().state_dict(), build()
    flat = FlatCurve(model, a, b, "bezier", 4, True, torch.device("cpu"))
    with torch.no_grad():
        flat.free.normal_(0, 0.3)
    mass = coefficients("bezier", 4, GRID_TIMES)[:, 1:3].sum(1)
    wd = 0.0 if batchnorm else 0.01
    step = CurveStep(model, flat, CurveTimes(4, *sampling, mass, torch.Generator().manual_seed(5)), wd)
    loss, sums = step.loss(x, y)
    (grad,) = torch.autograd.grad(loss, flat.free)

    t, w = CurveTimes(4, *sampling, mass, torch.Generator().manual_seed(5)).draw()
    assert all(j / 4 <= tj < (j + 1) / 4 for j, tj in enumerate(t)) if sampling[1] == "uniform" else t == sorted(t)
    assert (set(w) == {1.0}) == (sampling[1] == "uniform")
    curve = CurvePath(flat.bends(), "bezier")
    free = flat.free.detach().clone().requires_grad_(True)
    expected = 0.0
    for j, (xj, yj) in enumerate(zip(x.chunk(4), y.chunk(4))):
        point = curve(t[j])
        assert torch.allclose(flat.points([t[j]]), torch.cat([point[k].reshape(-1) for k in flat.names]), atol=1e-6)
        replica = build().train()
        replica.load_state_dict({**model.state_dict(), **point})
        expected += w[j] * nn.functional.cross_entropy(replica(xj), yj) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert sums["ce"].item() == pytest.approx(expected.item() * 32, rel=1e-6)
    # the gradient: the same loss computed one part at a time through flat.points, weight decay included
    flat.free = free
    phis = [flat.points([tj]) for tj in t]
    total = sum(w[j] * nn.functional.cross_entropy(torch.func.functional_call(
        model, (flat.params(phis[j]), step.buffers), (xj,)), yj) for j, (xj, yj) in
        enumerate(zip(x.chunk(4), y.chunk(4)))) / 4
    total = total + sum(0.5 * wd / 4 * w[j] * phis[j].square().sum() for j in range(4))
    (expected_grad,) = torch.autograd.grad(total, free)
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    assert sums["reg"].item() == pytest.approx(sum(0.5 * wd / 4 * w[j] * phis[j].square().sum().item()
                                                   for j in range(4)), rel=1e-5, abs=1e-12)


def test_scaled_initialisation_puts_bends_at_the_endpoints_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    a, b = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict(), model.state_dict()
    for fixed_ends in (True, False):
        flat = FlatCurve(model, a, b, "bezier", 5, fixed_ends, torch.device("cpu"), init="scaled")
        for k, bend in enumerate(flat.bends()[1:-1], 1):
            line = linear(a, b)(k / 4)
            for key in bend:
                want = torch.lerp(a[key].norm(), b[key].norm(), k / 4)
                assert bend[key].norm().item() == pytest.approx(want.item(), rel=1e-5)
                assert torch.allclose(bend[key] / bend[key].norm(), line[key] / line[key].norm(), atol=1e-6)
        assert all(torch.equal(flat.bends()[0][k], a[k]) for k in a)  # the ends are not rescaled
    with pytest.raises(ValueError, match="init must be one of line, scaled"):
        fit_curve(model, a, b, (torch.randn(8, 6), torch.randint(0, 3, (8,))), init="random", progress=False)


def test_t_per_step_is_at_most_the_batch_size(digits, mlp_ends):
    build, a, b = mlp_ends
    with pytest.raises(ValueError, match="t_per_step .* at most batch_size"):
        fit_curve(build(), a, b, digits, t_per_step=8, batch_size=4, epochs=1, progress=False)


# ---------------------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("sampling", [{"t_sequence": "random", "t_density": "uniform", "init": "line"}, {}],
                         ids=["reference", "defaults"])
def test_resume_continues_identically_and_a_finished_curve_is_loaded(tmp_path, digits, sampling):
    def build():
        return models.build("mlp", digits.input_shape, 10, hidden=(32,), dropout=0.2)  # dropout: RNG matters
    torch.manual_seed(0)
    a = _state(build())
    torch.manual_seed(1)
    b = _state(build())
    kw = dict(kind="bezier", num_bends=4, epochs=4, lr=0.05, wd=5e-4, batch_size=128, device="cpu", progress=False,
              **sampling)
    whole = fit_curve(build(), a, b, digits, checkpoint_path=tmp_path / "whole.pt", **kw)

    class Stop(Exception):
        pass

    def stop_after_two(epoch, record):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit_curve(build(), a, b, digits, checkpoint_path=tmp_path / "cut.pt", callback=stop_after_two, **kw)
    assert load_curve(tmp_path / "cut.pt").info["epochs_done"] == 2
    epochs_run = []
    resumed = fit_curve(build(), a, b, digits, checkpoint_path=tmp_path / "cut.pt",
                        callback=lambda e, r: epochs_run.append(e), **kw)
    assert epochs_run == [3, 4] and resumed.info["resumed_from"] == 2
    for w, r in zip(whole.bends, resumed.bends):
        assert all(torch.equal(w[k], r[k]) for k in w)
    assert resumed.info["train_loss"] == whole.info["train_loss"]

    # a finished curve is loaded, not retrained
    again = fit_curve(build(), a, b, digits, checkpoint_path=tmp_path / "whole.pt",
                      callback=lambda e, r: pytest.fail("retrained"), **kw)
    assert all(torch.equal(again.bends[1][k], whole.bends[1][k]) for k in a if k in again.bends[1])
    stored = load_curve(tmp_path / "whole.pt")
    assert stored.kind == "bezier" and stored.info["epochs_done"] == 4
    assert all(torch.equal(stored.bends[2][k], whole.bends[2][k]) for k in stored.bends[2])
    # another run's settings or endpoints are refused
    with pytest.raises(ValueError, match=r"different run \(lr 0.05 vs 0.1"):
        fit_curve(build(), a, b, digits, checkpoint_path=tmp_path / "whole.pt", **{**kw, "lr": 0.1})
    with pytest.raises(ValueError, match=r"different run \(endpoints '[0-9a-f]+' vs"):
        fit_curve(build(), b, a, digits, checkpoint_path=tmp_path / "whole.pt", **kw)


class _Poisonable:
    """Re-iterable batches whose inputs turn NaN once ``poisoned`` is set."""

    def __init__(self, x, y):
        self.x, self.y, self.poisoned = x, y, False

    def __iter__(self):
        x = torch.full_like(self.x, float("nan")) if self.poisoned else self.x
        return iter([(x[i:i + 256], self.y[i:i + 256]) for i in range(0, len(x), 256)])


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path, digits, mlp_ends):
    build, a, b = mlp_ends
    ckpt = tmp_path / "curve.pt"
    data = _Poisonable(digits.x_train, digits.y_train)

    def poison(epoch, record):
        data.poisoned = True

    with pytest.raises(NonFiniteLossError, match=r"epoch 2/3, batch 1 .*still holds the last finished epoch \(1\)"):
        fit_curve(build(), a, b, data, epochs=3, checkpoint_path=ckpt, device="cpu", progress=False, callback=poison)
    kept = load_curve(ckpt)
    assert kept.info["epochs_done"] == 1 and all(torch.isfinite(v).all() for v in kept.bends[1].values())


# ------------------------------------------------------------------------------------------ BatchNorm

def test_batchnorm_curve_reproduces_its_endpoints(digits):
    image = D.load("digits", image=True)

    def build():
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 64, 10))
    a = _trained(build, image, 0, 3)
    b = _trained(build, image, 1, 3)
    model = build()
    curve = fit_curve(model, a, b, image, epochs=2, batch_size=128, device="cpu", progress=False)
    ev = evaluate_path(model, curve, image, ts=[0.0, 0.5, 1.0], progress=False)
    x, y = image.x_train, image.y_train
    xt, yt = image.x_test, image.y_test
    for i, theta in ((0, a), (2, b)):
        # the same parameters with statistics recomputed as the evaluator does: identical numbers
        point = load_point(build(), theta, x[:2048])
        assert (ev.metrics["train_loss"][i], ev.metrics["train_error"][i]) == _profile_point(point, x, y, 2048)
        assert (ev.metrics["test_loss"][i], ev.metrics["test_error"][i]) == _profile_point(point, xt, yt, 2048)
    # an endpoint checkpoint whose statistics were recomputed on the same data is reproduced exactly
    endpoint = build()
    endpoint.load_state_dict(a)
    recompute_statistics(endpoint, x[:2048])
    checkpoint = _state(endpoint)
    ev2 = evaluate_path(model, fit_curve(model, checkpoint, b, image, epochs=1, batch_size=128, device="cpu",
                                         progress=False), image, ts=[0.0, 1.0], progress=False)
    restored = build()
    restored.load_state_dict(checkpoint)
    restored.eval()
    assert (ev2.metrics["train_loss"][0], ev2.metrics["train_error"][0]) == _profile_point(restored, x, y, 2048)
    assert (ev2.metrics["test_loss"][0], ev2.metrics["test_error"][0]) == _profile_point(restored, xt, yt, 2048)
    assert abs(ev2.metrics["train_loss"][0] - ev.metrics["train_loss"][0]) < 1e-12


def test_auto_lr_probe_is_deterministic_and_equals_the_chosen_fixed_lr():
    """lr="auto" picks a candidate by the probe; the training after it is bit for bit that of lr=<chosen>."""
    import torch

    from modeconn.paths.curve_fit import fit_curve
    from modeconn.paths.curve_lr import AUTO_CANDIDATES

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    a = {k: v.clone() for k, v in net.state_dict().items()}
    b = {k: v + 0.3 * torch.randn_like(v) for k, v in a.items()}
    data = (torch.randn(128, 4), torch.randint(0, 3, (128,)))
    kw = dict(epochs=2, batch_size=16, progress=False)
    p1, p2 = (fit_curve(net, a, b, data, lr="auto", **kw) for _ in range(2))
    chosen = p1.info["lr_probe"]["lr"]
    assert chosen in AUTO_CANDIDATES and p2.info["lr_probe"]["lr"] == chosen
    assert set(p1.info["lr_probe"]["scores"]) == {f"{c:g}" for c in AUTO_CANDIDATES}
    fixed = fit_curve(net, a, b, data, lr=chosen, **kw)
    assert fixed.info["lr_probe"] is None and fixed.info["lr"][0] == chosen
    assert all(torch.equal(u[k], v[k]) for u, v in zip(p1.bends, fixed.bends) for k in u)
    with pytest.raises(ValueError, match="lr must be a finite number > 0 or 'auto'"):
        fit_curve(net, a, b, data, lr="fast", **kw)
