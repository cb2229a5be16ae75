"""Norm numerics of the noise-stability quantities (Kuditipudi et al. 2019, Definition 2).

Per-example Euclidean norms of flattened tensors, a division that keeps 0/0 = NaN and x/0 = inf apart,
a layer's linear map without its bias, the exact Frobenius norm of a conv layer's operator, spectral norms
of Jacobians by power iteration, the no-dominant-unit ratio, and NaN-skipping reductions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["norms", "safe_div", "without_bias", "operator_frobenius_norm", "layer_cushion", "spectral_norms",
           "dominance", "nanmin", "nanmax", "nanmedian"]


def norms(t: Tensor) -> Tensor:
    """Euclidean norm of each example (dim 0) of ``t``, flattened."""
    return t.flatten(1).norm(dim=1)


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """``v`` (one value per example) shaped to broadcast against ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, with 0/0 = NaN and x/0 = inf (x > 0)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny),
                       torch.where(num > 0, torch.full_like(num, math.inf), torch.full_like(num, math.nan)))


def without_bias(module: nn.Module, z: Tensor) -> Tensor:
    """The layer's linear map A z (its bias left out)."""
    if isinstance(module, nn.Linear):
        return F.linear(z, module.weight)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward(z, module.weight, None)
    raise TypeError(f"not a Linear/Conv layer: {type(module).__name__}")


def operator_frobenius_norm(module: nn.Module, input_shape: Sequence[int] | None = None) -> Tensor:
    """Frobenius norm of the linear operator of a Linear or Conv layer (bias excluded).

    For a conv layer the operator depends on the input size ``input_shape`` (per example, e.g.
    ``(C, H, W)``): ||A||_F^2 = sum_k ||W[:, :, k]||^2 * N_k, with N_k the number of output positions at
    which kernel offset k reads a real input entry (not zero padding). N_k is computed exactly by convolving
    a ones image with one-hot kernels, with the layer's stride, padding and dilation. Only zero padding is
    supported (reflect/circular padding can map two kernel offsets onto one input entry).
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach().norm()
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"operator_frobenius_norm: not a Linear/Conv layer: {type(module).__name__}")
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"operator_frobenius_norm: padding_mode={module.padding_mode!r} (only 'zeros')")
    if input_shape is None:
        raise ValueError("operator_frobenius_norm: a conv layer needs the input shape (C, *spatial)")
    w = module.weight.detach()
    nd = w.dim() - 2
    spatial = tuple(int(s) for s in input_shape)[-nd:]
    k = math.prod(w.shape[2:])
    ones = torch.ones(1, 1, *spatial, dtype=w.dtype, device=w.device)
    onehot = torch.eye(k, dtype=w.dtype, device=w.device).reshape(k, 1, *w.shape[2:])
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    counts = conv(ones, onehot, None, module.stride, module.padding, module.dilation, 1)
    counts = counts.reshape(k, -1).sum(1)  # N_k
    return (w.pow(2).sum(dim=(0, 1)).reshape(-1) * counts).sum().sqrt()


def layer_cushion(module: nn.Module, z: Tensor, fro: Tensor | None = None) -> Tensor:
    """Per example: ||A z|| / (||A||_F ||z||) for the Linear/Conv layer ``module`` and its inputs ``z``
    (``fro``: ||A||_F when already known for this input size)."""
    with torch.no_grad():
        if fro is None:
            fro = operator_frobenius_norm(module, z.shape[1:])
        return safe_div(norms(without_bias(module, z)), fro * norms(z))


def spectral_norms(f: Callable[[Tensor], Tensor], x: Tensor, iters: int = 30,
                   generator: torch.Generator | None = None) -> Tensor:
    """Per example, the spectral norm of the Jacobian of ``f`` at ``x`` by power iteration.

    ``f`` maps a batch to a batch and treats examples independently (eval mode), so its Jacobian is block
    diagonal and one ``torch.func.jvp`` / ``vjp`` per iteration serves every example. Each iteration:
    u = J v (jvp), w = J^T u (vjp), v = w / ||w||. Returns the largest ||J v|| seen (a lower bound of ||J||_2
    that converges to it), from a seeded random start; ``iters`` iterations (plus one final jvp).
    """
    x = x.detach()
    _, vjp_fn = torch.func.vjp(f, x)
    gdev = generator.device if generator is not None else x.device
    v = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    v = v / bcast(norms(v).clamp_min(torch.finfo(x.dtype).tiny), v)
    sigma = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(max(int(iters), 0)):
        _, u = torch.func.jvp(f, (x,), (v,))
        sigma = torch.maximum(sigma, norms(u))
        (w,) = vjp_fn(u)
        wn = norms(w)
        v = torch.where(bcast(wn > 0, w), w / bcast(wn.clamp_min(torch.finfo(x.dtype).tiny), w), v)
    _, u = torch.func.jvp(f, (x,), (v,))
    return torch.maximum(sigma, norms(u)).detach()




def dominance(phi: Tensor, h: int) -> tuple[Tensor, Tensor]:
    """Per example: sqrt(h) * max unit-block norm / norm, and sqrt(h) * max |entry| / norm."""
    n = phi.shape[0]
    total = norms(phi)
    blocks = phi.reshape(n, phi.shape[1], -1).norm(dim=2).amax(dim=1)
    entries = phi.reshape(n, -1).abs().amax(dim=1)
    root = math.sqrt(h)
    return safe_div(root * blocks, total), safe_div(root * entries, total)



def nanmin(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.min()) if a.size else math.nan


def nanmax(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.max()) if a.size else math.nan


def nanmedian(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(np.median(a)) if a.size else math.nan
