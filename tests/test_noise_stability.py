"""Noise stability (Kuditipudi et al. 2019, Defs. 2-4) and Algorithm 1, on cases with known answers."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeconn import models
from modeconn.kuditipudi.chain import Chain
from modeconn.kuditipudi.layer_graph import LayerGraph
from modeconn.stability import (
    NoiseStability,
    NotAChainError,
    apply_dropout,
    noise_stability,
    operator_frobenius_norm,
    random_dropout,
    spectral_norms,
)
from modeconn.units import infer

FAST = dict(power_iters=60, ts=(0.5, 1.0))


def _orthogonal(h, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(h, h, generator=g))
    return q


def _mlp(sizes, bias=True, seed=0):
    torch.manual_seed(seed)
    layers = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[k], sizes[k + 1], bias=bias))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _jac(f, x):
    """Dense Jacobian of f at one example x (flattened)."""
    j = torch.func.jacrev(f)(x)
    return j.reshape(f(x).numel(), x.numel())


# ====================================================================== Algorithm 1

def test_random_dropout_wide_layer_fraction_and_exact_scaling():
    model = _mlp([10, 4000, 3])
    spec = infer(model, torch.randn(2, 10))
    theta = model.state_dict()
    p = 0.3
    hat, dropped = random_dropout(spec, theta, p, torch.Generator().manual_seed(1))
    idx = dropped["0"]
    assert idx.dtype == torch.long and torch.equal(idx, idx.sort().values)
    assert abs(len(idx) / 4000 - p) < 0.03
    kept = torch.ones(4000, dtype=torch.bool)
    kept[idx] = False
    w, wh = theta["2.weight"], hat["2.weight"]
    assert torch.all(wh[:, idx] == 0)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float64).to(w.dtype)
    assert torch.equal(wh[:, kept], w[:, kept] * scale)
    # producers (rows, biases), the input layer and the output rows are not touched
    for k in ("0.weight", "0.bias", "2.bias"):
        assert hat[k] is theta[k]
    # deterministic given the generator; p = 0 is the identity
    hat2, dropped2 = random_dropout(spec, theta, p, torch.Generator().manual_seed(1))
    assert torch.equal(dropped2["0"], idx) and torch.equal(hat2["2.weight"], wh)
    hat0, d0 = random_dropout(spec, theta, 0.0, torch.Generator().manual_seed(1))
    assert len(d0["0"]) == 0 and torch.equal(hat0["2.weight"], w)
    with pytest.raises(ValueError):
        random_dropout(spec, theta, 1.0)


def test_random_dropout_conv_blocks_and_model_argument():
    torch.manual_seed(0)
    model = models.build("convnet", (1, 3, 3), 5, width=6, depth=2)  # conv, relu, conv, relu, flatten, linear
    x = torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError):
        random_dropout(model, None, 0.5)
    hat, dropped = random_dropout(model, None, 0.5, torch.Generator().manual_seed(3), example_input=x)
    theta = model.state_dict()
    assert set(dropped) == {"0", "2"}
    s = 2.0
    d0, d1 = dropped["0"], dropped["2"]
    assert len(d0) + len(d1) > 0
    k0 = torch.tensor([u for u in range(6) if u not in d0.tolist()], dtype=torch.long)
    assert torch.all(hat["2.weight"][:, d0] == 0)
    assert torch.equal(hat["2.weight"][:, k0], theta["2.weight"][:, k0] * s)
    lin, lin_hat = theta["5.weight"], hat["5.weight"]  # columns: 9 per channel of the last conv
    for u in range(6):
        block = slice(9 * u, 9 * (u + 1))
        expect = torch.zeros_like(lin[:, block]) if u in d1.tolist() else lin[:, block] * s
        assert torch.equal(lin_hat[:, block], expect)
    assert torch.equal(hat["0.weight"], theta["0.weight"])  # input columns never dropped
    # index form and mask form of apply_dropout agree
    spec = infer(model, x)
    by_mask = apply_dropout(spec, theta, {"0": torch.isin(torch.arange(6), d0)}, 0.5)
    by_index = apply_dropout(spec, theta, {"0": d0}, 0.5)
    assert torch.equal(by_mask["2.weight"], by_index["2.weight"])


# ====================================================================== single measurements

@pytest.mark.parametrize("kw", [
    dict(padding=0), dict(padding=1), dict(padding=2, stride=2), dict(padding=1, dilation=2),
    dict(padding="same"), dict(padding=1, groups=2), dict(padding=(0, 1), stride=(1, 2)),
])
def test_conv_operator_frobenius_norm_is_exact(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, bias=False, **kw)
    x = torch.randn(4, 5, 6)
    a = _jac(lambda z: conv(z[None])[0], x)
    assert torch.allclose(operator_frobenius_norm(conv, x.shape), a.norm(), rtol=1e-5)
    lin = nn.Linear(5, 3)
    assert torch.allclose(operator_frobenius_norm(lin), lin.weight.norm())


def test_conv1d_operator_frobenius_norm_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 4, padding=2, stride=3, bias=False)
    x = torch.randn(2, 11)
    a = _jac(lambda z: conv(z[None])[0], x)
    assert torch.allclose(operator_frobenius_norm(conv, x.shape), a.norm(), rtol=1e-5)


def test_spectral_norms_match_dense_jacobian():
    torch.manual_seed(0)
    net = _mlp([5, 7, 6, 4])
    x = torch.randn(8, 5)
    sigma = spectral_norms(net, x, iters=300, generator=torch.Generator().manual_seed(0))
    dense = torch.stack([torch.linalg.matrix_norm(_jac(lambda z: net(z[None])[0], xi), 2) for xi in x])
    assert torch.allclose(sigma, dense, rtol=1e-4)


# ====================================================================== the full measurement

def test_scaled_orthogonal_layers():
    h, s1, s2 = 16, 3.0, 0.5
    net = nn.Sequential(nn.Linear(h, h, bias=False), nn.ReLU(), nn.Linear(h, h, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(s1 * _orthogonal(h, 0))
        net[2].weight.copy_(s2 * _orthogonal(h, 1))
    x = torch.randn(32, h)
    r = noise_stability(net, None, (x, torch.zeros(32, dtype=torch.long)), **FAST)
    assert r.d == 2 and r.h_min == h and r.widths == [h] and r.layers == ["0", "2"]
    for i in range(2):  # ||sQz|| / (s sqrt(h) ||z||) = 1/sqrt(h) for every input
        np.testing.assert_allclose(r.cushion[i], 1 / math.sqrt(h), rtol=1e-5)
    # J^{1,2} = s2 Q2 diag(x^1 > 0): ||J x^1|| = s2 ||phi(x^1)||, ||J|| = s2
    x1 = net[0](x).detach()
    expect = (F.relu(x1).norm(dim=1) / x1.norm(dim=1)).double().numpy()
    np.testing.assert_allclose(r.interlayer["1,2"], expect, rtol=1e-4)
    np.testing.assert_allclose(r.contraction[0], 1 / expect, rtol=1e-4)
    assert r.contraction[1] is None and r.smoothness == [None, None]


def test_single_orthogonal_map_has_interlayer_cushion_one_and_unit_contraction():
    h = 12
    perm = torch.eye(h)[torch.randperm(h, generator=torch.Generator().manual_seed(0))]
    net = nn.Sequential(nn.Linear(h, h, bias=False), nn.ReLU(), nn.Linear(h, h, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(2.0 * perm)          # positive inputs stay positive: ReLU is the identity
        net[2].weight.copy_(0.7 * _orthogonal(h, 2))
    x = torch.rand(20, h) + 0.1
    r = noise_stability(net, None, (x, torch.zeros(20, dtype=torch.long)), **FAST)
    np.testing.assert_allclose(r.interlayer["1,2"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(r.interlayer_min[0], 1.0, rtol=1e-5)
    np.testing.assert_allclose(r.contraction[0], 1.0, rtol=1e-6)
    assert r.c == pytest.approx(1.0, rel=1e-6)


def test_known_activation_contraction_sqrt2():
    net = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0]]))
    x = torch.tensor([[1.0], [-2.0], [0.5]])
    r = noise_stability(net, None, (x, torch.zeros(3, dtype=torch.long)), **FAST)
    np.testing.assert_allclose(r.contraction[0], math.sqrt(2), rtol=1e-6)
    assert r.c == pytest.approx(math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_network_that_is_linear_on_the_data(bias):
    """Positive weights, biases and inputs: every pre-activation is positive, ReLU acts as the identity,
    so each M^{i,j} is affine: smoothness remainder ~0 (rho huge), contraction 1, and the interlayer
    cushion is that of the matrix product."""
    net = _mlp([6, 9, 8, 7, 3], bias=bias, seed=1)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.abs_()
                if m.bias is not None:
                    m.bias.abs_()
    x = torch.rand(24, 6) + 0.1
    r = noise_stability(net, None, (x, torch.zeros(24, dtype=torch.long)), power_iters=200, ts=(0.5, 1.0), p=0.5)
    assert r.d == 4 and r.smoothness[0] is None and r.smoothness[3] is None
    for i in (1, 2):
        assert np.all(r.smoothness[i] > 1e3)
    assert r.rho > 1e3 and r.conditions["smoothness"]["holds"]
    for i in range(3):
        np.testing.assert_allclose(r.contraction[i], 1.0, rtol=1e-6)
    ws = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    x2 = net[:3](x).detach()  # pre-activation of layer 2
    a = ws[3] @ ws[2]  # J^{2,4}
    expect = ((x2 @ a.T).norm(dim=1) / (torch.linalg.matrix_norm(a, 2) * x2.norm(dim=1))).double().numpy()
    np.testing.assert_allclose(r.interlayer["2,4"], expect, rtol=1e-3)


def test_interlayer_cushion_and_epsilon_against_dense_computation():
    net = _mlp([5, 7, 6, 4], seed=3)
    x = torch.randn(10, 5)
    r = noise_stability(net, None, (x, torch.zeros(10, dtype=torch.long)), power_iters=300, ts=(1.0,))
    l1, l2, l3 = net[0], net[2], net[4]
    for prm in net.parameters():
        prm.requires_grad_(False)
    x1, x2 = l1(x), net[:3](x)

    def m13(z):
        return l3(F.relu(l2(F.relu(z))))

    for name, xi, f in (("1,3", x1, m13), ("2,3", x2, lambda z: l3(F.relu(z)))):
        vals = []
        for z in xi:
            j = _jac(lambda u: f(u[None])[0], z)
            vals.append(((j @ z).norm() / (torch.linalg.matrix_norm(j, 2) * z.norm())).item())
        np.testing.assert_allclose(r.interlayer[name], vals, rtol=1e-3)
    np.testing.assert_allclose(r.interlayer_min[0], np.fmin(1, np.minimum(r.interlayer["1,2"], r.interlayer["1,3"])))
    # layer cushion of layer 2 by hand: ||W2 relu(x1)|| / (||W2||_F ||relu(x1)||)
    z = F.relu(x1)
    expect = ((z @ l2.weight.T).norm(dim=1) / (l2.weight.norm() * z.norm(dim=1))).detach().double().numpy()
    np.testing.assert_allclose(r.cushion[1], expect, rtol=1e-5)
    # epsilon of Definition 4 from its ingredients
    assert r.d == 3 and r.h_min == 6
    mu = [r.cushion[i].min() for i in range(3)]
    mua = [r.interlayer_min[i].min() for i in range(3)]
    c = max(r.contraction[0].max(), r.contraction[1].max())
    fmax = net(x).norm(dim=1).max().item()
    eps = math.sqrt(2) * c * 3 ** 1.5 * fmax / (math.sqrt(6) * min(mu[1] * mua[1], mu[2] * mua[2]))
    assert r.epsilon == pytest.approx(eps, rel=1e-5) and r.c == pytest.approx(c)
    assert r.max_output_norm == pytest.approx(fmax, rel=1e-6)
    assert r.conditions["smoothness"]["required"] == 9
    assert isinstance(r.conditions["no_dominant_unit"]["holds"], bool)


def test_smoothness_and_dominance_against_brute_force():
    """d = 4 MLP with biases, by hand. Weights on the segment: W_k(t) = W_k + t (W_hat_k - W_k). For layer
    i >= 2 the perturbed pre-activations are x_hat_i (every layer on the segment) and x_hat_{i-1} (A_i
    itself at theta); rho_i(x) = min over j > i, t, both variants of ||dx|| ||x^j|| / (||x^i|| ||r||),
    r = M^{i,j}(x_hat) - x^j - J dx, with J dx propagated through the ReLU masks of the unperturbed net."""
    net = _mlp([4, 8, 8, 8, 3], seed=5)
    x = torch.randn(16, 4)
    ts, p, seed, n = (0.5, 1.0), 0.5, 7, 16
    r = noise_stability(net, None, (x, torch.zeros(n, dtype=torch.long)), p=p, ts=ts, seed=seed, power_iters=5)
    spec = infer(net, x[:2])
    hat, dropped = random_dropout(spec, net.state_dict(), p, torch.Generator().manual_seed(seed))
    assert r.info["dropped_fraction"][0]["0"] == len(dropped["0"]) / 8
    lin = [m for m in net if isinstance(m, nn.Linear)]
    W = [m.weight.detach() for m in lin]
    b = [m.bias.detach() for m in lin]
    W_hat = [hat[f"{2 * k}.weight"] for k in range(4)]
    d = 4

    def forward(weights, z0):
        xs, z = [], z0
        for k in range(d):
            xs.append(z @ weights[k].T + b[k])
            z = F.relu(xs[-1])
        return xs

    def m(i, j, z):  # M^{i,j} at theta
        for k in range(i + 1, j + 1):
            z = F.relu(z) @ W[k].T + b[k]
        return z

    def jvp(i, j, dz, xs):
        for k in range(i + 1, j + 1):
            dz = (dz * (xs[k - 1] > 0)) @ W[k].T
        return dz

    def kappa(v):  # sqrt(h) ||phi||_inf / ||phi||, max over points with phi != 0
        phi = F.relu(v)
        ratio = math.sqrt(8) * phi.amax(1) / phi.norm(dim=1)
        return ratio[~ratio.isnan()].max().item()

    with torch.no_grad():
        xs = forward(W, x)
        best = [torch.full((n,), math.inf) for _ in range(d)]
        dom = [kappa(v) for v in xs[:3]]
        for t in ts:
            wt = [W[k] + t * (W_hat[k] - W[k]) for k in range(d)]
            xh = forward(wt, x)
            for i in range(3):
                dom[i] = max(dom[i], kappa(xh[i]))
            for i in (1, 2):
                prev = F.relu(xh[i - 1]) @ W[i].T + b[i]
                for v in (xh[i], prev):
                    dx = v - xs[i]
                    for j in range(i + 1, d):
                        rem = (m(i, j, v) - xs[j] - jvp(i, j, dx, xs)).norm(dim=1)
                        rho = dx.norm(dim=1) * xs[j].norm(dim=1) / (xs[i].norm(dim=1) * rem)
                        best[i] = torch.fmin(best[i], torch.where(rem > 0, rho, torch.full_like(rho, math.inf)))
    assert torch.isfinite(best[2]).all()
    assert not torch.allclose(best[2], best[2].new_full((n,), 0))
    for i in (1, 2):
        np.testing.assert_allclose(r.smoothness[i], best[i].double().numpy(), rtol=1e-4)
    assert r.rho == pytest.approx(min(float(best[1].min()), float(best[2].min())), rel=1e-4)
    assert r.conditions["smoothness"]["holds"] == (r.rho >= 12)
    np.testing.assert_allclose(r.dominance, dom, rtol=1e-5)
    np.testing.assert_allclose(r.dominance_entry, r.dominance, rtol=1e-6)  # dense layers: unit = entry


def test_conv_layer_cushion_against_dense_unrolled_operator():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    x = torch.randn(6, 2, 8, 8)
    r = noise_stability(net, None, (x, torch.zeros(6, dtype=torch.long)), power_iters=20, ts=(1.0,))
    assert r.kinds == ["Conv2d", "Conv2d", "Linear"] and r.widths == [3, 4]
    c1, c2 = net[0], net[2]
    with torch.no_grad():
        z2 = F.relu(c1(x))
    for conv, z, got in ((c1, x, r.cushion[0]), (c2, z2, r.cushion[1])):
        a = _jac(lambda u: F.conv2d(u[None], conv.weight, None, conv.stride, conv.padding)[0], z[0])
        expect = [((a @ zi.reshape(-1)).norm() / (a.norm() * zi.norm())).item() for zi in z]
        np.testing.assert_allclose(got, expect, rtol=1e-5)
    # no-dominant-unit uses channel blocks: sqrt(C) * max_c ||phi_c|| / ||phi|| (t = 0 included)
    phi = F.relu(c1(x)).detach()
    at0 = (math.sqrt(3) * phi.flatten(2).norm(dim=2).amax(1) / phi.flatten(1).norm(dim=1)).max().item()
    assert r.dominance[0] >= at0 - 1e-6 and r.dominance[0] <= math.sqrt(3) + 1e-6


def test_layer_graph_downstream_reproduces_the_model():
    torch.manual_seed(0)
    net = models.build("mlp", (8,), 3, hidden=(5, 6))
    x = torch.randn(4, 8)
    gm = torch.fx.symbolic_trace(net)
    chain = LayerGraph(gm, Chain.from_spec(infer(gm, x)))
    env = chain.run(x)
    xs = [env[n] for n in chain.layer_nodes]
    out = chain.downstream(env, 0, [1, 2])(xs[0])
    assert torch.allclose(out[0], xs[1]) and torch.allclose(out[1], net(x))
    (m13,) = chain.downstream(env, 0, [2])(2 * xs[0])
    assert torch.allclose(m13, net[5](F.relu(net[3](F.relu(2 * xs[0])))))


def test_batchnorm_is_folded_and_residual_models_are_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(12, 1, 4, 4)
    net.train()
    net(x)  # non-trivial running statistics
    net.eval()
    r = noise_stability(net, None, (x, torch.zeros(12, dtype=torch.long)), power_iters=5, ts=(1.0,))
    assert r.settings["folded_batchnorm"] and r.d == 3 and r.widths == [4, 6]
    assert r.layers == ["0", "4", "7"] and r.activations == ["ReLU", "ReLU"]
    # layer 2's input is the flattened ReLU of the folded conv, i.e. of the eval-mode BN output
    z = F.relu(net[1](net[0](x))).flatten(1).detach()
    w = net[4].weight * (net[5].weight / (net[5].running_var + net[5].eps).sqrt())[:, None]
    expect = ((z @ w.T).norm(dim=1) / (w.norm() * z.norm(dim=1))).detach().double().numpy()
    np.testing.assert_allclose(r.cushion[1], expect, rtol=1e-4)
    assert isinstance(net[2], nn.ReLU) and net[2].inplace  # the caller's model is not modified

    res = models.build("preresnet", (1, 8, 8), 3, depth=20, width=0.25)
    with pytest.raises(NotAChainError, match="residual"):
        noise_stability(res, None, (torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)))


def test_json_round_trip_and_histogram_figure(tmp_path):
    from modeconn.reporting.plots_stability import plot_noise_stability

    net = _mlp([6, 8, 8, 3], seed=2)
    x = torch.randn(12, 6)
    r = noise_stability(net, None, (x, torch.zeros(12, dtype=torch.long)), power_iters=10, ts=(1.0,), draws=3)
    assert r.smoothness[1].shape == (36,) and len(r.rho_draws) == 3
    assert r.rho == sorted(r.rho_draws)[1]
    s = r.summaries()
    assert s["cushion"]["min"][0] == pytest.approx(r.mu[0]) and s["contraction"]["median"][2] is None
    path = r.save_json(tmp_path / "ns.json")
    back = NoiseStability.load(path)
    assert back.epsilon == pytest.approx(r.epsilon) and back.d == 3
    for i in range(3):
        np.testing.assert_allclose(back.cushion[i], r.cushion[i])
    assert back.smoothness[0] is None and back.contraction[2] is None
    np.testing.assert_allclose(back.interlayer["1,3"], r.interlayer["1,3"])
    out = plot_noise_stability(back, tmp_path / "fig" / "ns.png")
    assert out.exists() and out.stat().st_size > 1000
    assert not list((tmp_path / "fig").glob("*.tmp*"))


def test_a_point_with_a_dead_hidden_layer_makes_the_contraction_infinite():
    # 4 -> 6 -> 5 -> 3, bias-free ReLU. W1 >= 0 entrywise, so an all-negative input has x^1 < 0 in every unit:
    # phi(x^1) = 0 (ratio inf) and x^2 = W2 phi(x^1) = 0 (ratio 0/0). c is then infinite, not the other
    # points' finite maximum.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.ReLU(),
                        nn.Linear(5, 3, bias=False))
    with torch.no_grad():
        net[0].weight.abs_()
    x = torch.rand(8, 4) + 0.1
    x[5] = -torch.tensor([1.0, 2.0, 0.5, 1.5])
    y = torch.zeros(8, dtype=torch.long)
    dead = noise_stability(net, None, (x, y), **FAST)
    assert math.isinf(dead.c) and dead.c > 0 and math.isinf(dead.epsilon)
    cond = dead.conditions["activation_contraction"]
    assert cond["holds"] is False and cond["infinite_points"] == [5] and cond["infinite_layers"] == {"5": [1]}
    assert math.isinf(dead.contraction_max[5]) and np.isnan(dead.contraction[1][5])
    # the same net without that point: finite c, the condition holds and names no point
    alive = noise_stability(net, None, (x[torch.arange(8) != 5], y[:7]), **FAST)
    assert math.isfinite(alive.c) and math.isfinite(alive.epsilon)
    assert alive.conditions["activation_contraction"] == {**alive.conditions["activation_contraction"],
                                                          "holds": True, "infinite_points": []}
    # and the JSON round trip keeps the infinity
    back = NoiseStability.from_dict(dead.to_dict())
    assert math.isinf(back.c) and back.conditions["activation_contraction"]["infinite_points"] == [5]
