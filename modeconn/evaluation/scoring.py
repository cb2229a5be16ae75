"""Summed cross-entropy and errors of many points' logits at once: the one scorer of both evaluation modes.

``logsumexp`` minus the target's logit is the cross-entropy of PyTorch's ``cross_entropy`` (to float32
rounding) and about three times faster than ``cross_entropy(..., reduction="none")`` on the [points x items,
classes] logits of a batched evaluation; it is summed in float64. Errors follow ``argmax`` (its first index
on ties), as a user's ``out.argmax(1) != y`` does.
"""
from __future__ import annotations

import torch
from torch import Tensor


def score(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and summed errors per point (float64, [points]); ``logits`` are [points, batch,
    classes] (float16/bfloat16 are scored in float32), ``y`` the batch's targets."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    p, b, _ = logits.shape
    picked = logits.gather(-1, y.view(1, b, 1).expand(p, b, 1)).squeeze(-1)
    loss = (torch.logsumexp(logits, -1) - picked).sum(1, dtype=torch.float64)
    wrong = (logits.argmax(-1) != y.unsqueeze(0)).sum(1).to(torch.float64)
    return loss, wrong
