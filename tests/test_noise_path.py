"""Theorems 2 and 3 (Kuditipudi et al. 2019): noise-stability and narrow-network paths on trained nets.

Every net is trained (full-batch Adam, with dropout) on a 600-example subset of sklearn's digits. Each path
is evaluated at 5 points per segment (knots included) with ``evaluate_path``; the checks are those of the
issue: the endpoints are exact, rewiring and permutation segments have constant loss, output-layer
segments stay at or below the larger of their ends, each Lemma 2 part stays below its exact bound, and the
dropout copies are Algorithm 1 copies with at least the required units dropped in every layer.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from modeconn.params.batchnorm import has_batchnorm
from modeconn.models import build
from modeconn.params.path import float_state
from modeconn.kuditipudi.chain import Chain, UnsupportedArchitectureError
from modeconn.kuditipudi.edits import PERMUTE
from modeconn.kuditipudi.narrow import narrow_widths
from modeconn.paths import narrow_path, noise_path
from modeconn.paths.noise import DROPOUT, LABELS
from modeconn.stability import apply_dropout, dropout_masks
from modeconn.training.train import TrainConfig
from modeconn.units import infer, unit_slices
from nets import ResidualMLP, bn_mlp, folded_endpoints, mlp, profile_segments, trained_pair

QUICK = {"epochs": 4, "batch_size": 64, "lr": 0.05, "schedule": "cosine"}  # theta*'s trainer in the tests


def _conv():
    return build("convnet", (1, 8, 8), 10, width=8, channel_dropout=0.2)


def _states(a, b):
    return float_state(a.state_dict()), float_state(b.state_dict())


# ------------------------------------------------------------------------------------------ checks

def _check_path(path, model, data, theta_a, theta_b, points=5):
    """The issue's acceptance checks; returns (losses, segment of each point)."""
    info = path.info
    n = path.num_segments
    assert path.bound is None
    assert path.labels is not None and len(path.labels) == n and set(path.labels) <= set(LABELS)
    assert n == info["num_segments"] == info["expected_segments"]
    assert path.labels[0] == path.labels[-1] == DROPOUT and path.labels.count(DROPOUT) == 2
    # Lemma 2 ends in theta_B,1's kept subnetwork; its last (constant-loss) segment ends at theta_B,1 itself
    ends = info["lemma2_end"] if isinstance(info["lemma2_end"], list) else [info["lemma2_end"]]
    assert ends[-1] == "merged" and "extra segment" not in ends

    # endpoints: exactly theta_a and theta_b
    start, end = path(0.0), path(1.0)
    assert start.keys() == theta_a.keys() == end.keys()
    assert all(torch.equal(start[k], theta_a[k]) for k in start)
    assert all(torch.equal(end[k], theta_b[k]) for k in end)

    # the second and second-to-last waypoints are Algorithm 1 copies, with enough units dropped
    chain = Chain.from_spec(infer(path.model if path.model is not None else model, data[0][:2]))
    need = info.get("required_dropped", info.get("widths"))
    for side, wp in (("a", path.waypoints[1]), ("b", path.waypoints[-2])):
        draw = info[f"dropout_{side}"]
        assert all(c >= k for c, k in zip(draw["dropped_counts"], need)), (side, draw["dropped_counts"], need)
        dropped = {name: torch.tensor(d, dtype=torch.long) for name, d in zip(chain.names, draw["dropped"])}
        copy = apply_dropout(chain.spec, theta_a if side == "a" else theta_b, dropped, info["p"])
        assert all(torch.equal(wp[k], copy[k]) for k in wp)
        assert draw["segment_max"] == max(draw["segment_losses"]) == info[f"dropout_{side}_max"]
        assert draw["loss"] == pytest.approx(info[f"loss_{side}1"])

    ev, loss, seg = profile_segments(model, path, data, points)
    scale = max(1.0, float(loss.max()))

    # the measured pieces in info agree with the evaluator
    assert loss[0] == pytest.approx(info["loss_a"], abs=1e-6)
    assert loss[-1] == pytest.approx(info["loss_b"], abs=1e-6)
    knot_loss = [float(loss[seg.index(i)]) for i in range(n)] + [float(loss[-1])]
    np.testing.assert_allclose(knot_loss, info["knot_losses"], atol=1e-5 * scale)
    assert len(info["segment_max"]) == n and info["max_loss"] == max(info["segment_max"])
    assert info["max_loss"] >= max(info["loss_a"], info["loss_b"], info["loss_a1"], info["loss_b1"])
    assert ev.bound is None
    return loss, seg


def _lemma2_parts(path):
    """(first segment, last segment, exact bound) of each Lemma 2 run of the path, from its certificate:
    the exact parts are the Lemma 2 runs, between the two dropout segments."""
    cert, n = path.certificate, path.num_segments
    parts = cert.exact_parts
    assert len(parts) == (2 if "star_knot" in path.info else 1) and cert.path_bound is None
    assert parts[0].first == 1 and parts[-1].last == n - 1
    assert all(p.last == q.first for p, q in zip(parts, parts[1:]))
    if "star_knot" in path.info:
        assert parts[1].first == path.info["star_knot"]
    assert [b.exact for b in cert.bounds] == [False] + [True] * len(parts)  # the theorem's own bound: no value
    return [(p.first, p.last - 1, p.value) for p in parts]


def _check_lemma2_bound(path, loss, seg):
    scale = max(1.0, float(loss.max()))
    for first, last, bound in _lemma2_parts(path):
        vals = loss[[j for j, s in enumerate(seg) if first <= s <= last]]
        assert vals.max() <= bound + 1e-5 * scale, (first, last, vals.max(), bound)


# ------------------------------------------------------------------------------------------ Theorem 2

@pytest.mark.parametrize("hidden", [(64,), (64, 33)], ids=["D1", "D2-odd"])
def test_mlp_noise_path(flat, hidden):
    a, b = trained_pair(("mlp", hidden), mlp(hidden), flat)
    theta_a, theta_b = _states(a, b)
    path = noise_path(a, theta_a, theta_b, flat)
    info = path.info
    assert path.name == "noise" and path.model is None and not info["folded_batchnorm"]
    assert info["sizes"] == list(hidden) and info["required_dropped"] == [math.ceil(h / 2) for h in hidden]
    assert info["p"] == 0.75 and info["paper_segments"] == 10
    assert path.num_segments == (5 if info["disjoint"] else 8)
    assert (PERMUTE in path.labels) == (not info["disjoint"])
    (lemma2,) = path.certificate.exact_parts
    assert lemma2.value == max(info["loss_a1"], info["loss_b1"]) and lemma2.measured == info["lemma2_max"]
    assert info["lemma2_max"] <= lemma2.value + 1e-6
    assert set(path.certificate.measured.values()) == {info["dropout_a_max"], info["dropout_b_max"]}
    loss, seg = _check_path(path, a, flat, theta_a, theta_b)
    _check_lemma2_bound(path, loss, seg)


@pytest.mark.slow  # a conv net's construction: about 5 s or more
def test_convnet_noise_path(images):
    a, b = trained_pair("convnet", _conv, images, steps=100)
    theta_a, theta_b = _states(a, b)
    path = noise_path(a, theta_a, theta_b, images, max_tries=20)
    assert path.info["sizes"] == [8, 8, 8] and path.info["required_dropped"] == [4, 4, 4]
    loss, seg = _check_path(path, a, images, theta_a, theta_b)
    _check_lemma2_bound(path, loss, seg)


def test_batchnorm_is_folded_first(flat):
    a, b = trained_pair("bn", bn_mlp, flat)
    path = noise_path(a, a.state_dict(), b.state_dict(), flat, max_tries=10)
    folded_a, folded_b = folded_endpoints(path, a, b, flat[0])
    loss, seg = _check_path(path, a, flat, folded_a, folded_b)
    _check_lemma2_bound(path, loss, seg)

    # theta* is trained in the BatchNorm model (its other units' BN scale and shift masked too), then folded
    narrow = narrow_path(a, a.state_dict(), b.state_dict(), flat, p=0.75, trainer=QUICK, max_tries=10, progress=False)
    assert narrow.info["folded_batchnorm"] and narrow.model is not None and not has_batchnorm(narrow.model)
    assert narrow.info["widths"] == [12]
    _check_star(narrow, Chain.from_spec(infer(narrow.model, flat[0][:2])))
    loss, seg = _check_path(narrow, a, flat, folded_a, folded_b)
    _check_lemma2_bound(narrow, loss, seg)


def test_resampling(flat):
    """Deterministic per seed; the accepted copy is the first that passes a tolerance, else the best one;
    draws that drop too few units are never used."""
    hidden = (64, 33)
    a, b = trained_pair(("mlp", hidden), mlp(hidden), flat)
    theta_a, theta_b = _states(a, b)
    best = noise_path(a, theta_a, theta_b, flat, p=0.5, seed=3, max_tries=12)
    again = noise_path(a, theta_a, theta_b, flat, p=0.5, seed=3, max_tries=12)
    assert best.info["dropout_a"]["dropped"] == again.info["dropout_a"]["dropped"]
    assert best.info["max_loss"] == again.info["max_loss"]
    draws = best.info["dropout_a"]["draws"]
    assert len(draws) == best.info["dropout_a"]["tries"] == 12
    need = best.info["required_dropped"]
    for d in draws:  # p = 1/2: some draws drop fewer than half the units of a layer; those are skipped
        ok = all(c >= k for c, k in zip(d["dropped_counts"], need))
        assert (d["status"] == "too few dropped units") == (not ok)
    assert any(d["status"] == "too few dropped units" for d in draws)
    chosen = best.info["dropout_a"]["accepted_try"]
    assert draws[chosen]["status"] == "best" and best.info["dropout_a"]["tolerance_met"] is None
    for d in draws:  # the chosen draw has the lowest segment maximum; abandoned ones could not beat it
        if d["status"] == "measured":
            assert d["segment_max"] >= draws[chosen]["segment_max"]
        if d["status"] == "abandoned":
            assert d["segment_max_at_least"] >= draws[chosen]["segment_max"]
    _check_path(best, a, flat, theta_a, theta_b, points=3)

    # any tolerance is met by the first valid draw; none by a negative one... zero is never met here
    first = noise_path(a, theta_a, theta_b, flat, p=0.5, seed=3, max_tries=12, tolerance=math.inf)
    valid = [i for i, d in enumerate(draws) if d["status"] != "too few dropped units"]
    assert first.info["dropout_a"]["accepted_try"] == valid[0] and first.info["dropout_a"]["tolerance_met"] is True
    assert first.info["dropout_a"]["tries"] == valid[0] + 1
    strict = noise_path(a, theta_a, theta_b, flat, p=0.5, seed=3, max_tries=12, tolerance=0.0)
    assert strict.info["dropout_a"]["tolerance_met"] is False
    assert strict.info["dropout_a"]["accepted_try"] == chosen


def test_noise_path_errors(flat):
    hidden = (64,)
    a, b = trained_pair(("mlp", hidden), mlp(hidden), flat)
    theta_a, theta_b = _states(a, b)
    with pytest.raises(ValueError, match="p >= 1/2.*narrow_path"):
        noise_path(a, theta_a, theta_b, flat, p=0.3)
    with pytest.raises(ValueError, match="p must lie"):
        noise_path(a, theta_a, theta_b, flat, p=1.0)
    # a seed whose only draw drops fewer than half the units: a clear error, not a broken path
    spec = infer(a, flat[0][:2])
    seed = next(s for s in range(100)
                if int(dropout_masks(spec, 0.5, torch.Generator().manual_seed(s))["1"].sum()) < 32)
    with pytest.raises(ValueError, match="Raise p or max_tries"):
        noise_path(a, theta_a, theta_b, flat, p=0.5, seed=seed, max_tries=1)

    res = ResidualMLP()
    with pytest.raises(UnsupportedArchitectureError, match="residual"):
        noise_path(res, res.state_dict(), res.state_dict(), flat, max_tries=1)
    with pytest.raises(UnsupportedArchitectureError, match="residual"):
        narrow_path(res, res.state_dict(), res.state_dict(), flat, max_tries=1, progress=False)


# ------------------------------------------------------------------------------------------ Theorem 3

def _check_star(path, chain):
    """pi(theta*) is a waypoint, zero outside its placed units, with the reported loss."""
    info = path.info
    star = path.waypoints[info["star_knot"]]
    assert info["knot_losses"][info["star_knot"]] == info["loss_star"]
    assert info["theta_star"]["loss"] == info["loss_star"]
    for g, (P, n) in enumerate(zip(info["placement"], chain.sizes)):
        assert len(P) == info["widths"][g]
        assert not set(P) & set(info["kept_b"][g])  # theta*'s units avoid theta_B,1's
        rest = torch.tensor(sorted(set(range(n)) - set(P)), dtype=torch.long)
        for ax in (*chain.rows[g], *chain.cols[g]):
            t = star[ax.name]
            assert not t.index_select(ax.axis, unit_slices(ax, rest, n)).any(), ax.name
        assert star[chain.rows[g][0].name].index_select(0, torch.tensor(P)).abs().sum() > 0


def test_mlp_narrow_path_and_checkpoint_reuse(flat, tmp_path):
    hidden = (64, 33)
    a, b = trained_pair(("mlp", hidden), mlp(hidden), flat)
    theta_a, theta_b = _states(a, b)
    ckpt = tmp_path / "narrow.pt"
    path = narrow_path(a, theta_a, theta_b, flat, p=0.3, trainer=QUICK, checkpoint_path=ckpt, progress=False)
    info = path.info
    assert path.name == "narrow" and info["widths"] == [12, 6] == narrow_widths(hidden, 0.3)
    assert info["required_p"] <= 0.3 and info["paper_segments"] == 13
    # at p = 0.3 few units are dropped in both copies: theta* must be permuted into place -> 11 segments
    assert any(info["permuted_layers"]) and path.num_segments == 11
    assert info["segments"] == {"dropout_a": 1, "lemma2_a": 6, "lemma2_b": 3, "dropout_b": 1}
    assert not info["theta_star"]["reused"] and ckpt.is_file()
    # theta*'s loss on the data is the trainer's final training loss of the masked wide net
    assert info["loss_star"] == pytest.approx(info["theta_star"]["train_metrics"]["train_loss"], abs=1e-5)
    _check_star(path, Chain.from_spec(infer(a, flat[0][:2])))
    loss, seg = _check_path(path, a, flat, theta_a, theta_b)
    _check_lemma2_bound(path, loss, seg)
    assert [b.value for b in path.certificate.exact_parts] == [max(info["loss_a1"], info["loss_star"]),
                                                               max(info["loss_star"], info["loss_b1"])]

    # a second call reuses theta* without retraining
    mtime = os.stat(ckpt).st_mtime_ns
    again = narrow_path(a, theta_a, theta_b, flat, p=0.3, trainer=QUICK, checkpoint_path=ckpt, progress=False)
    assert again.info["theta_star"]["reused"] and os.stat(ckpt).st_mtime_ns == mtime
    assert again.info["loss_star"] == info["loss_star"] and again.num_segments == path.num_segments
    assert all(torch.equal(x[k], y[k]) for x, y in zip(path.waypoints, again.waypoints) for k in x)
    # ... but not for other widths
    with pytest.raises(ValueError, match="delete the file"):
        narrow_path(a, theta_a, theta_b, flat, p=0.3, width=4, trainer=QUICK, checkpoint_path=ckpt, progress=False)


def test_narrow_path_with_a_narrow_model(flat):
    hidden = (64,)
    a, b = trained_pair(("mlp", hidden), mlp(hidden), flat)
    theta_a, theta_b = _states(a, b)
    torch.manual_seed(5)
    small = build("mlp", (64,), 10, hidden=(8,), dropout=0.3)
    path = narrow_path(a, theta_a, theta_b, flat, p=0.75, narrow_model=small, trainer=TrainConfig(**QUICK),
                       progress=False)
    info = path.info
    assert info["widths"] == [8] and "narrow_model" in info["theta_star"]["source"]
    assert info["loss_star"] == pytest.approx(info["theta_star"]["train_metrics"]["train_loss"], abs=1e-5)
    _check_star(path, Chain.from_spec(infer(a, flat[0][:2])))
    loss, seg = _check_path(path, a, flat, theta_a, theta_b)
    _check_lemma2_bound(path, loss, seg)
    with pytest.raises(ValueError, match="widths"):
        narrow_path(a, theta_a, theta_b, flat, width=5, narrow_model=small, trainer=QUICK, progress=False)


@pytest.mark.slow  # a conv net's construction: about 5 s or more
def test_convnet_narrow_path(images):
    a, b = trained_pair("convnet", _conv, images, steps=100)
    theta_a, theta_b = _states(a, b)
    path = narrow_path(a, theta_a, theta_b, images, p=0.75, trainer=QUICK, max_tries=20, progress=False)
    info = path.info
    assert info["widths"] == [4, 4, 4]
    assert path.num_segments == (11 if any(info["permuted_layers"]) else 8)
    _check_star(path, Chain.from_spec(infer(a, images[0][:2])))
    loss, seg = _check_path(path, a, images, theta_a, theta_b)
    _check_lemma2_bound(path, loss, seg)


def test_narrow_widths():
    assert narrow_widths([256, 256], 0.75) == [128, 128]
    assert narrow_widths([32, 32, 32], 0.2) == [4, 4, 4]
    assert narrow_widths([64, 33], 0.3, width=[12, 5]) == [12, 5]
    with pytest.raises(ValueError, match=r"p >= 1.5 \* max"):
        narrow_widths([64, 33], 0.3, width=12)
    with pytest.raises(ValueError, match="one narrow width per hidden layer"):
        narrow_widths([64, 33], 0.3, width=[4])
    with pytest.raises(ValueError, match="must lie in"):
        narrow_widths([64], 0.75, width=0)
