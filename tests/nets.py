"""Small trained networks shared by the path-construction tests: trained once, kept on disk.

:func:`trained_pair` keeps each pair for the session and, when ``CACHE`` is set (by ``conftest.py``, to a
folder of pytest's cache), on disk under a digest of everything that determines the nets: the key, the
architecture, the training code and settings, the data, the device type and the torch version. Training
runs inside ``torch.random.fork_rng``, so a cached pair leaves the random state exactly as a fresh one does.
"""
from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch.func import functional_call

from modeconn.params.batchnorm import fold_batchnorm, has_batchnorm
from modeconn.evaluation.evaluate import PathEval, evaluate_path
from modeconn.models import build
from modeconn.params.path import float_state
from modeconn.kuditipudi.edits import OUTPUT, PERMUTE, REWIRE

N_ITEMS = 600   # training examples of sklearn's digits the nets see
STEPS = 150     # full-batch Adam steps

_PAIRS: dict = {}
CACHE: Path | None = None


def train_full_batch(make, data, seed: int, steps: int = STEPS, lr: float = 1e-2) -> nn.Module:
    """A net from ``make()`` (initialised with ``seed``) trained by full-batch Adam on ``data``, on the
    data's device."""
    x, y = data
    torch.manual_seed(seed)
    model = make().to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _digest(key, make, data, steps: int) -> str:
    x, y = data
    parts = [repr(key), repr(make()), str(steps), inspect.getsource(train_full_batch), str(tuple(x.shape)),
             x.device.type, torch.__version__]
    h = hashlib.sha256("\n".join(parts).encode())
    h.update(x.detach().cpu().numpy().tobytes())
    h.update(y.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def trained_pair(key, make, data, steps: int = STEPS) -> tuple[nn.Module, nn.Module]:
    """Two trained nets (seeds 0 and 1) for ``key``: from the session, from the disk cache, or trained."""
    if key in _PAIRS:
        return _PAIRS[key]
    device = data[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        file = None if CACHE is None else CACHE / f"{_digest(key, make, data, steps)}.pt"
        if file is not None and file.exists():
            states = torch.load(file, map_location=device, weights_only=True)
            pair = tuple(make().to(device) for _ in states)
            for net, state in zip(pair, states):
                net.load_state_dict(state)
                net.eval()
        else:
            pair = (train_full_batch(make, data, 0, steps), train_full_batch(make, data, 1, steps))
            if file is not None:
                tmp = file.with_suffix(f".{os.getpid()}.tmp")
                torch.save([net.state_dict() for net in pair], tmp)
                os.replace(tmp, file)
    _PAIRS[key] = pair
    return pair


def mlp(hidden):
    return lambda: build("mlp", (64,), 10, hidden=hidden, dropout=0.3)


def profile_segments(model, path, data, points: int) -> tuple[PathEval, np.ndarray, list[int]]:
    """Train loss at ``points`` points of every segment (both knots included), checking each labelled move.

    Output-layer interpolations stay at or below the larger of their ends (convexity); free-unit rewiring
    and permutation segments have constant loss (the function does not change). Returns the evaluation,
    the losses and the segment index of each point.
    """
    ts, seg = [], []
    for i in range(path.num_segments):
        lo, hi = path.knots[i], path.knots[i + 1]
        for s in np.linspace(0.0, 1.0, points):
            ts.append(hi if s == 1.0 else lo + (hi - lo) * float(s))
            seg.append(i)
    ev = evaluate_path(model, path, data, ts=ts, device=data[0].device, progress=False)
    loss = np.asarray(ev.metrics["train_loss"])
    scale = max(1.0, float(loss.max()))
    for i, label in enumerate(path.labels):
        vals = loss[[j for j, s in enumerate(seg) if s == i]]
        if label == OUTPUT:
            assert vals.max() <= max(vals[0], vals[-1]) + 1e-6, (i, label, vals)
        elif label in (REWIRE, PERMUTE):
            assert vals.max() - vals.min() <= 1e-5 * scale, (i, label, vals)
    return ev, loss, seg


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 25), nn.BatchNorm1d(25), nn.ReLU(), nn.Dropout(0.3), nn.Linear(25, 10))


def folded_endpoints(path, a: nn.Module, b: nn.Module, x) -> tuple[dict, dict]:
    """Check that a construction folded the BatchNorm models ``a``, ``b`` and that the folded path starts
    at the same eval-mode function as ``a``; returns both folded endpoint states."""
    assert path.info["folded_batchnorm"] is True
    assert path.model is not None and not has_batchnorm(path.model)
    with torch.no_grad():
        torch.testing.assert_close(functional_call(path.model, path(0.0), (x,)), a(x), atol=1e-5, rtol=1e-5)
    return (float_state(fold_batchnorm(a, a.state_dict()).state_dict()),
            float_state(fold_batchnorm(b, b.state_dict()).state_dict()))


class ResidualMLP(nn.Module):
    """A residual model: its hidden units feed the output through two routes, so it is not a chain."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.out(h + torch.relu(self.fc2(h)))
