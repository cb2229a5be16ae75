"""Resampled Algorithm 1 copies: the first and last segments of Theorems 2 and 3's paths.

The straight segment from a network to its Algorithm 1 copy (:func:`~modeconn.kuditipudi.algorithm1.random_dropout`)
stays low only by noise stability (Lemma 3, with probability >= 1/4 over the draw), so the copy is drawn
again until every hidden layer has enough dropped units (Lemma 2 needs them free) and the segment's
maximum loss, measured at ``check_points`` evenly spaced points, is within a tolerance of its start; without
one, or when no draw meets it, the valid draw with the lowest measured maximum wins (draws that cannot beat
the best so far are abandoned early, so this costs about one loss evaluation per draw).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from modeconn.kuditipudi.algorithm1 import random_dropout
from modeconn.kuditipudi.chain_loss import ChainLoss
from modeconn.kuditipudi.edits import complement
from modeconn.params.state import State, interpolate

__all__ = ["DropoutCopy", "draw_dropout", "check_draw_options", "settings_info", "copies_info"]


@dataclass
class DropoutCopy:
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



def draw_dropout(problem: ChainLoss, theta: State, loss0: float, p: float, need: Sequence[int], seed: int,
                  max_tries: int, tolerance: float | None, check_points: int, what: str) -> DropoutCopy:
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
            value = problem.loss(interpolate(theta, theta1, ts[j]))
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
    return DropoutCopy(theta1=theta1, dropped=drop, kept=kept, seed=int(seed), tries=len(log), accepted_try=i,
                 valid_tries=valid, segment_losses=[float(x) for x in losses],
                 tolerance_met=None if tolerance is None else accepted is not None, evaluations=evaluations,
                 draw_log=log)


def check_draw_options(p: float, max_tries: int, check_points: int, tolerance) -> None:
    """Refuse draw settings that cannot work, naming the option."""
    if not (isinstance(max_tries, int) and not isinstance(max_tries, bool) and max_tries >= 1):
        raise ValueError(f"max_tries must be a positive integer, got {max_tries!r}")
    if not (isinstance(check_points, int) and not isinstance(check_points, bool) and check_points >= 2):
        raise ValueError(f"check_points must be an integer >= 2 (t = 0 and 1 included), got {check_points!r}")
    if tolerance is not None and not (float(tolerance) >= 0):
        raise ValueError(f"tolerance must be None or a number >= 0, got {tolerance!r}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1) (Algorithm 1 scales kept units by 1/(1-p)); got {p}")


def settings_info(p: float, seed: int, tolerance, check_points: int, problem: ChainLoss) -> dict:
    """The settings and chain facts the noise and narrow paths report."""
    chain = problem.chain
    return {"p": p, "seed": int(seed), "tolerance": tolerance, "check_points": check_points,
            "bound_items": len(problem.y), "groups": list(chain.names), "sizes": list(chain.sizes),
            "hidden_layers": chain.depth}


def copies_info(da: DropoutCopy, db: DropoutCopy) -> dict:
    """Both endpoints' dropout copies: the draws, kept units and the measured maxima of their segments."""
    return {"dropout_a": da.to_info(), "dropout_b": db.to_info(),
            "kept_a": [k.tolist() for k in da.kept], "kept_b": [k.tolist() for k in db.kept],
            "dropout_a_max": da.segment_max, "dropout_b_max": db.segment_max}
