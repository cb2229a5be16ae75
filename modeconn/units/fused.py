"""Tracer handlers for taking a fused q/k/v tensor apart, and for attribute views of tensors.

A fused projection ``Linear(d, 3d)`` viewed as ``(B, N, 3, heads, d_head)`` (timm's ViT / DeiT) is a
stacked :class:`~modeconn.units.groups.Units`: ``unbind`` or an integer index on its stack axis gives q, k
and v, each one piece (one unit group, in head blocks). ``W.T`` / ``W.mT`` of a parameter (the tied output
``h @ E.T``) or of hidden units moves their axes like ``permute``.
"""
from __future__ import annotations

import operator

import torch

from modeconn.units import ops
from modeconn.units.groups import Param, Units


def _arg(node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def unbind(ctx, node):
    """``x.unbind(dim)``: along a stack axis, its pieces; along another axis, the same units each."""
    s = ops.elementwise(ctx, node)
    shape = ctx.shape(node.args[0])
    if s is None or shape is None:
        return None
    dim = int(_arg(node, 1, "dim", 0)) % len(shape)
    new = lambda a: a - (a > dim)  # noqa: E731
    if isinstance(s, Param):
        if s.axes[dim] is not None:
            ctx.fail("it unbinds a parameter along one of its own axes")
        return tuple(Param(s.key, s.axes[:dim] + s.axes[dim + 1:]) for _ in range(shape[dim]))
    if s.stack_axis == dim:
        return tuple(s.piece(i, new) for i in range(shape[dim]))
    if dim in (s.axis, s.head_axis):
        ctx.fail("it unbinds the unit axis of a hidden-unit tensor")
    return tuple(s.moved(new) for _ in range(shape[dim]))


def getitem(ctx, node):
    """``qkv[i]`` on the stack axis (``qkv[:, :, i]`` too) picks q, k or v; anything else as
    :func:`modeconn.units.ops.getitem`, which refuses other indexing of a stacked tensor's units."""
    s, idx = ctx.state(node.args[0]), node.args[1]
    if not (isinstance(s, Units) and s.stack_axis is not None):
        return ops.getitem(ctx, node)
    items = idx if isinstance(idx, tuple) else (idx,)
    *lead, last = items
    if not isinstance(last, int) or len(lead) != s.stack_axis or any(i != slice(None) for i in lead):
        ctx.fail("it indexes a fused q/k/v tensor other than by one integer on its stack axis")
    n = ctx.shape(node.args[0])[s.stack_axis]
    return s.piece(last % n, lambda a: a - (a > s.stack_axis))


def attribute(ctx, node):
    """``getattr(x, name)``: ``.T`` reverses the axes, ``.mT`` swaps the last two; other attributes
    (``shape``, ``dtype``, ...) are not tensors with units."""
    name, s, shape = node.args[1], ctx.state(node.args[0]), ctx.shape(node.args[0])
    if name not in ("T", "mT") or s is None or shape is None or isinstance(s, tuple):
        return None
    order = list(range(len(shape)))
    order = order[::-1] if name == "T" else order[:-2] + order[-2:][::-1]
    return ops.permute_state(s, order)


#: handlers that may read a stacked (fused q/k/v) tensor before it is taken apart
STACK_OK = {ops.elementwise, ops.non_tensor, ops.transpose, ops.reshape, unbind, getitem, attribute}
FUNCTIONS = {getattr: attribute, torch.unbind: unbind, operator.getitem: getitem, torch.t: ops.transpose}
METHODS = {"unbind": unbind, "t": ops.transpose}
