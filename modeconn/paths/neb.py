"""The nudged elastic band's geometry on a chain of pivots: pure tensor functions on a ``[P, D]`` chain.

A chain holds P pivots (row 0 and row P-1 are the endpoints) joined by straight segments. These functions
compute the tangent at every interior pivot, remove the gradient's component along it (the nudge), add a
spring's restoring force along it, and move the pivots along the polyline so that the segment lengths
follow target spacing weights (the string method). None of them knows about models or data.
"""
from __future__ import annotations

import torch
from torch import Tensor

TANGENTS = ("improved", "reference")


def segment_lengths(chain: Tensor) -> Tensor:
    """Euclidean length of each of the P-1 segments of a ``[P, D]`` chain (float64 ``[P-1]``)."""
    return torch.linalg.vector_norm(chain[1:] - chain[:-1], dim=1).double()


def tangent_weights(energies: Tensor, plus_norm: Tensor, minus_norm: Tensor, rule: str = "improved") -> Tensor:
    """The weights ``[Q, 2]`` of tau+ and tau- in every interior pivot's (unnormalised) tangent, from the
    pivots' ``energies`` ``[P]`` and the lengths of tau+ and tau- ``[Q]`` (see :func:`tangents`)."""
    e = energies.to(plus_norm.dtype)
    up, down = e[2:] - e[1:-1], e[1:-1] - e[:-2]  # E_{i+1} - E_i and E_i - E_{i-1}
    d_max, d_min = torch.maximum(up.abs(), down.abs()), torch.minimum(up.abs(), down.abs())
    next_higher = e[2:] > e[:-2]
    if rule == "improved":  # the higher neighbour's direction gets dE_max
        w_plus, w_minus = torch.where(next_higher, d_max, d_min), torch.where(next_higher, d_min, d_max)
    else:  # the reference code's: unit vectors, the lower neighbour's direction gets dE_max
        w_plus = torch.where(next_higher, d_min, d_max) / plus_norm.clamp_min(1e-30)
        w_minus = torch.where(next_higher, d_max, d_min) / minus_norm.clamp_min(1e-30)
    one, zero = torch.ones_like(up), torch.zeros_like(up)
    rising, falling = (up > 0) & (down > 0), (up < 0) & (down < 0)
    w_plus, w_minus = torch.where(rising, one, torch.where(falling, zero, w_plus)), \
        torch.where(rising, zero, torch.where(falling, one, w_minus))
    flat = (w_plus == 0) & (w_minus == 0)  # equal energies: the bisector of the two unit directions
    w_plus = torch.where(flat, 1 / plus_norm.clamp_min(1e-30), w_plus)
    w_minus = torch.where(flat, 1 / minus_norm.clamp_min(1e-30), w_minus)
    return torch.stack([w_plus, w_minus], 1)


def tangents(chain: Tensor, energies: Tensor, rule: str = "improved") -> Tensor:
    """Unit tangents ``[P-2, D]`` at the interior pivots of ``chain`` with energies ``energies`` ``[P]``.

    ``"improved"`` is Henkelman & Jonsson's (2000) rule: with tau+ = theta_{i+1} - theta_i and
    tau- = theta_i - theta_{i-1}, tau = tau+ when E_{i+1} > E_i > E_{i-1}, tau = tau- when
    E_{i+1} < E_i < E_{i-1}; at a local extremum tau = tau+ dE_max + tau- dE_min when E_{i+1} > E_{i-1} and
    tau = tau+ dE_min + tau- dE_max otherwise (dE_max / dE_min: the larger / smaller of |E_{i+/-1} - E_i|).
    ``"reference"`` is the rule of Draxler et al.'s code: at an extremum it blends the two *unit* vectors and
    gives dE_max to the direction of the *lower* neighbour. Each tangent is a weighted sum of two
    neighbouring segments (:func:`tangent_weights`), formed for all pivots in one product of a
    ``[P-2, P-1]`` band of weights with the ``[P-1, D]`` segments.
    """
    if rule not in TANGENTS:
        raise ValueError(f"tangent must be one of {', '.join(TANGENTS)}; got {rule!r}")
    if chain.dim() != 2 or chain.shape[0] < 3 or energies.shape != (chain.shape[0],):
        raise ValueError(f"tangents need a [P, D] chain with P >= 3 and P energies; got {tuple(chain.shape)} "
                         f"and {tuple(energies.shape)}")
    segments = chain[1:] - chain[:-1]
    norms = torch.linalg.vector_norm(segments, dim=1)
    w = tangent_weights(energies, norms[1:], norms[:-1], rule)
    q = chain.shape[0] - 2
    band = segments.new_zeros(q, q + 1)
    rows = torch.arange(q, device=chain.device)
    band[rows, rows + 1], band[rows, rows] = w[:, 0], w[:, 1]
    tau = band @ segments
    return tau.div_(torch.linalg.vector_norm(tau, dim=1, keepdim=True).clamp_min_(1e-30))


def nudge(grad: Tensor, tangent: Tensor) -> Tensor:
    """The gradient's part perpendicular to the unit tangent, row by row: g - <g, tau> tau."""
    return grad - torch.linalg.vecdot(grad, tangent).unsqueeze(1) * tangent


def target_lengths(chain: Tensor, weights: Tensor) -> Tensor:
    """Each segment's share of the chain's current length, in proportion to ``weights`` (float64)."""
    w = weights.double()
    return segment_lengths(chain).sum() * w / w.sum()


def spring_gradient(chain: Tensor, tangent: Tensor, weights: Tensor, k: float) -> Tensor:
    """The gradient of the spring energy along the tangent: k ((d_{i-1} - d*_{i-1}) - (d_i - d*_i)) tau,
    with d the segment lengths and d* their targets (:func:`target_lengths`); a descent step along minus
    it moves each pivot towards its target spacing."""
    excess = segment_lengths(chain) - target_lengths(chain, weights)
    coef = (float(k) * (excess[:-1] - excess[1:])).to(tangent.dtype).unsqueeze(1)
    return coef * tangent


def redistribute(chain: Tensor, weights: Tensor) -> Tensor:
    """The chain's pivots moved along its own polyline so that segment lengths are proportional to
    ``weights`` (the string method's reparametrisation). The endpoints are kept bit for bit; every new
    pivot lies on the old polyline."""
    interior = redistributed_interior(chain, weights)
    if chain.shape[0] < 3:
        return chain.clone()
    return torch.cat([chain[:1], interior, chain[-1:]])


def redistributed_interior(chain: Tensor, weights: Tensor) -> Tensor:
    """The interior rows ``[P-2, D]`` of :func:`redistribute`'s chain (a new tensor; an AutoNEB iteration
    writes them back into its chain in place instead of concatenating a new one)."""
    p = chain.shape[0]
    if weights.shape != (p - 1,):
        raise ValueError(f"a chain of {p} pivots needs {p - 1} spacing weights; got {tuple(weights.shape)}")
    lengths = segment_lengths(chain)
    total = lengths.sum()
    if p < 3 or float(total) == 0.0:
        return chain[1:-1].clone()
    arc = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    w = weights.double()
    target = total * w.cumsum(0)[:-1] / w.sum()  # arc length of each interior pivot
    seg = (torch.searchsorted(arc, target, right=True) - 1).clamp(0, p - 2)
    frac = ((target - arc[seg]) / lengths[seg].clamp_min(1e-300)).clamp(0, 1).to(chain.dtype)
    mix = chain.new_zeros(p - 2, p)  # each new pivot: (1 - f) theta_seg + f theta_seg+1, all in one product
    rows = torch.arange(p - 2, device=chain.device)
    mix[rows, seg.to(chain.device)] = 1 - frac.to(chain.device)
    mix[rows, seg.to(chain.device) + 1] += frac.to(chain.device)
    return mix @ chain
