"""BatchNorm at points of a path: recompute its statistics, or fold it away.

A point on a path has no running statistics of its own: interpolated ones describe no network. At every
evaluated point, endpoints included, the statistics are reset and recomputed as a cumulative average
(``momentum=None``) over a fixed subset of training data, in train mode and without gradients. Path
constructions that need "a zero row is a dead unit" fold eval-mode BatchNorm into the preceding layer.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse
from torch.nn.modules.batchnorm import _BatchNorm

STATISTICS_BATCH = 512  # inputs per batch when statistics are recomputed (the statistics depend on it)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_statistics(model: nn.Module, inputs: Tensor, batch_size: int = STATISTICS_BATCH) -> nn.Module:
    """Reset every BatchNorm's running statistics and recompute them on ``inputs`` (in place).

    Cumulative average over the batches (``momentum=None``), train mode, no grad; the model is left in
    eval mode. Models without BatchNorm are only put in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.eval()  # only the norms collect statistics; dropout stays off
    for m in norms:
        m.train()
    for start in range(0, len(inputs), batch_size):
        model(inputs[start : start + batch_size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def load_point(model: nn.Module, params: Mapping[str, Tensor], bn_inputs: Tensor | None = None,
               batch_size: int = STATISTICS_BATCH) -> nn.Module:
    """A copy of ``model`` holding ``params``, with BatchNorm statistics recomputed on ``bn_inputs``."""
    point = copy.deepcopy(model)
    missing = set(params) - set(point.state_dict())
    if missing:
        raise KeyError(f"the path has keys the model lacks: {sorted(missing)[:5]}")
    point.load_state_dict(dict(params), strict=False)
    if has_batchnorm(point):
        if bn_inputs is None:
            raise ValueError("this model has BatchNorm: pass training inputs to recompute its statistics")
        recompute_statistics(point, bn_inputs, batch_size)
    return point.eval()


class BatchNormFoldError(ValueError):
    """A BatchNorm layer does not directly follow a Conv/Linear layer and cannot be folded."""


def fold_batchnorm(model: nn.Module, state: Mapping[str, Tensor] | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` (loaded with ``state`` if given) with BatchNorm folded away.

    Each BatchNorm that directly follows a Conv or Linear layer is folded into it (its scale into the
    weight rows, its shift into the bias); the result is a ``torch.fx.GraphModule`` computing the same
    eval-mode function with no BatchNorm. Raises :class:`BatchNormFoldError` naming any BatchNorm that
    cannot be folded (for example a pre-activation BN).
    """
    source = copy.deepcopy(model)
    if state is not None:
        source.load_state_dict(dict(state), strict=False)
    folded = fuse(source.eval(), inplace=True)
    left = [name for name, m in folded.named_modules() if isinstance(m, _BatchNorm)]
    used = {str(n.target) for n in folded.graph.nodes if n.op == "call_module"}
    left = [name for name in left if name in used]
    if left:
        raise BatchNormFoldError(
            f"cannot fold BatchNorm layer(s) {left}: only a BatchNorm directly after a Conv or Linear layer "
            "folds (pre-activation BatchNorm, as in PreResNet, does not)"
        )
    return folded.eval()
