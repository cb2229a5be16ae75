"""Summed cross-entropy and errors of many points' logits at once: the one scorer of every evaluation mode.

The cross-entropy is ``logsumexp`` minus the target's logit, written out as PyTorch computes ``logsumexp``
(the maximum m, then m + log(sum(exp(x - m)))), so its maximum is shared with the error count, and summed in
float64. Errors follow ``argmax`` (its first index on ties), as a user's ``out.argmax(1) != y`` does: where
no class ties for the maximum, an example is wrong exactly when its target's logit is below the maximum,
which needs no ``argmax`` pass (the slowest reduction on a CPU); ties (x - m is zero exactly at the maxima,
and nowhere else, so counting zeros finds them) and non-finite logits take ``argmax``. With ``scratch=True`` the logits are overwritten
(the buffered MLP evaluator's output buffer), so no temporary as large as the logits is made.
"""
from __future__ import annotations

import torch
from torch import Tensor


def score(logits: Tensor, y: Tensor, class_dim: int = -1, scratch: bool = False) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and summed errors per point (float64, [points]).

    ``logits`` are [points, batch, classes] (``class_dim=-1``) or [points, classes, batch] (``class_dim=1``);
    ``y`` the batch's targets; float16/bfloat16 are scored in float32. ``scratch``: ``logits`` may be
    overwritten.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits, scratch = logits.float(), True
    c = class_dim % 3
    b = 1 if c == 2 else 2  # the batch axis
    shape = [logits.shape[0], 1, 1]
    shape[b] = len(y)
    target = y.view([1 if i != b else len(y) for i in range(3)]).expand(shape)
    picked = logits.gather(c, target).squeeze(c)
    top = logits.amax(c, keepdim=True)
    if not bool(torch.isfinite(top).all()):  # inf or nan: PyTorch's own reductions decide
        wrong = logits.argmax(c) != y.unsqueeze(0)
        loss = torch.logsumexp(logits, c) - picked
        return loss.sum(1, dtype=torch.float64), wrong.sum(1).to(torch.float64)
    shifted = logits.sub_(top) if scratch else logits - top
    # x - m is 0 at the maxima and negative elsewhere: an example has C + sum(sign) maxima, one unless classes
    # tie (sign and a sum: about 5x faster than count_nonzero on a CPU)
    if bool((torch.sign(shifted).sum(c) > 1 - shifted.shape[c]).any()):
        wrong = shifted.argmax(c) != y.unsqueeze(0)  # subtracting a row's constant keeps its argmax
    else:
        wrong = picked < top.squeeze(c)
    loss = shifted.exp_().sum(c).log_().add_(top.squeeze(c)).sub_(picked)
    return loss.sum(1, dtype=torch.float64), wrong.sum(1).to(torch.float64)
