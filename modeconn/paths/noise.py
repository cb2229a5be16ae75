"""Kuditipudi et al. (2019), Theorem 2: a path between two noise-stable networks.

::

    theta_A --1--> theta_A,1 --Lemma 2 (+ Lemma 4)--> theta_B,1 --1--> theta_B

theta_X,1 is an Algorithm 1 copy of theta_X (:func:`modeconn.kuditipudi.algorithm1.random_dropout`: each
hidden unit dropped independently with probability ``p``, its outgoing columns zeroed, every kept unit's
outgoing columns scaled by 1/(1-p)). The first and last segments are straight lines from each network to
its copy ("dropout interpolation"): only noise stability (Lemma 3) says they stay low, so the copy is
resampled (:mod:`modeconn.kuditipudi.resample`) until every hidden layer has at least ceil(h/2) dropped
units (so that Lemma 2 applies) and the segment's measured maximum is at most L(theta_X) + ``tolerance``.

Algorithm 1 zeroes only columns: the dropped units' rows (incoming weights, bias) stay. Lemma 2's first
segment zeroes them on A's side (no extra segment). On B's side Lemma 2 ends in theta_B,1's kept
subnetwork with the dropped rows zero; its last segment only changes rows of units that cannot reach the
output, so that segment is made to end at theta_B,1 itself (:func:`~modeconn.kuditipudi.lemma2.end_at`;
its dropped rows restored, loss still constant) - verified, and otherwise (never expected) done by one
extra "free-unit rewiring" segment.

Segment count: the paper counts Lemma 2 as 8 segments (3 + Lemma 4's general 5), so 10 in all;
:func:`~modeconn.kuditipudi.lemma2.lemma2` writes the second network into slots from which Lemma 4 needs
only 3 segments, and none when the kept sets are disjoint in every layer (see :mod:`modeconn.paths.dropout`),
hence **8** segments (1 + 3 + 3 + 1), or **5** with disjoint kept sets. ``path.info["expected_segments"]``
states the count for the path at hand; ``paper_segments`` the paper's.

Certificate: Theorem 2's bound max(L_A, L_B) + O~(epsilon) hides constants and log factors; what *is*
exact is that every Lemma 2 segment is at constant loss or an output-layer interpolation between networks
computing theta_A,1 / theta_B,1, so that part stays below max(L(theta_A,1), L(theta_B,1)).
``path.certificate`` states both.

Models: plain feed-forward chains of hidden layers (MLPs, conv nets with channels as units, pooling and
flatten allowed, ``nn.Sequential``s); residual models raise
:class:`~modeconn.kuditipudi.chain.UnsupportedArchitectureError`. BatchNorm after a Conv/Linear is folded
first, as in :func:`modeconn.paths.dropout.dropout_path`: the path then lives in ``path.model`` (the folded
module), ``info["folded_batchnorm"]`` is True and the endpoints are the folded theta_a and theta_b.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from modeconn.kuditipudi.chain_loss import measure_segments, prepare_endpoints
from modeconn.kuditipudi.edits import OUTPUT, PERMUTE, REWIRE
from modeconn.kuditipudi.lemma2 import end_at, lemma2
from modeconn.kuditipudi.resample import check_draw_options, copies_info, draw_dropout, settings_info
from modeconn.params.path import PiecewiseLinearPath, check_endpoints
from modeconn.params.certificate import Bound, Certificate
from modeconn.units import UnitSpec

__all__ = ["noise_path", "check_noise_options", "dropout_copies_certificate", "lemma2_part", "DROPOUT", "LABELS"]

DROPOUT = "dropout interpolation"
LABELS = (DROPOUT, OUTPUT, REWIRE, PERMUTE)


def check_noise_options(p: float, max_tries: int = 50, check_points: int = 11, tolerance: float | None = None,
                        **_) -> None:
    """:func:`noise_path`'s option checks (the CLI runs them on a config before any training)."""
    if not (isinstance(p, numbers.Real) and not isinstance(p, bool)):
        raise ValueError(f"p must be a number in (0, 1); got {p!r}")
    check_draw_options(float(p), max_tries, check_points, tolerance)
    if p < 0.5:
        raise ValueError(
            f"noise_path needs p >= 1/2 (got p = {p}): Lemma 2 connects the two dropout copies only when at least "
            "half of every hidden layer's units are dropped (free), and Algorithm 1 drops about a fraction p of "
            "them. For a smaller p use narrow_path (Theorem 3), which passes through a narrow network instead.")


def dropout_copies_certificate(construction: str, formula: str, num_segments: int, items: int,
                               lemma2_parts: list[Bound], da, db) -> Certificate:
    """Theorems 2 and 3: an asymptotic bound over the whole path (no value), the exact bounds of the Lemma 2
    parts between the dropout segments, and the measured maxima of the two dropout segments."""
    whole = Bound("the whole path", formula + " (constants and log factors not computable)", 0, num_segments,
                  False)
    measured = {"dropout segment theta_a -> theta_a,1": da.segment_max,
                "dropout segment theta_b,1 -> theta_b": db.segment_max}
    return Certificate(construction, num_segments, items, (whole, *lemma2_parts), measured)


def lemma2_part(covers: str, first: int, last: int, ends: dict[str, float], measured: float) -> Bound:
    """Lemma 2's exact bound: every segment is at constant loss or an output-layer interpolation between
    networks computing its two ends, so the loss stays below the larger end."""
    return Bound(covers, f"max({', '.join(ends)})", first, last, True, max(ends.values()), ends, measured)


def noise_path(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], data,
               p: float = 0.75, seed: int = 0, *, max_tries: int = 50, tolerance: float | None = None,
               check_points: int = 11, max_items: int | None = None, batch_size: int = 2048, device=None,
               knots: str | Sequence[float] | None = None,
               spec: UnitSpec | None = None) -> PiecewiseLinearPath:
    """Theorem 2's path from ``theta_a`` to ``theta_b`` (state dicts of ``model``) through random dropout
    copies (see the module docstring).

    ``data``: the training data every loss here uses (a ``Dataset`` - its train split -, an ``(x, y)`` pair
    or an iterable of batches; its first ``max_items`` examples when given). ``p``: Algorithm 1's drop
    probability, at least 1/2 (Lemma 2 needs half of every layer free; the theorem uses 3/4; for smaller
    p use :func:`narrow_path`). A's copy is drawn with ``torch.Generator().manual_seed(seed)``, B's with
    ``seed + 1``; at most ``max_tries`` draws each; a draw is accepted when every hidden layer has at least
    ceil(h/2) dropped units and the segment's measured maximum (``check_points`` points) is at most
    L(theta) + ``tolerance``; with ``tolerance=None`` (or when none is accepted) the valid draw with the
    lowest segment maximum is used.

    ``spec``: the model's unit spec when the caller has it (a run infers it once); else inferred here.

    Returns a :class:`PiecewiseLinearPath` with ``path(0)`` / ``path(1)`` exactly the (BatchNorm-folded)
    endpoints, one label per segment (``"dropout interpolation"``, ``"free-unit rewiring"``,
    ``"output-layer interpolation"``, ``"permutation"``), ``bound = None``, a certificate (the
    asymptotic whole-path bound; the exact bound of the Lemma 2 part, max(L(theta_a,1), L(theta_b,1))) and
    the measured pieces in ``info`` (``loss_a``, ``loss_b``, ``loss_a1``, ``loss_b1``, ``dropout_a`` /
    ``dropout_b`` (the draws), ``lemma2_max``, ``max_loss``, ``segment_max``, ``knot_losses``, segment counts).
    """
    check_noise_options(p=p, max_tries=max_tries, check_points=check_points, tolerance=tolerance)
    check_endpoints(theta_a, theta_b, model, data)
    p = float(p)
    problem, a, b = prepare_endpoints(model, theta_a, theta_b, data, max_items, batch_size, device, spec)
    chain = problem.chain
    need = [(n + 1) // 2 for n in chain.sizes]
    loss_a, loss_b = problem.loss(a), problem.loss(b)
    da = draw_dropout(problem, a, loss_a, p, need, seed, max_tries, tolerance, check_points, "noise_path (theta_a)")
    db = draw_dropout(problem, b, loss_b, p, need, int(seed) + 1, max_tries, tolerance, check_points,
                       "noise_path (theta_b)")

    mid, mid_labels = lemma2(chain, da.theta1, da.kept, db.theta1, db.kept)
    mid, mid_labels, end_mode = end_at(chain, mid, mid_labels, db.theta1, db.kept)
    knot, seg, evals = measure_segments(problem, mid, mid_labels, {0: da.loss1, len(mid) - 1: db.loss1}, check_points)

    waypoints = [a] + mid + [b]
    labels = [DROPOUT] + mid_labels + [DROPOUT]
    path = PiecewiseLinearPath(waypoints, knots=knots, labels=labels)
    path.name = "noise"

    disjoint = [not (set(x.tolist()) & set(y.tolist())) for x, y in zip(da.kept, db.kept)]
    lemma4 = sum(1 for lab in mid_labels if lab == PERMUTE)
    exact = lemma2_part("the Lemma 2 segments theta_a,1 -> theta_b,1", 1, len(labels) - 1,
                        {"L(theta_a,1)": da.loss1, "L(theta_b,1)": db.loss1}, max(seg))
    path.certify(dropout_copies_certificate("Kuditipudi et al. 2019, Theorem 2 (noise stability)",
                                            "max(L(theta_a), L(theta_b)) + O~(epsilon)", len(labels),
                                            len(problem.y), [exact], da, db))
    segment_max = [da.segment_max] + seg + [db.segment_max]
    path.info.update({
        "construction": "Kuditipudi et al. 2019, Theorem 2 (noise stability)",
        **settings_info(p, seed, tolerance, check_points, problem),
        "required_dropped": need,
        "loss_a": loss_a,
        "loss_b": loss_b,
        "loss_a1": da.loss1,
        "loss_b1": db.loss1,
        **copies_info(da, db),
        "lemma2_max": max(seg),
        "max_loss": max(segment_max),
        "max_loss_minus_endpoints": max(segment_max) - max(loss_a, loss_b),
        "segment_max": segment_max,
        "knot_losses": [loss_a] + knot + [loss_b],
        "disjoint": all(disjoint),
        "disjoint_layers": disjoint,
        "lemma2_end": end_mode,
        "segments": {"dropout_a": 1, "lemma2": 3 + (end_mode == "extra segment"), "lemma4": lemma4, "dropout_b": 1},
        "num_segments": len(labels),
        "expected_segments": (5 if all(disjoint) else 8) + (end_mode == "extra segment"),
        "paper_segments": 10,
        "loss_evaluations": 2 + da.evaluations + db.evaluations + evals,
        "folded_batchnorm": problem.folded,
    })
    if problem.folded:
        path.model = problem.module
    return path
