"""Kuditipudi et al. (2019), Theorem 3: a path between two noise-stable networks through a narrow one.

::

    theta_A --1--> theta_A,1 --Lemma 2 (+ Lemma 4)--> pi(theta*) --Lemma 2 (no permutation)--> theta_B,1 --1--> theta_B

theta* (:mod:`modeconn.kuditipudi.narrow`) is a narrow network of hidden widths h*_i <= p h_i / 1.5,
trained by :func:`modeconn.training.train.train` and embedded in the wide architecture (every other unit zero); pi
places its units on units dropped in theta_B,1 (preferring units dropped in theta_A,1 as well). The
dropout copies are resampled as in :func:`modeconn.paths.noise.noise_path`, here until at least h*_i
units of every layer are dropped.

Segment count: the paper's 13 (1 + 8 + 3 + 1); here **11** (1 + 6 + 3 + 1), or **8** when theta*'s units
can be placed on units dropped in both copies in every layer (often so for p = 3/4), for the reason given
in :mod:`modeconn.paths.noise`.

Certificate: Theorem 3's max(L_A + O~(sqrt(p) eps), L_B + O~(sqrt(p) eps), L(theta*)) hides constants and
log factors; each Lemma 2 part is bounded exactly by the larger of its two ends.
"""
from __future__ import annotations

import copy
import numbers
import os
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from modeconn.kuditipudi.chain import Chain
from modeconn.kuditipudi.chain_loss import measure_segments, prepare_endpoints
from modeconn.kuditipudi.lemma2 import end_at, lemma2
from modeconn.kuditipudi.narrow import narrow_widths, placed, placement, theta_star
from modeconn.kuditipudi.resample import check_draw_options, copies_info, draw_dropout, settings_info
from modeconn.params.path import PiecewiseLinearPath, check_endpoints
from modeconn.paths.noise import DROPOUT, dropout_copies_certificate, lemma2_part
from modeconn.units import UnitSpec, infer

__all__ = ["narrow_path", "check_narrow_options"]


def check_narrow_options(p: float, width=None, max_tries: int = 50, check_points: int = 11,
                         tolerance: float | None = None, **_) -> None:
    """:func:`narrow_path`'s option checks that need no model (the CLI runs them on a config before any
    training); the widths are checked against the model's by :func:`~modeconn.kuditipudi.narrow.narrow_widths`."""
    if not (isinstance(p, numbers.Real) and not isinstance(p, bool)):
        raise ValueError(f"p must be a number in (0, 1); got {p!r}")
    check_draw_options(float(p), max_tries, check_points, tolerance)
    widths = [width] if isinstance(width, numbers.Number) else ([] if width is None else list(width))
    if any(isinstance(w, bool) or not isinstance(w, numbers.Real) or w != int(w) or w < 1 for w in widths):
        raise ValueError(f"width must be None, a positive whole number of units or one per hidden layer; got {width!r}")


def narrow_path(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], data,
                p: float = 0.75, width=None, seed: int = 0, *, trainer=None, narrow_model: nn.Module | None = None,
                checkpoint_path: str | os.PathLike | None = None, device=None, progress: bool = True,
                max_tries: int = 50, tolerance: float | None = None, check_points: int = 11,
                max_items: int | None = None, batch_size: int = 2048,
                knots: str | Sequence[float] | None = None,
                spec: UnitSpec | None = None) -> PiecewiseLinearPath:
    """Theorem 3's path from ``theta_a`` to ``theta_b`` through a trained narrow network (module docstring).

    ``p``: Algorithm 1's drop probability for both dropout copies; ``width``: the narrow hidden width h*
    (one int, or one per hidden layer; default the largest allowed, floor(p h / 1.5)); Theorem 3 needs
    ``p >= 1.5 max(h*/h)``. theta*:

    * ``narrow_model=None`` (default): a fresh initialisation of ``model`` (``reset_parameters`` under
      ``torch.manual_seed(seed)``) restricted to units 0..h*-1 of every hidden layer (every other unit's rows
      and columns zero; the kept incoming weights scaled by sqrt(h/h*), a width-h* layer's fan-in), trained
      by :func:`modeconn.training.train.train` with the other units' gradients masked, so they stay exactly zero;
    * ``narrow_model``: the same architecture built with hidden widths h* (untrained; its initialisation is
      used), trained by :func:`~modeconn.training.train.train`, then embedded as units 0..h*-1.

    ``trainer``: a :class:`~modeconn.training.train.TrainConfig` or a mapping of its fields (default
    :func:`default_narrow_trainer`; device defaults to the path's). ``checkpoint_path``: where theta* is
    checkpointed (the trainer's atomic checkpoint + JSON sidecar, resumable); a finished one is reused
    without retraining (a checkpoint made for other widths raises ``ValueError``). The dropout copies
    are drawn as in :func:`noise_path` (``seed`` for A, ``seed + 1`` for B; ``max_tries``, ``tolerance``,
    ``check_points``), here until at least h* units of every hidden layer are dropped.

    ``path.bound`` is None; ``info`` holds ``loss_a``, ``loss_b``, ``loss_a1``, ``loss_b1``, ``loss_star``
    (L(theta*) on ``data``), ``theta_star`` (widths, training metrics, checkpoint, ``reused``),
    ``placement`` (theta*'s units in the wide network), the dropout draws, ``lemma2_max`` (one per
    Lemma 2; the certificate holds each part's exact bound), ``max_loss`` and per-segment maxima.
    """
    check_narrow_options(p=p, width=width, max_tries=max_tries, check_points=check_points, tolerance=tolerance)
    check_endpoints(theta_a, theta_b, model, data)
    p = float(p)
    problem, a, b = prepare_endpoints(model, theta_a, theta_b, data, max_items, batch_size, device, spec)
    chain = problem.chain
    if width is None and narrow_model is not None:
        width = list(Chain.from_spec(infer(copy.deepcopy(narrow_model).to(problem.device).eval(),
                                           problem.x[:2])).sizes)
    widths = narrow_widths(chain.sizes, p, width)

    star, star_info = theta_star(model, data, widths, seed, trainer, narrow_model, checkpoint_path, progress,
                                 problem)
    loss_star = star_info["loss"]
    loss_a, loss_b = problem.loss(a), problem.loss(b)
    da = draw_dropout(problem, a, loss_a, p, widths, seed, max_tries, tolerance, check_points, "narrow_path (theta_a)")
    db = draw_dropout(problem, b, loss_b, p, widths, int(seed) + 1, max_tries, tolerance, check_points,
                       "narrow_path (theta_b)")

    place = placement(da.kept, db.kept, widths, chain.sizes)
    star_p = placed(chain, star, place)

    mid1, lab1 = lemma2(chain, da.theta1, da.kept, star_p, place)
    mid1, lab1, end1 = end_at(chain, mid1, lab1, star_p, place)
    mid2, lab2 = lemma2(chain, star_p, place, db.theta1, db.kept)
    mid2, lab2, end2 = end_at(chain, mid2, lab2, db.theta1, db.kept)
    knot1, seg1, ev1 = measure_segments(problem, mid1, lab1, {0: da.loss1, len(mid1) - 1: loss_star}, check_points)
    knot2, seg2, ev2 = measure_segments(problem, mid2, lab2, {0: loss_star, len(mid2) - 1: db.loss1}, check_points)

    waypoints = [a] + mid1[:-1] + [star_p] + mid2[1:] + [b]
    labels = [DROPOUT] + lab1 + lab2 + [DROPOUT]
    path = PiecewiseLinearPath(waypoints, knots=knots, labels=labels)
    path.name = "narrow"

    permuted = [bool(set(P.tolist()) & set(k.tolist())) for P, k in zip(place, da.kept)]
    extra = (end1 == "extra segment") + (end2 == "extra segment")
    segment_max = [da.segment_max] + seg1 + seg2 + [db.segment_max]
    k = len(mid1)  # the segment that starts at pi(theta*)
    parts = [lemma2_part("the Lemma 2 segments theta_a,1 -> pi(theta*)", 1, k,
                          {"L(theta_a,1)": da.loss1, "L(theta*)": loss_star}, max(seg1)),
             lemma2_part("the Lemma 2 segments pi(theta*) -> theta_b,1", k, len(labels) - 1,
                          {"L(theta*)": loss_star, "L(theta_b,1)": db.loss1}, max(seg2))]
    path.certify(dropout_copies_certificate(
        "Kuditipudi et al. 2019, Theorem 3 (through a narrow network)",
        "max(L(theta_a) + O~(sqrt(p) eps), L(theta_b) + O~(sqrt(p) eps), L(theta*))", len(labels), len(problem.y),
        parts, da, db))
    path.info.update({
        "construction": "Kuditipudi et al. 2019, Theorem 3 (through a narrow network)",
        **settings_info(p, seed, tolerance, check_points, problem),
        "widths": list(widths),
        "required_p": max(1.5 * hs / h for hs, h in zip(widths, chain.sizes)),
        "loss_a": loss_a,
        "loss_b": loss_b,
        "loss_a1": da.loss1,
        "loss_b1": db.loss1,
        "loss_star": loss_star,
        "theta_star": star_info,
        "placement": [P.tolist() for P in place],
        **copies_info(da, db),
        "lemma2_max": [max(seg1), max(seg2)],
        "max_loss": max(segment_max),
        "max_loss_minus_endpoints": max(segment_max) - max(loss_a, loss_b),
        "segment_max": segment_max,
        "knot_losses": [loss_a] + knot1 + knot2[1:] + [loss_b],
        "star_knot": 1 + len(mid1) - 1,
        "permuted_layers": permuted,
        "lemma2_end": [end1, end2],
        "segments": {"dropout_a": 1, "lemma2_a": len(lab1), "lemma2_b": len(lab2), "dropout_b": 1},
        "num_segments": len(labels),
        "expected_segments": (11 if any(permuted) else 8) + extra,
        "paper_segments": 13,
        "folded_batchnorm": problem.folded,
    })
    if problem.folded:
        path.model = problem.module
    return path
