"""AutoNEB (modeconn.paths.autoneb): the band's geometry against hand-computed cases, the insertion rules,
the batched step against a one-pivot-at-a-time loop, a 2-D energy with a known saddle, trained MLPs, resume
after an interrupt, and the option errors."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy.optimize import root
from torch import nn

import nets
from modeconn.evaluation.evaluate import evaluate_path
from modeconn.params.path import linear
from modeconn.paths.autoneb import autoneb, check_autoneb_options
from modeconn.paths.autoneb_cycles import (PAPER_SCHEDULE, equal_insertions, expand_cycles, highest_insertions,
                                           insert_pivots)
from modeconn.paths.neb import nudge, redistribute, segment_lengths, spring_gradient, tangents
from modeconn.paths.neb_step import ChainStep

# ------------------------------------------------------------------------------------- the geometry

CHAIN = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)  # tau- = (1, 0), tau+ = (0, 2)


@pytest.mark.parametrize("rule", ["improved", "reference"])
def test_tangent_on_monotone_energies_is_the_uphill_neighbours_direction(rule):
    up = tangents(CHAIN, torch.tensor([0.0, 1.0, 3.0]), rule)
    down = tangents(CHAIN, torch.tensor([3.0, 1.0, 0.0]), rule)
    assert torch.allclose(up[0], torch.tensor([0.0, 1.0], dtype=torch.float64))  # tau+ normalised
    assert torch.allclose(down[0], torch.tensor([1.0, 0.0], dtype=torch.float64))  # tau-


def test_tangent_at_extrema_weights_the_higher_neighbour_by_dE_max():
    # a maximum: E = (1, 5, 2): dE_max = 4 (to the previous), dE_min = 3; E_{i+1} > E_{i-1} -> tau+ dE_max
    top = tangents(CHAIN, torch.tensor([1.0, 5.0, 2.0]))[0]
    expect = torch.tensor([0.0, 2.0]) * 4 + torch.tensor([1.0, 0.0]) * 3
    assert torch.allclose(top, (expect / expect.norm()).double())
    # a minimum: E = (4, 0, 1): E_{i+1} < E_{i-1} -> tau+ dE_min + tau- dE_max = (0, 2) * 1 + (1, 0) * 4
    low = tangents(CHAIN, torch.tensor([4.0, 0.0, 1.0]))[0]
    expect = torch.tensor([0.0, 2.0]) * 1 + torch.tensor([1.0, 0.0]) * 4
    assert torch.allclose(low, (expect / expect.norm()).double())


def test_reference_tangent_blends_unit_vectors_giving_dE_max_to_the_lower_neighbour():
    top = tangents(CHAIN, torch.tensor([1.0, 5.0, 2.0]), "reference")[0]
    expect = torch.tensor([0.0, 1.0]) * 3 + torch.tensor([1.0, 0.0]) * 4  # unit tau+ * dE_min + unit tau- * dE_max
    assert torch.allclose(top, (expect / expect.norm()).double())


def test_nudged_gradient_is_orthogonal_to_the_tangent_and_the_spring_acts_along_it():
    g = torch.Generator().manual_seed(0)
    chain = torch.randn(7, 50, generator=g, dtype=torch.float64)
    tau = tangents(chain, torch.randn(7, generator=g, dtype=torch.float64))
    assert torch.allclose(tau.norm(dim=1), torch.ones(5, dtype=torch.float64))
    grad = torch.randn(5, 50, generator=g, dtype=torch.float64)
    perp = nudge(grad, tau)
    assert (perp * tau).sum(1).abs().max() < 1e-12
    assert torch.allclose(nudge(perp, tau), perp)  # a projection
    # a spring on a stretched first segment pulls pivot 1 back (a descent step goes along -gradient)
    line = torch.tensor([[0.0], [3.0], [4.0]], dtype=torch.float64)
    spring = spring_gradient(line, torch.ones(1, 1, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 2.0)
    assert torch.allclose(spring, torch.tensor([[2.0 * ((3 - 2) - (1 - 2))]], dtype=torch.float64))


def test_redistribution_keeps_the_polyline_and_equalises_the_spacing():
    chain = torch.tensor([[0.0, 0.0], [0.2, 0.0], [1.0, 0.0], [1.0, 3.0], [0.0, 3.0]], dtype=torch.float64)
    new = redistribute(chain, torch.ones(4, dtype=torch.float64))
    assert torch.equal(new[0], chain[0]) and torch.equal(new[-1], chain[-1])
    # equal arc lengths (5 / 4 each) along the old polyline, whose corners stay corners of the new one
    assert torch.allclose(new[1:-1], torch.tensor([[1.0, 0.25], [1.0, 1.5], [1.0, 2.75]], dtype=torch.float64))
    for p in new:  # every new pivot lies on one of the old segments
        dist = []
        for a, b in zip(chain[:-1], chain[1:]):
            s = ((p - a) @ (b - a) / ((b - a) @ (b - a))).clamp(0, 1)
            dist.append(float((a + s * (b - a) - p).norm()))
        assert min(dist) < 1e-12
    weighted = redistribute(chain, torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64))
    assert torch.allclose(weighted[1:-1], torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    on_a_line = torch.tensor([[0.0, 0.0], [0.1, 0.1], [0.9, 0.9], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(segment_lengths(redistribute(on_a_line, torch.ones(3, dtype=torch.float64))),
                          torch.full((3,), 2**0.5 / 3, dtype=torch.float64))
    assert torch.equal(redistribute(redistribute(chain, torch.ones(4, dtype=torch.float64)),
                                    torch.ones(4, dtype=torch.float64))[0], chain[0])


# ------------------------------------------------------------------------------------- insertion

def test_highest_inserts_at_the_largest_excess_over_the_chord_and_not_under_the_threshold():
    pivots = [0.0, 1.0, 0.0]
    chord0 = [k / 10 for k in range(1, 10)]
    bump = list(chord0)
    bump[6] += 0.5  # excess 0.5 of the range 1 at sub-point 7 (fraction 0.7) of segment 0
    flat = [1.0 - k / 10 for k in range(1, 10)]
    flat[2] += 0.05  # excess 0.05 in segment 1: under the default threshold 0.1
    assert highest_insertions(pivots, [bump, flat], 2) == [(0, pytest.approx(0.7))]
    assert highest_insertions(pivots, [bump, flat], 2, threshold=0.01) == [(0, pytest.approx(0.7)),
                                                                           (1, pytest.approx(0.3))]
    assert highest_insertions(pivots, [bump, flat], 1, threshold=0.01) == [(0, pytest.approx(0.7))]
    assert highest_insertions(pivots, [chord0, [1 - c for c in chord0]], 2) == []  # on the chord: nowhere


def test_insertion_places_pivots_on_segments_and_splits_the_spacing_weights():
    chain = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    new, w = insert_pivots(chain, torch.tensor([1.0, 2.0], dtype=torch.float64), [(1, 0.25)])
    assert new.flatten().tolist() == [0.0, 1.0, 1.5, 3.0]
    assert w.tolist() == [1.0, 0.5, 1.5]
    new, w = insert_pivots(chain, torch.ones(2, dtype=torch.float64), equal_insertions(2, 3))
    assert torch.allclose(new.flatten(), torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3], dtype=torch.float64))
    assert torch.allclose(w, torch.full((8,), 0.25, dtype=torch.float64))


def test_the_default_schedule_is_the_papers_and_scales_keeping_its_structure():
    cycles = expand_cycles(None)
    assert len(cycles) == 14 and sum(c.iterations for c in cycles) == 16_000
    assert [c.insert for c in cycles[:2]] == ["equal(3)", "highest(2, 0.1)"]
    assert [c.lr for c in cycles] == [0.1] * 6 + [0.01] * 4 + [0.001] * 4
    assert [c.iterations for c in cycles[3:7]] == [1000, 2000, 2000, 1000]
    pivots = 2 + 3
    pivots += 2 * 13  # highest(2) inserts at most 2 per cycle
    assert pivots == 31
    quick = expand_cycles(PAPER_SCHEDULE, 0.01)
    assert [c.iterations for c in quick] == [c.iterations // 100 for c in cycles]
    assert [c.insert for c in quick] == [c.insert for c in cycles]


@pytest.mark.parametrize("cycles, words", [
    ([], "cycles must be a non-empty list"),
    ([{"insert": "middle(2)", "iterations": 5, "lr": 0.1}], "cycles[0].insert must be one of"),
    ([{"insert": "equal(2)", "iterations": 5, "lr": 0.1}, {"iterations": -1}], "cycles[1].iterations must be"),
    ([{"insert": "equal(2)", "iterations": 5, "lr": 0.1, "speed": 2}], "cycles[0] has unknown key(s) ['speed']"),
    ([{"iterations": 5, "lr": 0.1}], "cycles[0] must set insert"),
    ([{"insert": "highest(0)", "iterations": 5, "lr": 0.1}], "cycles[0].insert must be one of"),
])
def test_bad_cycles_are_one_clear_error(cycles, words):
    with pytest.raises(ValueError) as err:
        check_autoneb_options(cycles)
    assert words in str(err.value)


def test_bad_options_name_the_option():
    for kwargs, words in [({"tangent": "fancy"}, "tangent must be one of improved, reference"),
                          ({"spring": -1.0}, "spring must be null"), ({"batch_size": 0}, "batch_size must be"),
                          ({"iterations_scale": 0}, "iterations_scale must be")]:
        with pytest.raises(ValueError, match=words):
            check_autoneb_options(**kwargs)


# ------------------------------------------------------------------------------------- the batched step

@pytest.mark.parametrize("make", [lambda: nets.mlp([16])(), nets.bn_mlp], ids=["mlp", "batchnorm"])
def test_one_vmapped_call_equals_a_loop_over_pivots(make, flat):
    torch.manual_seed(0)
    model = make().eval()
    for m in model.modules():  # no dropout: the two must see the same function
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    a, b = make().state_dict(), make().state_dict()
    step = ChainStep(model, a, b, flat[0].device)
    rows = torch.stack([torch.lerp(step.flat_a, step.flat_b, w) + 0.01 * torch.randn_like(step.flat_a)
                        for w in (0.2, 0.5, 0.8)])
    x, y = flat[0][:192].reshape(3, 64, -1), flat[1][:192].reshape(3, 64)  # a batch per pivot
    losses, grads = step.interior(rows, x, y)
    for i, row in enumerate(rows):
        loss, grad = step.one(row, x[i], y[i])
        assert torch.allclose(losses[i], loss, atol=1e-6)
        assert torch.allclose(grads[i], grad, atol=1e-6)
    assert model.training is False  # the caller's mode is left as it was


class _StochasticDepthNet(nn.Module):
    """A residual block with torchvision's StochasticDepth (an in-place draw vmap cannot make per pivot)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.inp, self.fc, self.out = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        self.drop = StochasticDepth(0.5, "row")

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h + self.drop(self.fc(h)))


def test_pivots_share_their_random_draws_and_stochastic_depth_runs(flat):
    """Shared random draws: identical pivots on one batch get identical losses and gradients under dropout and under
    torchvision's StochasticDepth (an in-place draw vmap could not make per pivot)."""
    torch.manual_seed(0)
    for make in (lambda: nets.mlp([16])(), _StochasticDepthNet):
        a, b = make().state_dict(), make().state_dict()
        step = ChainStep(make(), a, b, flat[0].device)
        row = torch.lerp(step.flat_a, step.flat_b, 0.5)
        x, y = flat[0][:64].expand(3, 64, 64), flat[1][:64].expand(3, 64)  # the same batch: only the draws differ
        losses, grads = step.interior(torch.stack([row, row, row]), x, y)
        assert torch.isfinite(losses).all() and torch.equal(losses[0], losses[2]) and torch.equal(grads[0], grads[2])
    a, b = _StochasticDepthNet().state_dict(), _StochasticDepthNet().state_dict()
    path = autoneb(_StochasticDepthNet(), a, b, (flat[0][:256], flat[1][:256]), batch_size=64, progress=False,
                   cycles=[{"insert": "equal(1)", "iterations": 3, "lr": 0.01}])
    assert len(path.knots) == 3 and torch.equal(path(1.0)["out.weight"], b["out.weight"])


def test_every_pivot_draws_its_own_batch_in_chain_order(mlp_pair, flat, monkeypatch):
    """As the reference: a batch per pivot, endpoints included, consecutive draws of one shuffled stream."""
    from modeconn.paths import neb_step

    seen = []
    original = neb_step.ChainStep.interior
    monkeypatch.setattr(neb_step.ChainStep, "interior",
                        lambda self, rows, x, y: seen.append((len(rows), x.clone(), y.clone())) or original(self, rows, x, y))
    a, b = (m.state_dict() for m in mlp_pair)
    autoneb(nets.mlp([16])(), a, b, (flat[0][:256], flat[1][:256]), batch_size=32, progress=False,
            cycles=[{"insert": "equal(2)", "iterations": 2, "lr": 0.01}])
    (q, x0, y0), (_, x1, _) = seen
    assert q == 2 and x0.shape == (2, 32, 64) and y0.shape == (2, 32)
    assert not torch.equal(x0[0], x0[1]) and not torch.equal(x0[1], x1[0])
    stream = neb_step.BatchStream(256, 32, torch.Generator().manual_seed(0))
    again = neb_step.BatchStream(256, 32, torch.Generator().manual_seed(0))
    xs, ys = stream.many(3, flat[0][:256], flat[1][:256])
    for i in range(3):
        xi, yi = again.next(flat[0][:256], flat[1][:256])
        assert torch.equal(xs[i], xi) and torch.equal(ys[i], yi)


def test_a_conv_net_on_a_cpu_goes_one_pivot_at_a_time_with_the_vmapped_numbers(flat):
    from modeconn.models import build

    make = lambda: build("convnet", (1, 8, 8), 10, width=4, depth=2, channel_dropout=0.2)  # noqa: E731
    torch.manual_seed(0)
    a, b = make().state_dict(), make().state_dict()
    step = ChainStep(make(), a, b, torch.device("cpu"))
    rows = torch.stack([torch.lerp(step.flat_a, step.flat_b, w) for w in (0.3, 0.7)] * 2)  # pivots 0, 2 equal
    x, y = flat[0][:64].reshape(64, 1, 8, 8).cpu(), flat[1][:64].cpu()
    x, y = torch.stack([x, x.flip(0), x, x.flip(0)]), torch.stack([y, y.flip(0), y, y.flip(0)])  # pivots 0, 2: one batch
    assert step.one_by_one
    torch.manual_seed(1)
    losses, grads = step.interior(rows, x, y)
    step.one_by_one = False
    torch.manual_seed(1)
    vm_losses, vm_grads = step.interior(rows, x, y)
    assert torch.allclose(losses, vm_losses, atol=1e-5) and torch.allclose(grads, vm_grads, atol=1e-5)
    assert torch.equal(losses[0], losses[2]) and torch.equal(grads[0], grads[2])  # shared channel-dropout draws


# ------------------------------------------------------------------------------------- runs

MB_A = [-200, -100, -170, 15]
MB_a, MB_b, MB_c = [-1, -1, -6.5, 0.7], [0, 0, 11, 0.6], [-10, -10, -6.5, 0.7]
MB_X, MB_Y = [1, 0, -0.5, -1], [0, 0.5, 1.5, 1]
SCALE, SHIFT = 0.01, 2.0  # the loss is 0.01 * E + 2 (positive: it is a cross-entropy)


def muller_brown(x, y):
    return sum(A * torch.exp(a * (x - x0) ** 2 + b * (x - x0) * (y - y0) + c * (y - y0) ** 2)
               for A, a, b, c, x0, y0 in zip(MB_A, MB_a, MB_b, MB_c, MB_X, MB_Y))


class MullerBrown(nn.Module):
    """Two parameters whose cross-entropy on any batch is 0.01 * (Mueller-Brown energy) + 2: logits
    (-E, log(1 - exp(-E))) for class 0 give exactly -log p_0 = E."""

    def __init__(self) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, inputs):
        e = SCALE * muller_brown(self.xy[0], self.xy[1]) + SHIFT
        return torch.stack([-e, torch.log(-torch.expm1(-e))]).unsqueeze(0).expand(len(inputs), 2)


def _mb_point(start):
    def grad(p):
        xy = torch.tensor(p, requires_grad=True)
        (g,) = torch.autograd.grad(muller_brown(xy[0], xy[1]), xy)
        return g.numpy()
    found = root(grad, start, tol=1e-12)
    assert found.success
    return found.x, float(muller_brown(*torch.tensor(found.x)))


MB_DATA = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.long))


def test_on_a_2d_energy_the_chain_finds_the_saddle_between_two_minima():
    (xa, _), (xb, _) = _mb_point([-0.56, 1.44]), _mb_point([0.62, 0.03])
    _, saddle = _mb_point([-0.82, 0.62])  # the higher of the two saddles on the way from A to B
    assert saddle == pytest.approx(-40.66, abs=0.01)
    ta, tb = {"xy": torch.tensor(xa)}, {"xy": torch.tensor(xb)}
    path = autoneb(MullerBrown(), ta, tb, MB_DATA, batch_size=4, weight_decay=0.0, progress=False,
                   cycles=[{"insert": "equal(4)", "iterations": 200, "lr": 0.002},
                           {"insert": "highest(2, 0.05)", "iterations": 120, "repeat": 2}])
    found = (path.info["saddle"]["loss"] - SHIFT) / SCALE
    assert abs(found - saddle) <= 0.02 * abs(saddle), (found, saddle)
    assert torch.equal(path(0.0)["xy"], ta["xy"]) and torch.equal(path(1.0)["xy"], tb["xy"])
    assert path.info["history"][0]["pivots"] == 6 and path.info["history"][-1]["pivots"] > 6
    assert len(path.info["history"][-1]["dense_loss"]) == 10 * (path.info["history"][-1]["pivots"] - 1) + 1


def test_a_diverging_band_stops_with_an_error_naming_cycle_and_iteration():
    ta, tb = {"xy": torch.tensor([-0.558, 1.442], dtype=torch.float64)}, {"xy": torch.tensor([0.623, 0.028],
                                                                                              dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"non-finite pivot loss in cycle 2, iteration \d+"):
        autoneb(MullerBrown(), ta, tb, MB_DATA, batch_size=4, weight_decay=0.0, progress=False,
                cycles=[{"insert": "equal(1)", "iterations": 2, "lr": 1e-4}, {"lr": 1e3, "iterations": 60}])


@pytest.fixture(scope="module")
def mlp_pair(flat):
    return nets.trained_pair("mlp16", nets.mlp([16]), flat)


CYCLES = [{"insert": "equal(3)", "iterations": 40, "lr": 0.1}, {"insert": "highest(2)"}, {}]


def test_on_trained_mlps_the_barrier_is_far_below_the_straight_lines(mlp_pair, flat):
    a, b = (m.state_dict() for m in mlp_pair)
    model = nets.mlp([16])()
    path = autoneb(model, a, b, flat, cycles=CYCLES, batch_size=128, progress=False)
    line = evaluate_path(model, linear(a, b), flat, num_points=21, progress=False).max_train_loss
    ev = evaluate_path(model, path, flat, num_points=21, progress=False)
    ends = max(ev.metrics["train_loss"][0], ev.metrics["train_loss"][-1])
    assert ev.max_train_loss - ends < 0.2 * (line - ends), (ev.max_train_loss, line, ends)
    assert path.knots == path.info["pivots"] and len(path.knots) == path.info["history"][-1]["pivots"]
    assert path.info["gradient_evaluations"] == sum(h["iterations"] * (h["pivots"] - 2) * 128
                                                    for h in path.info["history"])


def test_an_interrupted_run_resumes_at_its_cycle_bit_for_bit(mlp_pair, flat, tmp_path):
    a, b = (m.state_dict() for m in mlp_pair)  # the MLP has dropout: the RNG state is resumed too
    run = dict(cycles=CYCLES, batch_size=64, progress=False, seed=3)
    whole = autoneb(nets.mlp([16])(), a, b, flat, resume=tmp_path / "whole.pt", **run)

    def stop(cycle, record):
        if cycle == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        autoneb(nets.mlp([16])(), a, b, flat, resume=tmp_path / "cut.pt", callback=stop, **run)
    again = autoneb(nets.mlp([16])(), a, b, flat, resume=tmp_path / "cut.pt", **run)
    assert again.info["resumed_from"] == 1
    assert len(again.waypoints) == len(whole.waypoints)
    for p, q in zip(again.waypoints, whole.waypoints):
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert again.knots == whole.knots
    done = autoneb(nets.mlp([16])(), a, b, flat, resume=tmp_path / "cut.pt", **run)  # finished: no work
    assert done.info["resumed_from"] == 3 and done.knots == whole.knots
    with pytest.raises(ValueError, match="belongs to a different run"):
        autoneb(nets.mlp([16])(), a, b, flat, resume=tmp_path / "cut.pt", **{**run, "seed": 4})


@pytest.mark.parametrize("edit, words", [
    (lambda x: {**x, "cycles_done": 99}, "cycles_done is 99 but its history records 1 cycles"),
    (lambda x: {**x, "weights": x["weights"][:-1]}, "weights is"),
    (lambda x: {**x, "pivots": x["pivots"][:1]}, "not [at least 2 pivots"),
], ids=["cycles-done", "weights", "one-pivot"])
def test_the_cli_preflight_refuses_a_resume_file_whose_counts_disagree(edit, words, mlp_pair, flat, tmp_path):
    """A resume file of the right shape whose counts cannot belong together is refused by name before the
    CLI writes anything (not after Hydra has rewritten config.yaml)."""
    from modeconn.io.jsonfile import UnreadableFileError
    from modeconn.run.preflight import check_work_files

    a, b = (m.state_dict() for m in mlp_pair)
    file = tmp_path / "work" / "autoneb.pt"
    file.parent.mkdir()

    def stop(cycle, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        autoneb(nets.mlp([16])(), a, b, flat, cycles=CYCLES, batch_size=64, progress=False, resume=file,
                callback=stop)
    check_work_files(tmp_path, nets.mlp([16])())  # the real file passes
    torch.save(edit(torch.load(file, weights_only=True)), file)
    with pytest.raises(UnreadableFileError, match=re.escape(words)) as err:
        check_work_files(tmp_path, nets.mlp([16])())
    assert str(file) in str(err.value) and f"delete {file}" in str(err.value)


def test_batchnorm_pivots_carry_parameters_only_and_evaluate(flat):
    torch.manual_seed(0)
    a, b = nets.bn_mlp().state_dict(), nets.bn_mlp().state_dict()
    model = nets.bn_mlp()
    path = autoneb(model, a, b, flat, cycles=[{"insert": "equal(2)", "iterations": 5, "lr": 0.05}],
                   batch_size=64, progress=False)
    assert list(path(0.5).keys()) == [k for k in a if a[k].is_floating_point()]  # running statistics included
    assert all(torch.equal(path(1.0)[k], b[k]) for k in b if b[k].is_floating_point())
    ev = evaluate_path(model, path, flat, num_points=5, progress=False)
    assert np.isfinite(ev.metrics["train_loss"]).all()
