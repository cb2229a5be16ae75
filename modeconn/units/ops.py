"""Tracer handlers for parameter-free tensor operations: how each moves a tensor's units.

Each handler takes the tracing context and the fx node and returns the output's units (a
:class:`~modeconn.units.groups.Units`, a :class:`~modeconn.units.groups.Param`, ``None`` for a tensor
without hidden units, or a tuple of those for tuple-valued nodes).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.node import Node

from modeconn.units.groups import Param, Units


def tensor_states(ctx, node) -> list:
    return [s for s in (ctx.state(a) for a in ctx.inputs(node)) if s is not None]


def elementwise(ctx, node):
    """Activations, dropout, softmax, copies: units stay where they are."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    s = ctx.state(x)
    if len(tensor_states(ctx, node)) > (s is not None):
        ctx.fail("it takes more than one hidden-unit tensor")
    return s


def non_tensor(ctx, node):
    return None


def pool(ctx, node):
    """Pooling over the spatial axes of ``(N, C, ...)``."""
    s = elementwise(ctx, node)
    if isinstance(s, Units) and (s.axis != 1 or s.head_axis is not None or any(b != 1 for _, b in s.parts)
                                 or len(ctx.shape(node.args[0]) or ()) < 3):
        ctx.fail("pooling over the unit axis of a hidden-unit tensor")
    if isinstance(s, Param):
        ctx.fail("pooling a parameter")
    return s


def _norm_axis(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def reshape_units(ctx, s, in_shape, out_shape):
    """Units of a reshaped tensor: the unit axis may move with merged leading axes, absorb trailing axes
    (flatten: ``block`` grows), give them back (unflatten), or split into (heads, head dim) and back."""
    if s is None:
        return None
    if isinstance(s, Param):
        return _reshape_param(ctx, s, in_shape, out_shape)
    if in_shape is None or out_shape is None:
        ctx.fail("it reshapes a hidden-unit tensor of unknown shape")
    if s.stack_axis is not None and tuple(in_shape) != tuple(out_shape):
        ctx.fail("it reshapes a fused q/k/v tensor before taking it apart")
    lead = lambda shape, k: _prod(shape[:k])  # noqa: E731
    if s.head_axis is not None:  # (heads, head dim) merged back into one axis
        h, a = s.head_axis, s.axis
        if a == h + 1:
            for b in range(len(out_shape)):
                if lead(out_shape, b) == lead(in_shape, h) and out_shape[b] == in_shape[h] * in_shape[a]:
                    return Units(b, s.parts)
        if tuple(in_shape) == tuple(out_shape):
            return s
        ctx.fail(f"it reshapes attention heads {tuple(in_shape)} -> {tuple(out_shape)} in a way that mixes "
                 "them with other axes")
    a, n = s.axis, in_shape[s.axis]
    cands = [b for b in range(len(out_shape)) if lead(out_shape, b) == lead(in_shape, a)]
    for b in cands:  # the unit axis kept (leading or trailing axes reshaped around it)
        if out_shape[b] == n:
            return Units(b, s.parts)
    for b in cands:  # trailing axes flattened into the unit axis
        m = out_shape[b]
        if m > n and m % n == 0 and _prod(in_shape[a + 1:a + 1 + _count_to(in_shape[a + 1:], m // n)]) == m // n:
            return Units(b, tuple((g, blk * (m // n)) for g, blk in s.parts))
    for b in cands:  # a flatten undone
        m = out_shape[b]
        if 1 < m < n and n % m == 0 and all(blk % (n // m) == 0 for _, blk in s.parts):
            return Units(b, tuple((g, blk // (n // m)) for g, blk in s.parts))
    for b in cands:  # (E) -> (heads, head dim)
        m = out_shape[b]
        if 1 < m < n and b + 1 < len(out_shape) and m * out_shape[b + 1] == n and len(s.parts) == 1 \
                and s.parts[0][1] == 1:
            ctx.G.set_blocks(s.parts[0][0], m, ctx.where)
            return Units(b + 1, s.parts, head_axis=b)
    for b in cands:  # fused q/k/v: (k*E) -> (k, heads, head dim), k pieces of one group each
        m = out_shape[b]
        if 1 < m < n and b + 2 < len(out_shape) and m * out_shape[b + 1] * out_shape[b + 2] == n \
                and all(blk == 1 for _, blk in s.parts):
            pieces = ctx.G.cut(s.parts, [n // m] * m, ctx.where)
            if any(len(p) != 1 for p in pieces):
                ctx.fail("a fused q/k/v view whose pieces are not one unit group each")
            for (gid, _), in pieces:
                ctx.G.set_blocks(gid, out_shape[b + 1], ctx.where)
            return Units(b + 2, ctx.G.leaves(s.parts), b + 1, stack_axis=b, pieces=tuple(pieces))
    ctx.fail(f"it reshapes a hidden-unit tensor {tuple(in_shape)} -> {tuple(out_shape)} in a way that splits "
             "units or mixes them with other axes")


def _reshape_param(ctx, s: Param, in_shape, out_shape) -> Param:
    """A parameter viewed with axes of length 1 added or dropped (``gamma.reshape(1, -1, 1, 1)``)."""
    if in_shape is None or out_shape is None:
        ctx.fail("it reshapes a parameter of unknown shape")
    kept = [i for i, d in enumerate(in_shape) if d != 1]
    if [in_shape[i] for i in kept] != [d for d in out_shape if d != 1]:
        ctx.fail("it reshapes a parameter")
    src = iter(kept)
    return Param(s.key, tuple(None if d == 1 else s.axes[next(src)] for d in out_shape))


def _count_to(shape, k: int) -> int:
    """How many leading entries of ``shape`` multiply to ``k`` (or len(shape) + 1 if none)."""
    p = 1
    for i, x in enumerate(shape):
        p *= int(x)
        if p == k:
            return i + 1
    return len(shape) + 1


def reshape(ctx, node):
    return reshape_units(ctx, elementwise(ctx, node), ctx.shape(node.args[0]), ctx.shape(node))


def permute_state(s, order: list[int]):
    """Units after ``x.permute(order)`` (output axis i = input axis order[i])."""
    if isinstance(s, Param):
        return Param(s.key, tuple(s.axes[o] for o in order))
    inv = {old: new for new, old in enumerate(order)}
    return s.moved(inv.__getitem__)


def transpose(ctx, node):
    s = elementwise(ctx, node)
    shape = ctx.shape(node.args[0])
    if s is None or shape is None:
        return s
    nd = len(shape)
    if node.target in ("permute",) or getattr(node.target, "__name__", "") == "permute":
        dims = node.args[1:] if node.op == "call_method" else node.args[1]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        order = [_norm_axis(int(d), nd) for d in dims]
    else:
        d0 = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim0", 0)
        d1 = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim1", 1)
        d0, d1 = _norm_axis(d0, nd), _norm_axis(d1, nd)
        order = list(range(nd))
        order[d0], order[d1] = d1, d0
    return permute_state(s, order)


def expand(ctx, node):
    s = elementwise(ctx, node)
    ins, outs = ctx.shape(node.args[0]), ctx.shape(node)
    if s is None or ins is None or outs is None:
        return s
    shift = len(outs) - len(ins)
    if isinstance(s, Param):
        return Param(s.key, (None,) * shift + s.axes)
    if outs[s.axis + shift] != ins[s.axis]:
        ctx.fail("it expands the unit axis")
    return s.moved(lambda a: a + shift)


def reduce(ctx, node):
    """mean / sum / amax: over the units (invariant) or over other axes (units stay)."""
    s = elementwise(ctx, node)
    shape = ctx.shape(node.args[0])
    if s is None or shape is None:
        return s
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None:
        return None
    dims = {_norm_axis(d, len(shape)) for d in ((dims,) if isinstance(dims, int) else dims)}
    if isinstance(s, Param):
        ctx.fail("it reduces a parameter")
    unit_axes = {s.axis} | ({s.head_axis} if s.head_axis is not None else set())
    if unit_axes <= dims:
        return None
    if unit_axes & dims:
        ctx.fail("it reduces over part of the units (heads or head dimension only)")
    return s if keep else s.moved(lambda a: a - sum(d < a for d in dims))


def binary(ctx, node):
    """``+ - * /`` of tensors: units on the aligned axes are one group (a residual addition merges)."""
    out_shape = ctx.shape(node)
    operands = [a for a in ctx.inputs(node) if ctx.shape(a) is not None]
    if out_shape is None or not operands:
        return None
    nd = len(out_shape)
    units = [(a, ctx.state(a)) for a in operands if isinstance(ctx.state(a), Units)]
    if not units:
        return None
    aligned = {(s.axis + nd - len(ctx.shape(a)), None if s.head_axis is None else s.head_axis + nd - len(ctx.shape(a)))
               for a, s in units}
    if len(aligned) != 1:
        ctx.fail("it combines tensors whose units lie on different axes")
    axis, head = aligned.pop()
    scores = any(s.scores for _, s in units)
    if scores and len(units) > 1:
        ctx.fail("it combines attention scores with other hidden-unit tensors")
    parts = units[0][1].parts
    for a, s in units:
        shp = ctx.shape(a)
        if shp[s.axis] != out_shape[axis]:
            ctx.fail(f"it broadcasts the hidden-unit tensor {a.name} {shp} along the unit axis")
        parts = ctx.G.unify(parts, s.parts, ctx.where)
    for a in operands:
        s, shp = ctx.state(a), ctx.shape(a)
        pos = axis - (nd - len(shp))
        if isinstance(s, Units) or pos < 0 or shp[pos] == 1:
            continue
        if isinstance(s, Param) and s.axes[pos] is not None and head is None and not scores:
            ctx.G.attach(parts, "producers", s.key, s.axes[pos])
            continue
        ctx.fail(f"it combines hidden units with a tensor ({a.name}, shape {shp}) that has its own, "
                 "unpermutable, unit axis")
    return Units(axis, ctx.G.leaves(parts), head, scores)


def cat(ctx, node):
    """``torch.cat``: along the unit axis the parts are concatenated (each keeps its permutation); along
    another axis (tokens) the inputs' units are one group."""
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out_shape = ctx.shape(node)
    states = [ctx.state(t) for t in tensors]
    units = [s for s in states if isinstance(s, Units)]
    if not units:
        return None
    if len({(s.axis, s.head_axis) for s in units}) != 1 or units[0].head_axis is not None:
        ctx.fail("it concatenates tensors whose units lie on different axes")
    axis, dim = units[0].axis, _norm_axis(dim, len(out_shape))
    if dim == axis:
        parts = []
        for t, s in zip(tensors, states):
            if isinstance(s, Units):
                parts.extend(s.parts)
                continue
            n = ctx.shape(t)[dim]
            gid = ctx.G.new(f"{node.name}.{t.name}", n)
            if isinstance(s, Param) and s.axes[dim] is not None:
                ctx.G.attach([(gid, 1)], "producers", s.key, s.axes[dim])
            else:
                ctx.G.poison([(gid, 1)], "")  # the model input's (or a constant's) channels stay put
            parts.append((gid, 1))
        return Units(axis, ctx.G.leaves(parts))
    parts = units[0].parts
    for s in units[1:]:
        parts = ctx.G.unify(parts, s.parts, ctx.where)
    for t, s in zip(tensors, states):
        if isinstance(s, Param) and s.axes[axis] is not None:
            ctx.G.attach(parts, "producers", s.key, s.axes[axis])
        elif not isinstance(s, Units):
            ctx.fail(f"it concatenates hidden units with a tensor ({t.name}) whose unit axis cannot be permuted")
    return Units(axis, ctx.G.leaves(parts))


def split(ctx, node):
    """``split`` / ``chunk``: along the unit axis each piece gets its own part of the groups."""
    s = elementwise(ctx, node)
    metas = node.meta.get("tensor_meta")
    shape = ctx.shape(node.args[0])
    if s is None or not isinstance(metas, (tuple, list)):
        return s
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = _norm_axis(dim, len(shape))
    if isinstance(s, Param) or dim not in (s.axis, s.head_axis):
        return tuple(s for _ in metas)
    if dim != s.axis or s.head_axis is not None:
        ctx.fail("it splits attention heads")
    pieces = ctx.G.cut(s.parts, [int(m.shape[dim]) for m in metas], ctx.where)
    return tuple(Units(s.axis, p) for p in pieces)


def getitem(ctx, node):
    """``x[i]`` of a tuple, or basic indexing of a tensor (ints, slices, None, ...) away from the units."""
    base, idx = node.args[0], node.args[1]
    s = ctx.state(base)
    if isinstance(s, tuple):
        return s[idx] if isinstance(idx, int) else ctx.fail("slicing a tuple of hidden-unit tensors")
    shape, out_shape = ctx.shape(base), ctx.shape(node)
    if s is None or shape is None:
        return None
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, Node) for i in items):
        ctx.fail("advanced (tensor) indexing of a hidden-unit tensor")
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    full = []
    for i in items:
        full.extend([slice(None)] * (len(shape) - used) if i is Ellipsis else [i])
    full.extend([slice(None)] * (len(shape) - sum(1 for i in full if i is not None)))
    new_of: dict[int, int] = {}
    src, dst = 0, 0
    for i in full:
        if i is None:
            dst += 1
            continue
        if isinstance(i, slice):
            new_of[src] = dst
            dst += 1
        src += 1
    if isinstance(s, Param):
        axes = [None] * len(out_shape)
        for old, new in new_of.items():
            axes[new] = s.axes[old]
        return Param(s.key, tuple(axes))
    for a in {s.axis} | ({s.head_axis} if s.head_axis is not None else set()):
        if a not in new_of or out_shape[new_of[a]] != shape[a]:
            ctx.fail("it indexes into the unit axis")
    return s.moved(new_of.__getitem__)


ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.SiLU,
    nn.Mish, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.Softsign,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax,
)
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.gelu, F.elu, F.selu, F.celu, F.silu,
    F.mish, F.softplus, F.hardtanh, F.hardswish, F.hardsigmoid, torch.sigmoid, torch.tanh, F.sigmoid,
    F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, operator.neg, operator.pos, torch.neg,
    torch.abs, torch.exp, torch.clamp, torch.square, torch.sqrt, torch.rsqrt, torch.dropout, torch.feature_dropout,
    torch.alpha_dropout, torch.feature_alpha_dropout,
}
#: elementwise functions known by qualified name, so their packages need not be imported: stochastic depth
#: zeroes whole samples (rows), which commutes with any permutation of units (and is the identity in eval)
NAMED_ELEMENTWISE = {"torchvision.ops.stochastic_depth.stochastic_depth", "timm.layers.drop.drop_path"}
POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
}
BINARY_FUNCTIONS = {
    operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub,
    operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
}
ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "softmax", "log_softmax",
    "neg", "abs", "exp", "clamp", "square", "float", "double", "to", "type_as", "sqrt", "rsqrt", "dropout",
}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten"}
REDUCE_METHODS = {"mean", "sum", "amax"}
NON_TENSOR_METHODS = {"size", "dim", "numel"}

#: call_function targets -> handler
FUNCTIONS = {
    **{f: elementwise for f in ELEMENTWISE_FUNCTIONS}, **{f: pool for f in POOL_FUNCTIONS},
    **{f: binary for f in BINARY_FUNCTIONS}, torch.flatten: reshape, torch.reshape: reshape,
    torch.mean: reduce, torch.sum: reduce, torch.amax: reduce, getattr: non_tensor, operator.getitem: getitem,
    torch.cat: cat, torch.concat: cat, torch.split: split, torch.chunk: split, torch.transpose: transpose,
    torch.permute: transpose, torch._assert: non_tensor,
}
#: call_method names -> handler
METHODS = {
    **{m: elementwise for m in ELEMENTWISE_METHODS}, **{m: binary for m in BINARY_METHODS},
    **{m: reshape for m in RESHAPE_METHODS}, **{m: reduce for m in REDUCE_METHODS},
    **{m: non_tensor for m in NON_TENSOR_METHODS}, "split": split, "chunk": split, "transpose": transpose,
    "permute": transpose, "expand": expand, "masked_fill": binary,
}
#: handlers that understand attention scores (``Units.scores``); every other one refuses them
SCORES_OK = {elementwise, non_tensor, binary, transpose, expand, reduce, getitem}
