"""One point of a path at a time: the reference evaluation, with no per-point set-up beyond the user's loop.

One private copy of the model is made per evaluation (never one per point); each point's parameters are
copied into its tensors in place, BatchNorm statistics are recomputed as
:func:`modeconn.params.batchnorm.recompute_statistics` does, and each split runs in batches of
``batch_size`` through the model, scored by :func:`modeconn.evaluation.scoring.score`.
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

    def profile(self, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
        """Mean loss and error of the loaded point on ``(x, y)``, ``batch_size`` examples a batch."""
        return profile_point(self.model, x, y, batch_size)


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
