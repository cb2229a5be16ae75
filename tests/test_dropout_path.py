"""Theorem 1 (Kuditipudi et al. 2019): dropout-stability paths on trained nets, with the bound checked.

Every net here is trained (full-batch Adam, with dropout so that it is reasonably dropout stable) on a
600-example subset of sklearn's digits. Each path is evaluated at 7 points per segment (knots included)
with ``evaluate_path``; the checks are those of the issue: rewiring and permutation segments have constant
loss, output-layer segments stay at or below the larger of their ends, the endpoints are exact, the
measured maximum is at most the bound.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from modeconn.models import build
from modeconn.params.path import float_state
from modeconn.paths.dropout import LABELS, dropout_path
from modeconn.kuditipudi.chain import Chain, UnsupportedArchitectureError
from modeconn.kuditipudi.edits import OUTPUT, PERMUTE, REWIRE
from modeconn.kuditipudi.lemma1 import dropout_state, lemma1
from modeconn.kuditipudi.lemma2 import lemma2
from modeconn.stability import dropout_stability
from modeconn.params.state import states_equal
from modeconn.units import infer
from nets import ResidualMLP, bn_mlp, folded_endpoints, N_ITEMS, mlp, profile_segments, trained_pair



def _conv_pool():
    return nn.Sequential(nn.Conv2d(1, 9, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(9, 7, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.2),
                         nn.Flatten(), nn.Linear(7 * 16, 10))


# ------------------------------------------------------------------------------------------ checks

def _check_path(path, model, data, theta_a, theta_b, points=7):
    """The issue's acceptance checks; returns (losses, segment of each point)."""
    info = path.info
    depth = info["hidden_layers"]
    n = path.num_segments
    assert path.labels is not None and len(path.labels) == n and set(path.labels) <= set(LABELS)
    assert n == info["num_segments"] == info["expected_segments"]
    assert n == (8 * depth - 1 if info["disjoint"] else 8 * depth + 2)
    assert (PERMUTE in path.labels) == (not info["disjoint"])

    # endpoints: exactly theta_a and theta_b
    start, end = path(0.0), path(1.0)
    assert start.keys() == theta_a.keys() == end.keys()
    assert all(torch.equal(start[k], theta_a[k]) for k in start)
    assert all(torch.equal(end[k], theta_b[k]) for k in end)

    ev, loss, seg = profile_segments(model, path, data, points)
    scale = max(1.0, float(loss.max()))

    # the bound, from both endpoints' stability, on the same data
    assert path.bound == pytest.approx(max(info["loss_a"], info["loss_b"]) + max(info["epsilon_a"], info["epsilon_b"]),
                                       abs=1e-12)
    assert info["epsilon"] == max(info["epsilon_a"], info["epsilon_b"]) >= 0
    assert loss[0] == pytest.approx(info["loss_a"], abs=1e-6)
    assert loss[-1] == pytest.approx(info["loss_b"], abs=1e-6)
    assert loss.max() <= path.bound + 1e-5
    assert ev.bound == path.bound and ev.within_bound
    (whole,) = path.certificate.bounds  # one exact bound over the whole path, with its terms
    assert whole.exact and (whole.first, whole.last) == (0, n) and whole.value == path.bound
    assert whole.terms == {"L(theta_a)": info["loss_a"], "L(theta_b)": info["loss_b"],
                           "epsilon_a": info["epsilon_a"], "epsilon_b": info["epsilon_b"]}

    # Lemma 1 passes through every theta_k: each L(theta_A,k) is the loss at one of its knots (same for B)
    knot_loss = [float(loss[seg.index(i)]) for i in range(n)] + [float(loss[-1])]
    lemma1_knots = 4 * depth - 1
    for side, knots in (("a", knot_loss[:lemma1_knots]), ("b", knot_loss[-lemma1_knots:])):
        assert len(info[f"losses_{side}"]) == depth
        for lk in info[f"losses_{side}"]:
            assert min(abs(lk - v) for v in knots) <= 1e-5 * scale, (side, lk, knots)
    return loss, seg


# ------------------------------------------------------------------------------------------ paths

@pytest.mark.parametrize("hidden", [(33,), (32, 21), (24, 17, 31)], ids=["D1", "D2", "D3"])
def test_mlp_dropout_path(flat, hidden):
    a, b = trained_pair(("mlp", hidden), mlp(hidden), flat)
    theta_a, theta_b = float_state(a.state_dict()), float_state(b.state_dict())
    path = dropout_path(a, theta_a, theta_b, flat)
    assert path.name == "dropout" and path.model is None and not path.info["folded_batchnorm"]
    info = path.info
    assert info["sizes"] == list(hidden)
    assert info["kept_sizes_a"] == info["kept_sizes_b"] == [h // 2 for h in hidden]
    assert info["r_a"] == info["r_b"] == [2.0] * len(hidden)
    assert info["segments"]["lemma1_a"] == info["segments"]["lemma1_b"] == 4 * len(hidden) - 2
    _check_path(path, a, flat, theta_a, theta_b)


@pytest.mark.slow  # a conv net's construction: about 5 s or more
def test_convnet_dropout_path(images):
    make = lambda: build("convnet", (1, 8, 8), 10, width=8, channel_dropout=0.2)  # noqa: E731
    a, b = trained_pair("convnet", make, images, steps=100)
    theta_a, theta_b = float_state(a.state_dict()), float_state(b.state_dict())
    path = dropout_path(a, theta_a, theta_b, images)
    assert path.info["hidden_layers"] == 3 and path.info["kept_sizes_a"] == [4, 4, 4]
    _check_path(path, a, images, theta_a, theta_b)


@pytest.mark.slow  # a conv net's construction: about 5 s or more
def test_conv_pool_flatten_sequential_with_bias(images):
    a, b = trained_pair("convpool", _conv_pool, images, steps=100)
    theta_a, theta_b = float_state(a.state_dict()), float_state(b.state_dict())
    path = dropout_path(a, theta_a, theta_b, images, trials=10)
    assert path.info["sizes"] == [9, 7] and path.info["kept_sizes_a"] == [4, 3]
    _check_path(path, a, images, theta_a, theta_b)


def test_batchnorm_is_folded_first(flat):
    a, b = trained_pair("bn", bn_mlp, flat)
    path = dropout_path(a, a.state_dict(), b.state_dict(), flat, trials=10)
    folded_a, folded_b = folded_endpoints(path, a, b, flat[0])
    _check_path(path, a, flat, folded_a, folded_b)


def test_disjoint_kept_sets_give_8D_minus_1_segments(flat):
    hidden = (32, 21)
    a, b = trained_pair(("mlp", hidden), mlp(hidden), flat)
    kept_a = [list(range(h // 2)) for h in hidden]
    kept_b = [list(range(h // 2, 2 * (h // 2))) for h in hidden]
    theta_a, theta_b = float_state(a.state_dict()), float_state(b.state_dict())
    path = dropout_path(a, theta_a, theta_b, flat, kept_a=kept_a, kept_b=kept_b)
    assert path.info["disjoint"] and path.info["kept_a"] == kept_a and path.info["kept_b"] == kept_b
    assert path.num_segments == 8 * len(hidden) - 1 and PERMUTE not in path.labels
    _check_path(path, a, flat, theta_a, theta_b)


# ------------------------------------------------------------------------------------------ stability

def test_dropout_stability(flat):
    hidden = (32, 21)
    a, _ = trained_pair(("mlp", hidden), mlp(hidden), flat)
    st = dropout_stability(a, a.state_dict(), flat, trials=8, seed=3)
    again = dropout_stability(a, a.state_dict(), flat, trials=8, seed=3)
    assert st.kept == again.kept and st.losses == again.losses  # deterministic
    assert st.kept_sizes == [16, 10] and all(k == sorted(set(k)) for k in st.kept)
    assert st.r == [2.0, 2.0] and len(st.losses) == 2 and len(st.trial_scores) == 8
    assert st.trial_scores[st.best_trial] == min(st.trial_scores) == max(st.losses)
    assert st.gap == pytest.approx(max(st.losses) - st.loss) and st.epsilon == max(0.0, st.gap)
    assert st.num_items == N_ITEMS and not st.folded_batchnorm
    # L(theta) is the plain eval-mode cross-entropy
    with torch.no_grad():
        assert st.loss == pytest.approx(F.cross_entropy(a(flat[0]), flat[1]).item(), abs=1e-6)
    # given kept sets are scored, not searched
    fixed = dropout_stability(a, None, flat, kept=st.kept)
    assert fixed.kept == st.kept and fixed.losses == pytest.approx(st.losses, abs=1e-9) and fixed.best_trial is None
    # a tuned r never does worse than r = 1/keep
    tuned = dropout_stability(a, a.state_dict(), flat, kept=st.kept, r="tune")
    assert max(tuned.losses) <= max(st.losses) + 1e-12 and len(tuned.r) == 2
    with pytest.raises(ValueError, match="r"):
        dropout_stability(a, a.state_dict(), flat, r=[2.0])
    with pytest.raises(ValueError, match="trials"):
        dropout_stability(a, a.state_dict(), flat, trials=0)


# ------------------------------------------------------------------------------------------ lemmas

def _logits(model, state, x):
    with torch.no_grad():
        return functional_call(model, state, (x,))


def test_lemmas_on_index_sets(flat):
    """Lemma 1 ends in canonical theta_1; Lemma 2 reusable with and without the permutation, and Lemma 4's
    general five-segment permutation (slots chosen so that every target slot is occupied) keeps the
    function."""
    hidden = (24, 17, 31)
    a, b = trained_pair(("mlp", hidden), mlp(hidden), flat)
    x = flat[0]
    chain = Chain.from_spec(infer(a, x[:2]))
    assert chain.depth == 3 and chain.sizes == hidden
    theta_a, theta_b = float_state(a.state_dict()), float_state(b.state_dict())
    S = [torch.arange(h // 2) for h in hidden]
    Sp = [torch.arange(h // 2, 2 * (h // 2)) for h in hidden]
    states_a, labels_a = lemma1(chain, theta_a, S, 2.0)
    states_b, _ = lemma1(chain, theta_b, Sp, 2.0)
    assert len(labels_a) == 4 * 3 - 2 and all(states_a[0][k] is theta_a[k] for k in theta_a)
    assert states_equal(states_a[-1], dropout_state(chain, theta_a, S, 2.0, k=1))
    masked = dropout_state(chain, theta_a, S, 2.0, 1, canonical=False)
    torch.testing.assert_close(_logits(a, states_a[-1], x), _logits(a, masked, x))
    a1, b1 = states_a[-1], states_b[-1]

    # without the permutation: theta_B,1's subnetwork sits at the slots (here its own units: disjoint sets)
    states, labels = lemma2(chain, a1, S, b1, Sp, permute=False)
    assert labels == [REWIRE, OUTPUT, REWIRE] and states_equal(states[-1], b1)

    # slots rolled by one: every unit must move onto an occupied slot -> all five segments of Lemma 4
    slots = [torch.roll(s, 1) for s in Sp]
    states, labels = lemma2(chain, a1, S, b1, Sp, slots=slots)
    assert labels == [REWIRE, OUTPUT, REWIRE] + [PERMUTE] * 5
    assert states_equal(states[-1], b1)
    for i, label in enumerate(labels):
        if label == OUTPUT:
            continue
        ends = _logits(a, states[i], x)
        for s in (0.3, 0.5, 1.0):
            mid = {k: torch.lerp(states[i][k], states[i + 1][k], s) for k in states[i]}
            torch.testing.assert_close(_logits(a, mid, x), ends, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="kept units of"):
        lemma2(chain, theta_a, S, b1, Sp)  # theta_a itself is not half-zero




def test_unsupported_models_and_options(flat):
    model = ResidualMLP()
    with pytest.raises(UnsupportedArchitectureError, match="residual"):
        dropout_path(model, model.state_dict(), model.state_dict(), flat, trials=1)
    res = build("preresnet20", (1, 8, 8), 10)  # pre-activation BN: the chain check comes first
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(UnsupportedArchitectureError, match="residual"):
        dropout_path(res, res.state_dict(), res.state_dict(), (x, torch.zeros(4, dtype=torch.long)), trials=1)
    mlp = build("mlp", (64,), 10, hidden=(8,))
    with pytest.raises(ValueError, match="keep"):
        dropout_path(mlp, mlp.state_dict(), mlp.state_dict(), flat, keep=0.75)
