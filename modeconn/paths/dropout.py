"""Kuditipudi et al. (2019), Theorem 1: a piecewise-linear path between two dropout-stable networks.

::

    theta_A --Lemma 1--> theta_A,1 --Lemma 2 (+ Lemma 4)--> theta_B,1 --Lemma 1 reversed--> theta_B

theta_X,1 is theta_X with dropout on every hidden layer (kept sets from
:func:`modeconn.kuditipudi.dropout_stability.dropout_stability`). Along the path the loss is at most
``max(L(theta_A), L(theta_B)) + epsilon`` with ``epsilon = max(epsilon_A, epsilon_B)``: every segment is
either an output-layer interpolation (loss at most the larger of its ends, each a network whose loss is
L(theta_X) or some L(theta_X,k)) or a free-unit rewiring / permutation (loss constant). The path's
``bound`` is that number computed on the ``data`` passed in.

Segment count, D hidden layers: Lemma 1 has 4D - 2 segments on each side; Lemma 2 has 3; Lemma 4
(moving theta_B,1's units from the slots they were written to into their own positions) has 3, or 0 when
the kept sets of A and B are disjoint in every layer. Total **8D + 2**, or **8D - 1** with disjoint kept
sets. The reference's 8D + 4 counts Lemma 4 at its general 5 segments; segments 4-5 of Lemma 4 only exist
when a unit must move onto a slot that is itself occupied, and :func:`~modeconn.kuditipudi.lemma2.choose_slots`
writes theta_B,1's units so that this never happens (a unit that is free in theta_A,1 keeps its own
index; the others go to slots outside both kept sets, and their targets lie in A's kept set, which is
empty by then). Segments that would not move anything are not emitted.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from modeconn.kuditipudi.chain_loss import prepare_endpoints
from modeconn.kuditipudi.dropout_stability import stability_of
from modeconn.kuditipudi.edits import OUTPUT, PERMUTE, REWIRE
from modeconn.kuditipudi.lemma1 import lemma1
from modeconn.kuditipudi.lemma2 import lemma2
from modeconn.params.path import PiecewiseLinearPath, check_endpoints
from modeconn.params.certificate import Bound, Certificate
from modeconn.params.state import states_equal
from modeconn.units import UnitSpec

__all__ = ["dropout_path", "LABELS"]

LABELS = (OUTPUT, REWIRE, PERMUTE)


def check_dropout_options(keep: float, trials: int, **_) -> None:
    """:func:`dropout_path`'s option checks (the CLI runs them on a config before any training)."""
    if not (isinstance(keep, numbers.Real) and not isinstance(keep, bool) and 0.0 < keep <= 0.5):
        raise ValueError(f"keep must be in (0, 1/2] (Lemma 2 needs half of every layer free); got {keep!r}")
    if not (isinstance(trials, numbers.Integral) and not isinstance(trials, bool) and trials >= 1):
        raise ValueError(f"trials must be a positive integer; got {trials!r}")


def dropout_path(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], data,
                 keep: float = 0.5, trials: int = 20, seed: int = 0, *, r=None, kept_a: Sequence | None = None,
                 kept_b: Sequence | None = None, max_items: int | None = None, batch_size: int = 2048,
                 device=None, knots: str | Sequence[float] | None = None,
                 spec: UnitSpec | None = None) -> PiecewiseLinearPath:
    """Theorem 1's path from ``theta_a`` to ``theta_b`` (state dicts of ``model``).

    ``data``: the training data the loss, the kept-set search and the ``bound`` use (a ``Dataset`` - its
    train split -, an ``(x, y)`` pair or an iterable of batches; its first ``max_items`` examples when
    given). ``keep`` <= 1/2: each hidden layer keeps ``floor(keep * h)`` units (at least 1), scaled by ``r``
    (default 1/keep; a number, one per hidden layer, or ``"tune"``, see
    :func:`~modeconn.kuditipudi.dropout_stability.dropout_stability`). A's kept sets are the best of ``trials`` draws
    with ``seed``, B's with ``seed + 1``; ``kept_a`` / ``kept_b`` give them explicitly instead.

    The model must be a plain chain of hidden layers (:class:`~modeconn.kuditipudi.chain.Chain`): MLPs, conv nets with
    channels as units (pooling and flatten allowed), ``nn.Sequential``s; residual models raise
    :class:`~modeconn.kuditipudi.chain.UnsupportedArchitectureError`. BatchNorm after a Conv/Linear layer is
    folded first; the path then lives in the folded model: ``path.model`` is that module,
    ``path.info["folded_batchnorm"]`` is True, and the endpoints are the folded theta_a and theta_b.

    ``spec``: the model's unit spec when the caller has it (a run infers it once); else inferred here.

    Returns a :class:`PiecewiseLinearPath` with ``path(0)`` / ``path(1)`` exactly the (folded) endpoints,
    one label per segment (``"output-layer interpolation"``, ``"free-unit rewiring"``, ``"permutation"``),
    a :class:`~modeconn.params.certificate.Certificate` whose one exact bound covers the whole path,
    ``bound = max(L(theta_a), L(theta_b)) + max(epsilon_a, epsilon_b)``, and the stability results in
    ``info``. See the module docstring for the segment count (8D + 2, or 8D - 1 with disjoint kept sets).
    """
    check_dropout_options(keep=keep, trials=trials)
    check_endpoints(theta_a, theta_b, model, data)
    keep = float(keep)
    problem, a, b = prepare_endpoints(model, theta_a, theta_b, data, max_items, batch_size, device, spec)
    chain = problem.chain
    stab_a = stability_of(problem, a, keep, trials, seed, r, kept_a)
    stab_b = stability_of(problem, b, keep, trials, int(seed) + 1, r, kept_b)
    for g, n in enumerate(chain.sizes):
        for name, st in (("A", stab_a), ("B", stab_b)):
            if len(st.kept[g]) > n // 2:
                raise ValueError(f"layer {chain.names[g]!r} of {name} keeps {len(st.kept[g])} of {n} units; "
                                 f"at most floor(h/2) = {n // 2} are allowed")

    kept_a_t = [torch.tensor(s, dtype=torch.long) for s in stab_a.kept]
    kept_b_t = [torch.tensor(s, dtype=torch.long) for s in stab_b.kept]
    states_a, labels_a = lemma1(chain, a, kept_a_t, stab_a.r)
    states_b, labels_b = lemma1(chain, b, kept_b_t, stab_b.r)
    middle, labels_mid = lemma2(chain, states_a[-1], kept_a_t, states_b[-1], kept_b_t)
    if not states_equal(middle[-1], states_b[-1]):
        raise RuntimeError("internal error: Lemma 2 did not end exactly at theta_B,1")
    waypoints = states_a + middle[1:-1] + states_b[::-1]
    labels = labels_a + labels_mid + labels_b[::-1]

    path = PiecewiseLinearPath(waypoints, knots=knots, labels=labels)
    path.name = "dropout"
    epsilon = max(stab_a.epsilon, stab_b.epsilon)
    bound = max(stab_a.loss, stab_b.loss) + epsilon
    path.certify(Certificate(
        "Kuditipudi et al. 2019, Theorem 1 (dropout stability)", path.num_segments, len(problem.y),
        (Bound("the whole path", "max(L(theta_a), L(theta_b)) + max(epsilon_a, epsilon_b)", 0, path.num_segments,
               True, bound, {"L(theta_a)": stab_a.loss, "L(theta_b)": stab_b.loss, "epsilon_a": stab_a.epsilon,
                             "epsilon_b": stab_b.epsilon}),)))
    disjoint = [not (set(x) & set(y)) for x, y in zip(stab_a.kept, stab_b.kept)]
    D = chain.depth
    lemma4_segments = len(labels_mid) - 3
    path.info.update({
        "construction": "Kuditipudi et al. 2019, Theorem 1 (dropout stability)",
        "keep": keep,
        "groups": list(chain.names),
        "sizes": list(chain.sizes),
        "kept_sizes_a": stab_a.kept_sizes,
        "kept_sizes_b": stab_b.kept_sizes,
        "kept_a": stab_a.kept,
        "kept_b": stab_b.kept,
        "r_a": stab_a.r,
        "r_b": stab_b.r,
        "loss_a": stab_a.loss,
        "loss_b": stab_b.loss,
        "losses_a": stab_a.losses,
        "losses_b": stab_b.losses,
        "epsilon_a": stab_a.epsilon,
        "epsilon_b": stab_b.epsilon,
        "epsilon": epsilon,
        "trial_scores_a": stab_a.trial_scores,
        "trial_scores_b": stab_b.trial_scores,
        "disjoint": all(disjoint),
        "disjoint_layers": disjoint,
        "hidden_layers": D,
        "segments": {"lemma1_a": len(labels_a), "lemma2": 3, "lemma4": lemma4_segments, "lemma1_b": len(labels_b)},
        "num_segments": len(labels),
        "expected_segments": 8 * D - 1 if all(disjoint) else 8 * D + 2,
        "folded_batchnorm": problem.folded,
    })
    if problem.folded:
        path.model = problem.module
    return path

