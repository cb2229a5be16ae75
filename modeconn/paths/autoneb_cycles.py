"""AutoNEB's cycles: their settings (each a diff on the previous one), the paper's default schedule, and the
rules that insert new pivots between cycles (``equal(n)``, ``highest(n, threshold)``, ``leave``).

A cycle's settings are a mapping with any of ``insert`` (a rule as text: ``"equal(3)"``, ``"highest(2)"``,
``"highest(2, 0.2)"``, ``"leave"``), ``iterations``, ``lr``, ``optimizer`` (``sgd`` | ``adam``), ``momentum``
and ``repeat`` (run this cycle that many times; not inherited). Keys a cycle leaves out keep the previous
cycle's values, so ``{}`` repeats the previous cycle.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from modeconn.training.loop import OPTIMIZERS

CYCLE_KEYS = ("insert", "iterations", "lr", "optimizer", "momentum", "repeat")
RULES = ("equal", "highest", "leave")
HIGHEST_THRESHOLD = 0.1  # the reference code's default (the paper's text says 20% of the energy range)
SUB_POINTS = 9           # dense evaluation points inside every segment, as the reference
MAX_CYCLES = 10_000      # cycles in all, repeats included (the paper's schedule has 14)

# Draxler et al.'s CIFAR-10 ResNet-20 configuration: 14 cycles, 16,000 iterations, 2 -> at most 31 pivots.
PAPER_SCHEDULE: tuple[dict, ...] = (
    {"insert": "equal(3)", "iterations": 1000, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9},
    {"insert": "highest(2)", "repeat": 3},
    {"iterations": 2000, "repeat": 2},
    {"iterations": 1000, "lr": 0.01, "repeat": 4},
    {"lr": 0.001, "repeat": 4},
)
_RULE = re.compile(r"^\s*(equal|highest|leave)\s*(?:\(\s*([^,()]*?)\s*(?:,\s*([^,()]*?)\s*)?\))?\s*$")


@dataclass(frozen=True)
class Cycle:
    """One cycle's full settings (after merging)."""

    rule: str
    count: int
    threshold: float
    iterations: int
    lr: float
    optimizer: str
    momentum: float

    @property
    def insert(self) -> str:
        if self.rule == "leave":
            return "leave"
        return f"equal({self.count})" if self.rule == "equal" else f"highest({self.count}, {self.threshold:g})"

    def to_dict(self) -> dict:
        return {"insert": self.insert, **{k: v for k, v in asdict(self).items() if k not in ("rule",)}}


def parse_rule(text, key: str = "insert") -> tuple[str, int, float]:
    """``"equal(3)"`` -> ("equal", 3, 0.1); ``"highest(2, 0.2)"`` -> ("highest", 2, 0.2); ``"leave"``."""
    m = _RULE.match(text) if isinstance(text, str) else None
    allowed = "equal(n), highest(n) or highest(n, threshold) with n >= 1 and threshold >= 0, or leave"
    if m is None:
        raise ValueError(f"{key} must be one of {allowed}; got {text!r}")
    rule, n, thr = m.groups()
    if rule == "leave":
        if n is not None:
            raise ValueError(f"{key} must be one of {allowed}; got {text!r}")
        return "leave", 0, HIGHEST_THRESHOLD
    try:
        count = int(n)
        threshold = HIGHEST_THRESHOLD if thr is None else float(thr)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be one of {allowed}; got {text!r}") from None
    if count < 1 or not (math.isfinite(threshold) and threshold >= 0) or (rule == "equal" and thr is not None):
        raise ValueError(f"{key} must be one of {allowed}; got {text!r}")
    return rule, count, threshold


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def expand_cycles(cycles: Sequence[Mapping] | None, iterations_scale: float = 1.0) -> list[Cycle]:
    """Every cycle's merged settings: ``cycles`` (default: :data:`PAPER_SCHEDULE`), each a diff on the
    previous one, ``repeat`` expanded, iterations multiplied by ``iterations_scale`` (rounded, at least 1
    where the cycle has any). Raises ``ValueError`` naming the cycle and key (``cycles[2].insert ...``)."""
    if not (_real(iterations_scale) and iterations_scale > 0):
        raise ValueError(f"iterations_scale must be a finite number > 0; got {iterations_scale!r}")
    given = PAPER_SCHEDULE if cycles is None else cycles
    if isinstance(given, (str, bytes, Mapping)) or not isinstance(given, Sequence) or len(given) == 0:
        raise ValueError(f"cycles must be a non-empty list of cycle settings (mappings of {', '.join(CYCLE_KEYS)}) "
                         f"or null for the paper's schedule; got {given!r}")
    current: dict = {"optimizer": "sgd", "momentum": 0.9}
    out: list[Cycle] = []
    for i, diff in enumerate(given):
        key = f"cycles[{i}]"
        if diff is None:
            diff = {}
        if not isinstance(diff, Mapping):
            raise ValueError(f"{key} must be a mapping of {', '.join(CYCLE_KEYS)}; got {diff!r}")
        unknown = sorted(set(diff) - set(CYCLE_KEYS))
        if unknown:
            raise ValueError(f"{key} has unknown key(s) {unknown}; allowed: {', '.join(CYCLE_KEYS)}")
        if "insert" in diff:
            current["rule"], current["count"], current["threshold"] = parse_rule(diff["insert"], f"{key}.insert")
        if "iterations" in diff:
            if not (_integer(diff["iterations"]) and diff["iterations"] >= 0):
                raise ValueError(f"{key}.iterations must be an integer >= 0; got {diff['iterations']!r}")
            current["iterations"] = int(diff["iterations"])
        if "lr" in diff:
            if not (_real(diff["lr"]) and diff["lr"] > 0):
                raise ValueError(f"{key}.lr must be a finite number > 0; got {diff['lr']!r}")
            current["lr"] = float(diff["lr"])
        if "optimizer" in diff:
            if str(diff["optimizer"]).lower() not in OPTIMIZERS:
                raise ValueError(f"{key}.optimizer must be one of {', '.join(OPTIMIZERS)}; got {diff['optimizer']!r}")
            current["optimizer"] = str(diff["optimizer"]).lower()
        if "momentum" in diff:
            if not (_real(diff["momentum"]) and 0 <= diff["momentum"] < 1):
                raise ValueError(f"{key}.momentum must be a number in [0, 1); got {diff['momentum']!r}")
            current["momentum"] = float(diff["momentum"])
        repeat = diff.get("repeat", 1)
        if not (_integer(repeat) and repeat >= 1):
            raise ValueError(f"{key}.repeat must be an integer >= 1; got {repeat!r}")
        lacking = [k for k, name in (("rule", "insert"), ("iterations", "iterations"), ("lr", "lr"))
                   if k not in current]
        if lacking:
            names = [{"rule": "insert"}.get(k, k) for k in lacking]
            raise ValueError(f"{key} must set {', '.join(names)} (the first cycle sets every key)")
        if len(out) + repeat > MAX_CYCLES:  # every cycle keeps its dense profile in the history and resume file
            raise ValueError(f"{key}.repeat: at most {MAX_CYCLES:,} cycles in all; got {len(out) + repeat:,}")
        its = current["iterations"]
        scaled = 0 if its == 0 else max(1, round(its * iterations_scale))
        out.extend([Cycle(**{**current, "iterations": scaled})] * int(repeat))
    return out


# ------------------------------------------------------------------------------------------ insertion

def dense_fractions() -> list[float]:
    """Positions of the dense evaluation's points inside a segment: its start and the sub-points."""
    return [k / (SUB_POINTS + 1) for k in range(SUB_POINTS + 1)]


def highest_insertions(pivot_losses: Sequence[float], dense: Sequence[Sequence[float]], n: int,
                       threshold: float = HIGHEST_THRESHOLD) -> list[tuple[int, float]]:
    """Where ``highest(n, threshold)`` inserts: ``(segment, fraction)`` pairs, by segment.

    ``dense[j]`` are the losses at the sub-points k / (S + 1), k = 1..S, of segment j. A segment's excess
    at a sub-point is its loss minus the chord between the segment's two pivots' losses, divided by the
    range of all pivots' losses; a new pivot goes to the sub-point of largest excess in each of the (up to)
    ``n`` segments with the largest excesses that exceed ``threshold``.
    """
    e = torch.as_tensor(list(pivot_losses), dtype=torch.float64)
    d = torch.as_tensor([list(row) for row in dense], dtype=torch.float64)
    segments, sub = d.shape
    if segments != len(e) - 1:
        raise ValueError(f"{len(e)} pivots have {len(e) - 1} segments; got dense losses for {segments}")
    span = float(e.max() - e.min())
    frac = torch.arange(1, sub + 1, dtype=torch.float64) / (sub + 1)
    chord = e[:-1, None] + frac[None, :] * (e[1:] - e[:-1])[:, None]
    excess = (d - chord) / (span if span > 0 else 1.0)
    best, where = excess.max(1)
    order = sorted(range(segments), key=lambda j: -float(best[j]))
    chosen = [j for j in order if float(best[j]) > threshold][: int(n)]
    return sorted((j, float(frac[where[j]])) for j in chosen)


def equal_insertions(segments: int, n: int) -> list[tuple[int, float]]:
    """``equal(n)``: n evenly spaced new pivots in every segment."""
    return [(j, k / (n + 1)) for j in range(segments) for k in range(1, n + 1)]


def insert_pivots(chain: Tensor, weights: Tensor, where: Sequence[tuple[int, float]]) -> tuple[Tensor, Tensor]:
    """The chain with new pivots on its segments at ``where`` (``(segment, fraction)``, any number per
    segment) and its spacing weights split in proportion (a segment's weight w at fractions f_1 < f_2 <
    ... becomes w f_1, w (f_2 - f_1), ..., w (1 - f_last))."""
    by_segment: dict[int, list[float]] = {}
    for j, f in where:
        if not (0 <= j < chain.shape[0] - 1 and 0 < f < 1):
            raise ValueError(f"cannot insert at segment {j}, fraction {f}: the chain has {chain.shape[0] - 1} "
                             "segments and fractions lie strictly between 0 and 1")
        by_segment.setdefault(j, []).append(float(f))
    rows, new_w = [chain[:1]], []
    for j in range(chain.shape[0] - 1):
        fs = sorted(set(by_segment.get(j, [])))
        edges = [0.0, *fs, 1.0]
        for f in fs:
            rows.append(torch.lerp(chain[j], chain[j + 1], f).unsqueeze(0))
        rows.append(chain[j + 1 : j + 2])
        new_w.extend(float(weights[j]) * (b - a) for a, b in zip(edges, edges[1:]))
    return torch.cat(rows), torch.tensor(new_w, dtype=weights.dtype, device=weights.device)
