"""One point of a path at a time: the reference evaluation, with no per-point set-up beyond the user's loop.

One private copy of the model is made per evaluation (never one per point); each point's parameters are
copied into its tensors in place, BatchNorm statistics are recomputed as
:func:`modeconn.params.batchnorm.recompute_statistics` does, and each split runs in batches of
``batch_size`` through the model. The logits of consecutive points wait in a :class:`ScoreQueue` and are
scored by :func:`modeconn.evaluation.scoring.score` together, a call per split and batch for many points:
the scorer's dozen small kernels per call cost a small MLP as much as its forward pass, which made the
one-point mode slower than a user's loop (cross-entropy and argmax, about half as many kernels).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from modeconn.evaluation.scoring import score
from modeconn.params.batchnorm import recompute_statistics


class PointModel:
    """A private copy of ``model`` that holds one point of a path at a time (the caller's model is untouched)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model = copy.deepcopy(model).eval()
        params = dict(self.model.named_parameters())
        self.targets = [(k, params[k]) for k in names]

    @torch.no_grad()
    def load(self, point: Mapping[str, Tensor], bn_inputs: Tensor | None) -> None:
        """Copy ``point`` (a tensor per parameter name) in; recompute BatchNorm statistics on ``bn_inputs``."""
        for k, p in self.targets:
            p.copy_(point[k])
        if bn_inputs is not None:
            recompute_statistics(self.model, bn_inputs)

    @torch.no_grad()
    def logits(self, x: Tensor, batch_size: int) -> list[Tensor]:
        """Eval-mode logits of the loaded point on ``x``, a tensor per batch of ``batch_size`` examples."""
        return [self.model(x[start : start + batch_size]) for start in range(0, len(x), batch_size)]


#: logit elements a :class:`ScoreQueue` holds before it scores them (16 MiB of float32)
QUEUED_LOGITS = 1 << 22


class ScoreQueue:
    """Logits of consecutive points (per split, per data batch; every point batched alike), scored together
    when they hold ``limit`` elements (:data:`QUEUED_LOGITS`) or on :meth:`flush`. The numbers are
    :func:`profile_point`'s: the scorer works row by row, the same per point whether one or many are stacked."""

    def __init__(self, splits: Mapping[str, tuple[Tensor, Tensor]], limit: int | None = None):
        self.splits, self.limit = splits, QUEUED_LOGITS if limit is None else limit
        self.pending: list[dict[str, list[Tensor]]] = []
        self.size = 0

    def add(self, logits: dict[str, list[Tensor]]) -> bool:
        """Queue one point's logits; True when the queue is full (time to :meth:`flush`)."""
        self.pending.append(logits)
        self.size += sum(t.numel() for batches in logits.values() for t in batches)
        return self.size >= self.limit

    def flush(self) -> dict[str, list[float]]:
        """Mean loss and error per split of every queued point, in order (``<split>_loss`` / ``_error``)."""
        out: dict[str, list[float]] = {}
        if not self.pending:
            return out
        for split, (x, y) in self.splits.items():
            loss = torch.zeros(len(self.pending), dtype=torch.float64, device=y.device)
            wrong = torch.zeros(len(self.pending), dtype=torch.float64, device=y.device)
            start = 0
            for b, first in enumerate(self.pending[0][split]):
                rows = len(first)
                stacked = torch.stack([point[split][b] for point in self.pending])
                l, w = score(stacked, y[start : start + rows], scratch=True)  # the stack is our own copy
                loss += l
                wrong += w
                start += rows
            out[f"{split}_loss"], out[f"{split}_error"] = (loss / len(x)).tolist(), (wrong / len(x)).tolist()
        self.pending, self.size = [], 0
        return out


@torch.no_grad()
def profile_point(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean loss and error of ``model`` (in its current mode) on ``(x, y)``, ``batch_size`` examples a batch."""
    loss = torch.zeros(1, dtype=torch.float64, device=x.device)
    wrong = torch.zeros(1, dtype=torch.float64, device=x.device)
    for start in range(0, len(x), batch_size):
        l, w = score(model(x[start : start + batch_size]).unsqueeze(0), y[start : start + batch_size])
        loss += l
        wrong += w
    return float(loss) / len(x), float(wrong) / len(x)
