"""``fit_curve(lr="auto")``: the curve's learning rate chosen by a short measured probe on the network itself.

A fixed rate that suits a small net can be the wrong one for a wider or deeper one (docs/benchmarks.md,
the curve sweep). The probe trains the bends from their initial values for ``steps`` steps at each
candidate rate (constant, same optimiser, the same batches and t for every candidate, drawn from their own
generators seeded from the curve's seed, so the choice is deterministic for a seed and the training that
follows is exactly that of ``lr=<chosen>``), scores each by the mean loss on the probe's batches seen
again at fixed t (1/4, 1/2, 3/4) and picks the lowest (ties: the larger rate). The bends are restored
afterwards; the probe's seconds are reported in the curve's ``info["lr_probe"]`` and count in its wall time.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

AUTO_CANDIDATES = (0.15, 0.05)
PROBE_STEPS = 10  # steps per candidate
PROBE_TIMES = (0.25, 0.5, 0.75)


def probe_lr(free: Tensor, make_loss: Callable[[], Callable[[Tensor, Tensor], Tensor]],
             point_loss: Callable[[float, Tensor, Tensor], Tensor],
             make_optimizer: Callable[[float], torch.optim.Optimizer],
             batches: Sequence[tuple[Tensor, Tensor]], candidates: Iterable[float] = AUTO_CANDIDATES,
             ) -> tuple[float, dict]:
    """The candidate rate whose ``len(batches)`` steps from ``free``'s current value give the lowest mean
    ``point_loss(t, x, y)`` over :data:`PROBE_TIMES` and the batches; ``free`` is restored after each trial.

    ``make_loss()``: a fresh training objective ``loss(x, y)`` (differentiable in ``free``; its t sequence
    restarted) for each trial. Returns the rate and a record (the candidates' scores, steps and seconds)."""
    started = time.perf_counter()
    start = free.detach().clone()
    scores: dict[float, float] = {}
    for lr in sorted({float(c) for c in candidates}, reverse=True):
        loss_fn, opt = make_loss(), make_optimizer(lr)
        for x, y in batches:
            loss = loss_fn(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            total = sum(float(point_loss(t, x, y)) for t in PROBE_TIMES for x, y in batches)
            free.copy_(start)
        score = total / (len(PROBE_TIMES) * len(batches))
        scores[lr] = score if math.isfinite(score) else math.inf  # diverged: never chosen
    best = min(scores, key=lambda lr: (scores[lr], -lr))
    return best, {"lr": best, "scores": {f"{k:g}": v for k, v in scores.items()},
                  "steps": len(batches), "seconds": time.perf_counter() - started}


