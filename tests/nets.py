"""Small trained networks shared by the path-construction tests (trained once per session)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.models import build

N_ITEMS = 600   # training examples of sklearn's digits the nets see
STEPS = 150     # full-batch Adam steps

_PAIRS: dict = {}


def train_full_batch(make, data, seed: int, steps: int = STEPS, lr: float = 1e-2) -> nn.Module:
    """A net from ``make()`` (initialised with ``seed``) trained by full-batch Adam on ``data``."""
    x, y = data
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def trained_pair(key, make, data, steps: int = STEPS) -> tuple[nn.Module, nn.Module]:
    """Two trained nets (seeds 0 and 1), cached for the session under ``key``."""
    if key not in _PAIRS:
        _PAIRS[key] = (train_full_batch(make, data, 0, steps), train_full_batch(make, data, 1, steps))
    return _PAIRS[key]


def mlp(hidden):
    return lambda: build("mlp", (64,), 10, hidden=hidden, dropout=0.3)
