"""``align=auto``: weight matching and activation matching both, keeping the one whose aligned straight line has
the lower midpoint loss.

Neither matcher wins everywhere: on the VGG-16 quick preset weight matching leaves the aligned line's barrier
above the naive one while activation matching lowers it (docs/cli.md). The midpoint ``t = 0.5`` of the
straight line is where the barrier usually peaks; its training loss (BatchNorm statistics recomputed on the
same inputs, as the evaluator does) is one cheap forward pass per candidate. Without data only weight
matching can run, and it is kept.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeconn.align.activations import activation_matching
from modeconn.align.alignment import Alignment
from modeconn.align.weights import weight_matching
from modeconn.data import materialize
from modeconn.params.batchnorm import has_batchnorm, load_point
from modeconn.params.state import interpolate


@torch.no_grad()
def midpoint_loss(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], x: Tensor,
                  y: Tensor, batch_size: int = 512) -> float:
    """Mean cross-entropy on ``(x, y)`` at the midpoint of the straight line ``theta_a -> theta_b`` (BatchNorm
    statistics recomputed on ``x``)."""
    mid = interpolate(dict(theta_a), {k: theta_b[k] for k in theta_a}, 0.5)
    net = load_point(model, mid, x if has_batchnorm(model) else None).to(x.device)
    total = sum(float(F.cross_entropy(net(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum"))
                for i in range(0, len(x), batch_size))
    return total / len(x)


def auto_matching(model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], data=None, *,
                  example_input=None, max_iter: int = 100, max_items: int = 2048, seed: int = 0,
                  device: str | torch.device | None = None) -> Alignment:
    """Weight matching, and activation matching when ``data`` is given; the alignment whose straight line from
    ``theta_a`` has the lower midpoint training loss (on the first ``max_items`` inputs) is returned.

    ``info`` records the comparison: ``auto`` (True), ``midpoint_loss_naive``, ``midpoint_loss_weights``,
    ``midpoint_loss_activations`` (absent without data) and ``kept`` (the method returned); ``seconds``
    covers both matchers and the comparison.
    """
    started = time.perf_counter()
    if example_input is None and data is not None:
        example_input = materialize(data, max_items=2)[0]
    weights = weight_matching(model, theta_a, theta_b, example_input=example_input, max_iter=max_iter, seed=seed,
                              device=device)
    if data is None:
        weights.info.update(auto=True, kept="weights", note="no data: activation matching was not run")
        return weights
    acts = activation_matching(model, theta_a, theta_b, data, max_items=max_items)
    dev = next(iter(theta_a.values())).device
    x, y = materialize(data, max_items=max_items, device=dev)
    losses = {"naive": midpoint_loss(model, theta_a, theta_b, x, y),
              "weights": midpoint_loss(model, theta_a, weights.theta, x, y),
              "activations": midpoint_loss(model, theta_a, acts.theta, x, y)}
    kept = weights if losses["weights"] <= losses["activations"] else acts
    kept.info.update(auto=True, kept=kept.method, **{f"midpoint_loss_{k}": v for k, v in losses.items()})
    kept.seconds = time.perf_counter() - started
    return kept
