"""Kuditipudi et al. (2019), Theorems 2 and 3: paths between two noise-stable networks.

Theorem 2 (:func:`noise_path`)::

    theta_A --1--> theta_A,1 --Lemma 2 (+ Lemma 4)--> theta_B,1 --1--> theta_B

theta_X,1 is an Algorithm 1 copy of theta_X (:func:`modeconn.stability.dropout_mask.random_dropout`: each
hidden unit dropped independently with probability ``p``, its outgoing columns zeroed, every kept unit's
outgoing columns scaled by 1/(1-p)). The first and last segments are straight lines from each network to
its copy ("dropout interpolation"): only noise stability (Lemma 3) says they stay low, so the copy is
*resampled*: draws are made until every hidden layer has at least ceil(h/2) dropped units (so that Lemma 2
applies: the kept units are at most floor(h/2)) and the segment's maximum loss, measured at
``check_points`` evenly spaced points, is at most L(theta_X) + ``tolerance``; without a tolerance, or when
no draw meets it, the draw with the lowest measured segment maximum among ``max_tries`` is used (draws
that cannot beat the best so far are abandoned early, so this costs about one loss evaluation per draw).

Algorithm 1 zeroes only columns: the dropped units' rows (incoming weights, bias) stay. Lemma 2's first
segment zeroes them on A's side (no extra segment). On B's side Lemma 2 ends in theta_B,1's kept
subnetwork with the dropped rows zero; its last segment only changes rows of units that cannot reach the
output, so that segment is made to end at theta_B,1 itself (its dropped rows restored, loss still
constant) - verified, and otherwise (never expected) done by one extra "free-unit rewiring" segment.

Theorem 3 (:func:`narrow_path`)::

    theta_A --1--> theta_A,1 --Lemma 2 (+ Lemma 4)--> pi(theta*) --Lemma 2 (no permutation)--> theta_B,1 --1--> theta_B

theta* is a narrow network of hidden widths h*_i <= p h_i / 1.5, trained by :func:`modeconn.train.train`
and embedded in the wide architecture (every other unit zero); pi places its units on units dropped in
theta_B,1 (preferring units dropped in theta_A,1 as well). The dropout copies are resampled as above,
here until at least h*_i units of every layer are dropped.

Segment counts. The paper counts Lemma 2 as 8 segments (3 + Lemma 4's general 5), so 10 for Theorem 2
and 13 (1 + 8 + 3 + 1) for Theorem 3. :func:`~modeconn.paths.moves.lemma2` writes the second network into
slots from which Lemma 4 needs only 3 segments, and none when the kept sets are disjoint in every layer
(see :mod:`modeconn.paths.dropout`); segments that would move nothing are not emitted. Hence

* :func:`noise_path`: **8** segments (1 + 3 + 3 + 1), or **5** when theta_A,1's and theta_B,1's kept sets
  are disjoint in every layer;
* :func:`narrow_path`: **11** segments (1 + 6 + 3 + 1), or **8** when theta*'s units can be placed on units
  dropped in both copies in every layer (often so for p = 3/4).

``path.info["expected_segments"]`` states the count for the path at hand; ``paper_segments`` the paper's.

Loss bounds. Theorem 2's bound max(L_A, L_B) + O~(epsilon) and Theorem 3's max(L_A + O~(sqrt(p) eps),
L_B + O~(sqrt(p) eps), L(theta*)) hide constants and log factors, so ``path.bound`` is ``None``. What
*is* exact: every Lemma 2 segment is either at constant loss (free-unit rewiring, permutation) or an
output-layer interpolation between networks computing theta_A,1 / theta*/ theta_B,1, so the Lemma 2 part
stays below ``info["lemma2_bound"]`` = max(L(theta_A,1), L(theta_B,1)) (Theorem 3: one such bound per
Lemma 2). ``info`` reports the measured pieces: the endpoints' losses, L(theta_X,1), L(theta*), each dropout
segment's measured maximum, each Lemma 2 part's, and ``max_loss``, the largest of them.

Models: plain feed-forward chains of hidden layers (MLPs, conv nets with channels as units, pooling and
flatten allowed, ``nn.Sequential``s); residual models raise
:class:`~modeconn.paths.moves.UnsupportedArchitectureError`. BatchNorm after a Conv/Linear is folded first,
as in :func:`modeconn.paths.dropout.dropout_path`: the path then lives in ``path.model`` (the folded
module), ``info["folded_batchnorm"]`` is True and the endpoints are the folded theta_a and theta_b.
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from modeconn.checkpoint import read_meta
from modeconn.data import resolve_device
from modeconn.paths.base import PiecewiseLinearPath
from modeconn.paths.moves import (
    OUTPUT,
    PERMUTE,
    REWIRE,
    Chain,
    check_half_zero,
    complement,
    lemma2,
    states_equal,
    zero_rows,
)
from modeconn.stability.dropout_mask import random_dropout
from modeconn.train import TrainConfig, train
from modeconn.units import infer, unit_slices

if TYPE_CHECKING:
    from modeconn.stability.dropout import ChainLoss

__all__ = ["noise_path", "narrow_path", "narrow_widths", "default_narrow_trainer", "DROPOUT", "LABELS"]

State = dict[str, Tensor]

DROPOUT = "dropout interpolation"
LABELS = (DROPOUT, OUTPUT, REWIRE, PERMUTE)


# ============================================================================== resampled dropout copies

@dataclass
class _Draw:
    """The Algorithm 1 copy a path uses, and how it was found."""

    theta1: State
    dropped: list[Tensor]
    kept: list[Tensor]
    seed: int
    tries: int                      # draws made
    accepted_try: int               # 0-based index of the draw used
    valid_tries: int                # draws with enough dropped units in every layer
    segment_losses: list[float]     # L at each of the check points (t = 0 ... 1) of the chosen draw
    tolerance_met: bool | None      # None without a tolerance
    evaluations: int                # loss evaluations spent
    draw_log: list[dict] = field(default_factory=list)

    @property
    def segment_max(self) -> float:
        return max(self.segment_losses)

    @property
    def loss1(self) -> float:
        return self.segment_losses[-1]

    def to_info(self) -> dict:
        return {
            "seed": self.seed, "tries": self.tries, "accepted_try": self.accepted_try,
            "valid_tries": self.valid_tries, "segment_max": self.segment_max, "loss": self.loss1,
            "segment_losses": self.segment_losses, "tolerance_met": self.tolerance_met,
            "dropped_counts": [len(d) for d in self.dropped], "kept_counts": [len(k) for k in self.kept],
            "dropped": [d.tolist() for d in self.dropped], "evaluations": self.evaluations,
            "draws": self.draw_log,
        }


def _lerp(a: Mapping[str, Tensor], b: Mapping[str, Tensor], t: float) -> State:
    """The point at ``t`` of the straight segment a -> b, computed as the path computes it."""
    if t == 0.0:
        return dict(a)
    if t == 1.0:
        return dict(b)
    return {k: torch.lerp(a[k], b[k], t) for k in a}


def _draw_dropout(problem: ChainLoss, theta: State, loss0: float, p: float, need: Sequence[int], seed: int,
                  max_tries: int, tolerance: float | None, check_points: int, what: str) -> _Draw:
    """Algorithm 1 copies of ``theta`` drawn from ``torch.Generator().manual_seed(seed)`` until one drops at
    least ``need[g]`` units of every hidden layer and its segment stays within ``loss0 + tolerance`` (or,
    failing that, the valid draw of ``max_tries`` with the lowest segment maximum)."""
    chain = problem.chain
    gen = torch.Generator().manual_seed(int(seed))
    ts = [i / (check_points - 1) for i in range(check_points)]
    order = [len(ts) - 1] + list(range(1, len(ts) - 1))  # the copy itself first: usually the maximum
    accept_at = None if tolerance is None else loss0 + float(tolerance)
    best = None  # (segment max, try index, theta1, dropped, losses)
    valid = evaluations = 0
    log: list[dict] = []
    accepted = None
    for i in range(int(max_tries)):
        theta1, dropped = random_dropout(chain.spec, theta, p, generator=gen)
        drop = [dropped[name] for name in chain.names]
        counts = [len(d) for d in drop]
        entry: dict = {"dropped_counts": counts}
        log.append(entry)
        if any(c < n for c, n in zip(counts, need)):
            entry["status"] = "too few dropped units"
            continue
        valid += 1
        limit = best[0] if best is not None else math.inf
        losses = [math.nan] * len(ts)
        losses[0] = loss0
        running, abandoned = loss0, False
        for j in order:
            value = problem.loss(_lerp(theta, theta1, ts[j]))
            losses[j] = value if math.isfinite(value) else math.inf  # a diverged copy never wins
            evaluations += 1
            running = max(running, losses[j])
            if j == order[0]:
                entry["loss"] = losses[j]
            if running >= limit and (accept_at is None or running > accept_at):  # can neither win nor pass
                abandoned = True
                break
        entry["segment_max" if not abandoned else "segment_max_at_least"] = running
        entry["status"] = "abandoned" if abandoned else "measured"
        if abandoned:
            continue
        if best is None or running < best[0]:
            best = (running, i, theta1, drop, losses)
        if accept_at is not None and running <= accept_at:
            accepted = best = (running, i, theta1, drop, losses)
            entry["status"] = "accepted"
            break
    if best is None:
        raise ValueError(
            f"{what}: none of {max_tries} Algorithm 1 draws with p = {p} dropped at least {list(need)} units of the "
            f"hidden layers {list(chain.names)} (sizes {list(chain.sizes)}); the last draw dropped "
            f"{log[-1]['dropped_counts'] if log else []}. Raise p or max_tries.")
    _, i, theta1, drop, losses = best
    if accepted is None:
        log[i]["status"] = "best"
    kept = [complement(d, n) for d, n in zip(drop, chain.sizes)]
    return _Draw(theta1=theta1, dropped=drop, kept=kept, seed=int(seed), tries=len(log), accepted_try=i,
                 valid_tries=valid, segment_losses=[float(x) for x in losses],
                 tolerance_met=None if tolerance is None else accepted is not None, evaluations=evaluations,
                 draw_log=log)


# ============================================================================== Lemma 2 helpers

def _kept_only(chain: Chain, state: Mapping[str, Tensor], kept: Sequence[Tensor]) -> State:
    """``state`` with the rows of every unit outside ``kept`` zeroed."""
    out = dict(state)
    for g, n in enumerate(chain.sizes):
        out = zero_rows(out, chain, g, complement(kept[g], n))
    return out


def _end_at(chain: Chain, states: list[State], labels: list[str], target: State, kept: Sequence[Tensor]
            ) -> tuple[list[State], list[str], str]:
    """Make a Lemma 2 run that ends in ``target``'s kept subnetwork end in ``target`` itself.

    If ``states[-2]`` and ``target`` both let only the ``kept`` units reach the output and agree on
    everything but the rows of the other units, the straight segment between them keeps the function
    (linear conditions that hold at both ends hold along it): the last state is replaced by ``target``
    ("merged"). Otherwise one free-unit rewiring segment to ``target`` is appended ("extra segment"),
    after the same check between ``states[-1]`` and ``target``."""
    if states_equal(states[-1], target):
        return states, labels, "exact"
    check_half_zero(chain, target, kept, "the Lemma 2 target")
    masked = _kept_only(chain, target, kept)
    for where, state in (("merged", states[-2]), ("extra segment", states[-1])):
        try:
            check_half_zero(chain, state, kept)
        except ValueError:
            continue
        if states_equal(_kept_only(chain, state, kept), masked):
            if where == "merged":
                return states[:-1] + [target], labels, where
            return states + [target], labels + [REWIRE], where
    raise RuntimeError("internal error: Lemma 2 did not end in the target's kept subnetwork")


def _measure(problem: ChainLoss, states: Sequence[State], labels: Sequence[str], known: Mapping[int, float],
             check_points: int) -> tuple[list[float], list[float], int]:
    """Loss at every state and the measured maximum of every segment: constant segments are their ends'
    loss; output-layer segments are also evaluated at ``check_points - 2`` interior points."""
    knot = [known[i] if i in known else problem.loss(states[i]) for i in range(len(states))]
    evaluations = len(states) - len(known)
    seg = []
    for i, label in enumerate(labels):
        m = max(knot[i], knot[i + 1])
        if label == OUTPUT:
            for j in range(1, check_points - 1):
                m = max(m, problem.loss(_lerp(states[i], states[i + 1], j / (check_points - 1))))
                evaluations += 1
        seg.append(m)
    return knot, seg, evaluations


# ============================================================================== shared set-up

def _check_common(p: float, max_tries: int, check_points: int, tolerance) -> None:
    if not (isinstance(max_tries, int) and not isinstance(max_tries, bool) and max_tries >= 1):
        raise ValueError(f"max_tries must be a positive integer, got {max_tries!r}")
    if not (isinstance(check_points, int) and not isinstance(check_points, bool) and check_points >= 2):
        raise ValueError(f"check_points must be an integer >= 2 (t = 0 and 1 included), got {check_points!r}")
    if tolerance is not None and not (float(tolerance) >= 0):
        raise ValueError(f"tolerance must be None or a number >= 0, got {tolerance!r}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1) (Algorithm 1 scales kept units by 1/(1-p)); got {p}")


def _setup(model, theta_a, theta_b, data, max_items, batch_size, device):
    # imported here: modeconn.stability.dropout imports modeconn.paths, which may export this module
    from modeconn.stability.dropout import prepare_endpoints

    problem, a, b = prepare_endpoints(model, theta_a, theta_b, data, max_items, batch_size, device)
    return problem, problem.chain, a, b


def _run_info(p, seed, tolerance, check_points, problem, chain) -> dict:
    """The settings and chain facts both constructions report."""
    return {"p": p, "seed": int(seed), "tolerance": tolerance, "check_points": check_points,
            "bound_items": len(problem.y), "groups": list(chain.names), "sizes": list(chain.sizes),
            "hidden_layers": chain.depth}


def _draw_info(da, db) -> dict:
    """Both endpoints' dropout copies: the draws, kept units and the measured maxima of their segments."""
    return {"dropout_a": da.to_info(), "dropout_b": db.to_info(),
            "kept_a": [k.tolist() for k in da.kept], "kept_b": [k.tolist() for k in db.kept],
            "dropout_a_max": da.segment_max, "dropout_b_max": db.segment_max}


def _finish(path: PiecewiseLinearPath, problem: ChainLoss) -> PiecewiseLinearPath:
    path.bound = None
    if problem.folded:
        path.model = problem.module
    return path


# ============================================================================== Theorem 2

def noise_path(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], data,
               p: float = 0.75, seed: int = 0, *, max_tries: int = 50, tolerance: float | None = None,
               check_points: int = 11, max_items: int | None = None, batch_size: int = 2048, device=None,
               knots: str | Sequence[float] | None = None) -> PiecewiseLinearPath:
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

    Returns a :class:`PiecewiseLinearPath` with ``path(0)`` / ``path(1)`` exactly the (BatchNorm-folded)
    endpoints, one label per segment (``"dropout interpolation"``, ``"free-unit rewiring"``,
    ``"output-layer interpolation"``, ``"permutation"``), ``bound = None`` and the measured pieces in
    ``info`` (``loss_a``, ``loss_b``, ``loss_a1``, ``loss_b1``, ``dropout_a`` / ``dropout_b`` (the draws),
    ``lemma2_bound``, ``lemma2_max``, ``max_loss``, ``segment_max``, ``knot_losses``, segment counts).
    """
    p = float(p)
    _check_common(p, max_tries, check_points, tolerance)
    if p < 0.5:
        raise ValueError(
            f"noise_path needs p >= 1/2 (got p = {p}): Lemma 2 connects the two dropout copies only when at least "
            "half of every hidden layer's units are dropped (free), and Algorithm 1 drops about a fraction p of "
            "them. For a smaller p use narrow_path (Theorem 3), which passes through a narrow network instead.")
    problem, chain, a, b = _setup(model, theta_a, theta_b, data, max_items, batch_size, device)
    need = [(n + 1) // 2 for n in chain.sizes]
    loss_a, loss_b = problem.loss(a), problem.loss(b)
    da = _draw_dropout(problem, a, loss_a, p, need, seed, max_tries, tolerance, check_points, "noise_path (theta_a)")
    db = _draw_dropout(problem, b, loss_b, p, need, int(seed) + 1, max_tries, tolerance, check_points,
                       "noise_path (theta_b)")

    mid, mid_labels = lemma2(chain, da.theta1, da.kept, db.theta1, db.kept)
    mid, mid_labels, end_mode = _end_at(chain, mid, mid_labels, db.theta1, db.kept)
    knot, seg, evals = _measure(problem, mid, mid_labels, {0: da.loss1, len(mid) - 1: db.loss1}, check_points)

    waypoints = [a] + mid + [b]
    labels = [DROPOUT] + mid_labels + [DROPOUT]
    path = PiecewiseLinearPath(waypoints, knots=knots, labels=labels)
    path.name = "noise"

    disjoint = [not (set(x.tolist()) & set(y.tolist())) for x, y in zip(da.kept, db.kept)]
    lemma4 = sum(1 for lab in mid_labels if lab == PERMUTE)
    lemma2_bound = max(da.loss1, db.loss1)
    segment_max = [da.segment_max] + seg + [db.segment_max]
    path.info = {
        "construction": "Kuditipudi et al. 2019, Theorem 2 (noise stability)",
        "bound": None,
        "bound_formula": "max(L(theta_a), L(theta_b)) + O~(epsilon) (constants and log factors not computable)",
        **_run_info(p, seed, tolerance, check_points, problem, chain),
        "required_dropped": need,
        "loss_a": loss_a,
        "loss_b": loss_b,
        "loss_a1": da.loss1,
        "loss_b1": db.loss1,
        **_draw_info(da, db),
        "lemma2_bound": lemma2_bound,
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
    }
    return _finish(path, problem)


# ============================================================================== Theorem 3: the narrow network

def narrow_widths(sizes: Sequence[int], p: float, width=None) -> list[int]:
    """Theorem 3's narrow widths h*: ``width`` (one int for every hidden layer, or one per layer), or by
    default the largest allowed, ``floor(p * h / 1.5)`` (at least 1). Raises ``ValueError`` unless
    ``1 <= h* <= h`` and ``1.5 * max(h*/h) <= p``."""
    sizes = [int(n) for n in sizes]
    if width is None:
        widths = [max(1, math.floor(p * n / 1.5 + 1e-9)) for n in sizes]
    elif isinstance(width, (int, float)) and not isinstance(width, bool):
        if width != int(width):
            raise ValueError(f"width must be a whole number of units, got {width!r}")
        widths = [int(width)] * len(sizes)
    else:
        widths = [int(w) for w in width]
        if len(widths) != len(sizes):
            raise ValueError(f"width: need one narrow width per hidden layer ({len(sizes)}), got {len(widths)}")
    for h_star, h in zip(widths, sizes):
        if not 1 <= h_star <= h:
            raise ValueError(f"narrow width {h_star} must lie in 1..{h} (hidden widths {sizes})")
    worst = max(1.5 * hs / h for hs, h in zip(widths, sizes))
    if worst > p + 1e-9:
        raise ValueError(
            f"Theorem 3 needs p >= 1.5 * max(h*/h) = {worst:.4g} for narrow widths {widths} in hidden layers "
            f"{sizes} (got p = {p}): the dropout copies must free at least h* units of every layer. "
            "Raise p or lower width.")
    return widths


def default_narrow_trainer() -> TrainConfig:
    """The trainer :func:`narrow_path` uses for theta* by default: SGD (momentum 0.9), lr 0.05, cosine
    schedule, 30 epochs of batch 64, weight decay 1e-4 (on digits, CPU: seconds for the conv nets, about
    half a minute for the default (256, 256) MLP, whose full width the masked training still computes)."""
    return TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, epochs=30, batch_size=64,
                       schedule="cosine")


def _trainer_config(trainer, device: torch.device) -> TrainConfig:
    if trainer is None:
        cfg = default_narrow_trainer()
        cfg.device = str(device)
    elif isinstance(trainer, TrainConfig):
        cfg = copy.deepcopy(trainer)
    elif isinstance(trainer, Mapping):
        d = dict(trainer)
        d.setdefault("device", str(device))
        cfg = TrainConfig.from_dict(d)
    else:
        raise TypeError(f"trainer must be None, a TrainConfig or a mapping of its fields; got {type(trainer).__name__}")
    return cfg.validate()


def _unit_masks(chain: Chain, params: Mapping[str, Tensor], support: Sequence[Tensor]) -> dict[str, Tensor]:
    """Per parameter touched by a hidden group: 1 where every unit axis of the entry is in ``support``."""
    masks: dict[str, Tensor] = {}
    for g, n in enumerate(chain.sizes):
        for ax in (*chain.rows[g], *chain.cols[g]):
            if ax.name not in params:
                continue  # a buffer (BatchNorm statistics): not trained
            t = params[ax.name]
            ind = torch.zeros(t.shape[ax.axis], dtype=t.dtype, device=t.device)
            ind[unit_slices(ax, support[g], n).to(t.device)] = 1
            shape = [1] * t.dim()
            shape[ax.axis] = -1
            masks[ax.name] = masks.get(ax.name, torch.ones_like(t)) * ind.reshape(shape)
    return masks


def _outside_support(chain: Chain, state: Mapping[str, Tensor], support: Sequence[Tensor]) -> list[str]:
    """The tensors of ``state`` with a non-zero entry for a unit outside ``support`` (rows or columns)."""
    bad = []
    for g, n in enumerate(chain.sizes):
        rest = complement(support[g], n)
        if not len(rest):
            continue
        for ax in (*chain.rows[g], *chain.cols[g]):
            if ax.name not in state:
                continue
            t = state[ax.name]
            sub = t.index_select(ax.axis, unit_slices(ax, rest, n).to(t.device))
            if sub.numel() and bool((sub != 0).any()):
                bad.append(f"{ax.name} (units of {chain.names[g]!r})")
    return bad


def _embed(wide: Mapping[str, Tensor], narrow: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The narrow state written into the leading entries of every axis of the wide state (zeros elsewhere):
    narrow unit i of every hidden layer becomes wide unit i (blocks of a flatten included, since a unit's
    block is contiguous)."""
    if set(wide) != set(narrow):
        missing, extra = sorted(set(wide) - set(narrow)), sorted(set(narrow) - set(wide))
        raise ValueError(f"narrow_model's state dict keys differ from the model's (missing {missing[:5]}, "
                         f"extra {extra[:5]})")
    out = {}
    for k, w in wide.items():
        t = narrow[k]
        if t.dim() != w.dim() or any(a > b for a, b in zip(t.shape, w.shape)):
            raise ValueError(f"narrow_model's {k!r} has shape {tuple(t.shape)}, which does not fit in the "
                             f"model's {tuple(w.shape)}")
        if t.dim() == 0 or not w.is_floating_point():
            out[k] = t.to(w.device, w.dtype).clone() if t.shape == w.shape else w.clone()
            continue
        z = torch.zeros_like(w)
        z[tuple(slice(0, s) for s in t.shape)] = t.to(w.device, w.dtype)
        out[k] = z
    return out


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()


def _narrow_network(model: nn.Module, data, widths: list[int], seed: int, trainer, narrow_model: nn.Module | None,
                    checkpoint_path, progress: bool, problem: ChainLoss) -> tuple[dict[str, Tensor], dict]:
    """theta* as a state dict of (the unfolded) ``model``, non-zero only on units 0..h*-1 of every hidden
    layer, and facts about it. Trained with :func:`modeconn.train.train` (checkpointed, reused)."""
    cfg = _trainer_config(trainer, problem.device)
    mode = "masked" if narrow_model is None else "narrow_model"
    expect = {"widths": list(widths), "mode": mode}
    ckpt = os.fspath(checkpoint_path) if checkpoint_path is not None else None
    reused = False
    if ckpt is not None:
        saved = read_meta(ckpt)
        if saved is not None and saved.get("finished"):
            have = saved.get("narrow")
            if have != expect:
                raise ValueError(f"narrow network checkpoint {ckpt} holds {have}, not the requested {expect}. Use "
                                 "another checkpoint_path, or delete the file to retrain.")
            reused = True
    dev = resolve_device(cfg.device)  # where the trainer will put the network
    example = problem.x[:2].to(dev)
    meta = {"narrow": expect, "construction": "Kuditipudi et al. 2019, Theorem 3: theta*"}

    if narrow_model is None:
        # Train a copy of the wide model restricted to units 0..h*-1 of every hidden layer: fresh init
        # (reset_parameters under seed), every entry touching another unit zeroed, and those entries' gradients
        # masked to zero. With zero gradients SGD (momentum, weight decay) and Adam leave a zero parameter at
        # exactly zero, so the other units stay zero throughout - for any activation and with BatchNorm.
        net = copy.deepcopy(model).to(dev)
        torch.manual_seed(int(seed))
        _reset(net)
        spec = infer(net.eval(), example)
        chain = Chain.from_spec(spec)
        if list(chain.sizes) != list(problem.chain.sizes):
            raise RuntimeError("internal error: the model's hidden layers differ before and after BatchNorm folding")
        support = [torch.arange(h) for h in widths]
        params = dict(net.named_parameters())
        masks = _unit_masks(chain, params, support)
        with torch.no_grad():
            for k, m in masks.items():
                params[k].mul_(m)
            for g in range(chain.depth):  # incoming weights at the fan-in scale of a width-h* layer
                factor = math.sqrt(chain.sizes[g] / widths[g])
                for ax in chain.cols[g]:
                    if ax.name in params:
                        params[ax.name].mul_(factor)
        hooks = [params[k].register_hook(lambda grad, m=m: grad * m) for k, m in masks.items()]
        try:
            metrics = train(net, data, cfg, int(seed), checkpoint_path=ckpt, meta=meta, progress=progress)
        finally:
            for h in hooks:
                h.remove()
        state = {k: v.detach() for k, v in net.state_dict().items()}
        bad = _outside_support(chain, {k: v for k, v in state.items() if k in params}, support)
        if bad:
            raise RuntimeError(f"internal error: masked training changed units outside the narrow network: {bad[:3]}")
        source = "masked training of the wide model (units 0..h*-1)"
    else:
        net = copy.deepcopy(narrow_model).to(dev)
        narrow_chain = Chain.from_spec(infer(net.eval(), example))
        got = list(narrow_chain.sizes)
        if len(got) != len(widths):
            raise ValueError(f"narrow_model has {len(got)} hidden layers, the model {len(widths)}")
        if got != list(widths):
            raise ValueError(f"narrow_model's hidden widths {got} differ from the narrow widths {widths} "
                             "(pass width=None to use the narrow model's, or a matching width)")
        metrics = train(net, data, cfg, int(seed), checkpoint_path=ckpt, meta=meta, progress=progress)
        net.eval()
        state = _embed(model.state_dict(), net.state_dict())
        wide = copy.deepcopy(model).to(dev).eval()
        wide.load_state_dict(state)
        with torch.no_grad():  # the embedding computes the narrow network's function
            x = problem.x[:64].to(dev)
            want, have = net(x), wide(x)
        if not torch.allclose(want, have, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max()))):
            raise ValueError("narrow_model does not embed in the model as a prefix of every hidden layer (the "
                             "embedded network computes another function): build it with the same architecture "
                             "and smaller hidden widths")
        source = "narrow_model, trained and embedded (units 0..h*-1)"
    info = {"widths": list(widths), "source": source, "train_metrics": dict(metrics), "trainer": cfg.to_dict(),
            "seed": int(seed), "checkpoint": ckpt, "reused": reused}
    return state, info


def _placement(kept_a: Sequence[Tensor], kept_b: Sequence[Tensor], widths: Sequence[int], sizes: Sequence[int]
               ) -> list[Tensor]:
    """Where theta*'s units go: units dropped in theta_B,1 (so the second Lemma 2 needs no permutation),
    those also dropped in theta_A,1 first (so the first needs none where that suffices)."""
    out = []
    for ka, kb, h_star, n in zip(kept_a, kept_b, widths, sizes):
        sa = set(ka.tolist())
        free_b = complement(kb, n).tolist()
        order = [u for u in free_b if u not in sa] + [u for u in free_b if u in sa]
        if len(order) < h_star:
            raise RuntimeError("internal error: too few units dropped in theta_B,1 for the narrow network")
        out.append(torch.tensor(sorted(order[:h_star]), dtype=torch.long))
    return out


def narrow_path(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], data,
                p: float = 0.75, width=None, seed: int = 0, *, trainer=None, narrow_model: nn.Module | None = None,
                checkpoint_path: str | os.PathLike | None = None, device=None, progress: bool = True,
                max_tries: int = 50, tolerance: float | None = None, check_points: int = 11,
                max_items: int | None = None, batch_size: int = 2048,
                knots: str | Sequence[float] | None = None) -> PiecewiseLinearPath:
    """Theorem 3's path from ``theta_a`` to ``theta_b`` through a trained narrow network (module docstring).

    ``p``: Algorithm 1's drop probability for both dropout copies; ``width``: the narrow hidden width h*
    (one int, or one per hidden layer; default the largest allowed, floor(p h / 1.5)); Theorem 3 needs
    ``p >= 1.5 max(h*/h)``. theta*:

    * ``narrow_model=None`` (default): a fresh initialisation of ``model`` (``reset_parameters`` under
      ``torch.manual_seed(seed)``) restricted to units 0..h*-1 of every hidden layer (every other unit's rows
      and columns zero; the kept incoming weights scaled by sqrt(h/h*), a width-h* layer's fan-in), trained
      by :func:`modeconn.train.train` with the other units' gradients masked, so they stay exactly zero;
    * ``narrow_model``: the same architecture built with hidden widths h* (untrained; its initialisation is
      used), trained by :func:`~modeconn.train.train`, then embedded as units 0..h*-1.

    ``trainer``: a :class:`~modeconn.train.TrainConfig` or a mapping of its fields (default
    :func:`default_narrow_trainer`; device defaults to the path's). ``checkpoint_path``: where theta* is
    checkpointed (the trainer's atomic checkpoint + JSON sidecar, resumable); a finished one is reused
    without retraining (a checkpoint made for other widths raises ``ValueError``). The dropout copies
    are drawn as in :func:`noise_path` (``seed`` for A, ``seed + 1`` for B; ``max_tries``, ``tolerance``,
    ``check_points``), here until at least h* units of every hidden layer are dropped.

    ``path.bound`` is None; ``info`` holds ``loss_a``, ``loss_b``, ``loss_a1``, ``loss_b1``, ``loss_star``
    (L(theta*) on ``data``), ``theta_star`` (widths, training metrics, checkpoint, ``reused``),
    ``placement`` (theta*'s units in the wide network), the dropout draws, ``lemma2_bounds`` /
    ``lemma2_max`` (one per Lemma 2), ``max_loss`` and per-segment maxima.
    """
    p = float(p)
    _check_common(p, max_tries, check_points, tolerance)
    problem, chain, a, b = _setup(model, theta_a, theta_b, data, max_items, batch_size, device)
    if width is None and narrow_model is not None:
        width = list(Chain.from_spec(infer(copy.deepcopy(narrow_model).to(problem.device).eval(),
                                           problem.x[:2])).sizes)
    widths = narrow_widths(chain.sizes, p, width)

    raw, star_info = _narrow_network(model, data, widths, seed, trainer, narrow_model, checkpoint_path, progress,
                                     problem)
    star = problem.prepare(model, raw)
    support = [torch.arange(h) for h in widths]
    bad = _outside_support(chain, star, support)
    if bad:
        raise RuntimeError(f"the narrow network is not zero outside its {widths} units: {bad[:3]}")
    loss_star = problem.loss(star)
    loss_a, loss_b = problem.loss(a), problem.loss(b)
    da = _draw_dropout(problem, a, loss_a, p, widths, seed, max_tries, tolerance, check_points, "narrow_path (theta_a)")
    db = _draw_dropout(problem, b, loss_b, p, widths, int(seed) + 1, max_tries, tolerance, check_points,
                       "narrow_path (theta_b)")

    place = _placement(da.kept, db.kept, widths, chain.sizes)
    perms = {}
    for g, (P, n) in enumerate(zip(place, chain.sizes)):
        perm = torch.empty(n, dtype=torch.long)
        perm[P] = torch.arange(len(P))
        perm[complement(P, n)] = torch.arange(len(P), n)
        perms[chain.names[g]] = perm
    star_p = chain.spec.permute(star, perms)

    mid1, lab1 = lemma2(chain, da.theta1, da.kept, star_p, place)
    mid1, lab1, end1 = _end_at(chain, mid1, lab1, star_p, place)
    mid2, lab2 = lemma2(chain, star_p, place, db.theta1, db.kept)
    mid2, lab2, end2 = _end_at(chain, mid2, lab2, db.theta1, db.kept)
    knot1, seg1, ev1 = _measure(problem, mid1, lab1, {0: da.loss1, len(mid1) - 1: loss_star}, check_points)
    knot2, seg2, ev2 = _measure(problem, mid2, lab2, {0: loss_star, len(mid2) - 1: db.loss1}, check_points)

    waypoints = [a] + mid1[:-1] + [star_p] + mid2[1:] + [b]
    labels = [DROPOUT] + lab1 + lab2 + [DROPOUT]
    path = PiecewiseLinearPath(waypoints, knots=knots, labels=labels)
    path.name = "narrow"

    permuted = [bool(set(P.tolist()) & set(k.tolist())) for P, k in zip(place, da.kept)]
    extra = (end1 == "extra segment") + (end2 == "extra segment")
    segment_max = [da.segment_max] + seg1 + seg2 + [db.segment_max]
    star_info.update({"loss": loss_star, "support": [s.tolist() for s in support]})
    path.info = {
        "construction": "Kuditipudi et al. 2019, Theorem 3 (through a narrow network)",
        "bound": None,
        "bound_formula": "max(L(theta_a) + O~(sqrt(p) eps), L(theta_b) + O~(sqrt(p) eps), L(theta*)) "
                         "(constants and log factors not computable)",
        **_run_info(p, seed, tolerance, check_points, problem, chain),
        "widths": list(widths),
        "required_p": max(1.5 * hs / h for hs, h in zip(widths, chain.sizes)),
        "loss_a": loss_a,
        "loss_b": loss_b,
        "loss_a1": da.loss1,
        "loss_b1": db.loss1,
        "loss_star": loss_star,
        "theta_star": star_info,
        "placement": [P.tolist() for P in place],
        **_draw_info(da, db),
        "lemma2_bounds": [max(da.loss1, loss_star), max(loss_star, db.loss1)],
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
    }
    return _finish(path, problem)
