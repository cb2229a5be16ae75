"""Tracer handlers for layers with parameters: which of their axes read, create or follow units.

Module handlers take ``(ctx, node, module, path)``; the ``*_units`` functions are their cores, shared with
composite layers (:mod:`modeconn.units.attention`).
"""
from __future__ import annotations

from torch import nn

from modeconn.units.groups import Param, Units
from modeconn.units.ops import elementwise, reshape_units
from modeconn.units.spec import UnitAxis

LAYER_NORM_WHY = "it normalizes across units (only BatchNorm is per unit)"


def _last_axis_units(ctx, s, ndim: int, what: str):
    if isinstance(s, Param):
        ctx.fail(f"{what} reading a parameter")
    if isinstance(s, Units) and (s.axis != ndim - 1 or s.head_axis is not None):
        ctx.fail(f"{what} reading units that are not on the last axis")
    return s


def dense_units(ctx, s, ndim: int, weight: str, bias: str | None, size: int, layer: str) -> Units:
    """A Linear-like layer on the last axis: ``weight`` columns read ``s``, its rows and ``bias`` make
    ``size`` new units."""
    _last_axis_units(ctx, s, ndim, "a linear layer")
    if s is not None:
        ctx.G.attach(s.parts, "consumers", weight, 1)
    gid = ctx.G.new(layer, size, layer)
    ctx.G.attach([(gid, 1)], "producers", weight, 0)
    if bias is not None:
        ctx.G.attach([(gid, 1)], "producers", bias, 0)
    return Units(ndim - 1, ((gid, 1),))


def linear(ctx, node, m: nn.Linear, path: str):
    return dense_units(ctx, elementwise(ctx, node), len(ctx.shape(node)), ctx.key(path, "weight"),
                       ctx.key(path, "bias") if m.bias is not None else None, m.out_features, path)


def functional_linear(ctx, node):
    """``F.linear(x, weight, bias)`` with the weight (and bias) read from the model (tied embeddings)."""
    x = ctx.state(node.args[0])
    w = ctx.state(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
    b = ctx.state(node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
    if not isinstance(w, Param) or w.axes != (0, 1) or (b is not None and not isinstance(b, Param)):
        ctx.fail("F.linear whose weight is not a parameter of the model")
    shape = ctx.shape(node)
    return dense_units(ctx, x, len(shape), w.key, b.key if b is not None else None, shape[-1], w.key.rsplit(".", 1)[0])


def follow(ctx, s, keys: list[str], axis: int = 0) -> None:
    """Per-unit parameters and buffers (norm weights, running statistics) follow ``s``'s units."""
    for k in keys:
        ctx.G.attach(s.parts, "producers", k, axis)


def _state_keys(ctx, m: nn.Module, path: str, names) -> list[str]:
    return [ctx.key(path, n) for n in names if getattr(m, n, None) is not None]


def _channel_units(ctx, s, what: str):
    if isinstance(s, Param):
        ctx.fail(f"{what} reading a parameter")
    if isinstance(s, Units) and (s.axis != 1 or s.head_axis is not None):
        ctx.fail(f"{what} reading units that are not on the channel axis (axis 1)")
    return s


def conv(ctx, node, m: nn.modules.conv._ConvNd, path: str):
    """Conv layers: groups=1 reads and makes units; a depthwise conv keeps its input's units; groups=g ties
    the input's and output's g blocks (one block permutation, independent permutations inside blocks)."""
    s = _channel_units(ctx, elementwise(ctx, node), "a convolution")
    if isinstance(s, Units) and any(b != 1 for _, b in s.parts):
        ctx.fail("a convolution reading a blocked (flattened) unit axis")
    w, b = ctx.key(path, "weight"), ctx.key(path, "bias") if m.bias is not None else None
    g = m.groups
    if g > 1 and m.in_channels == g and m.out_channels == g and s is not None:  # depthwise: units stay
        follow(ctx, s, [w] + ([b] if b else []))
        ctx.G.mark(s.parts, layer=path)
        return s
    gid = ctx.G.new(path, m.out_channels, path)
    ctx.G.attach([(gid, 1)], "producers", w, 0)
    if b:
        ctx.G.attach([(gid, 1)], "producers", b, 0)
    if g == 1:
        if s is not None:
            ctx.G.attach(s.parts, "consumers", w, 1)
        return Units(1, ((gid, 1),))
    ctx.G.set_blocks(gid, g, ctx.where)
    if s is None:  # the model input's blocks cannot move, nor can this layer's
        src = ctx.G.new(f"{path}.input", m.in_channels, blocks=g)
        ctx.G.poison([(src, 1)], "")
    elif len(s.parts) != 1:
        ctx.fail("a grouped convolution reading concatenated unit groups")
    else:
        src = s.parts[0][0]
        ctx.G.set_blocks(src, g, ctx.where)
    ctx.G.tie(src, gid, ctx.where)
    ctx.G[src].consumers.append(UnitAxis(w, 1, within=0))
    return Units(1, ((gid, 1),))


def batchnorm(ctx, node, m: nn.modules.batchnorm._BatchNorm, path: str):
    s = _channel_units(ctx, elementwise(ctx, node), "BatchNorm")
    if s is not None:
        follow(ctx, s, _state_keys(ctx, m, path, ("weight", "bias", "running_mean", "running_var")))
    return s


def prelu(ctx, node, m: nn.PReLU, path: str):
    s = _channel_units(ctx, elementwise(ctx, node), "PReLU")
    if s is not None and m.num_parameters > 1:
        follow(ctx, s, [ctx.key(path, "weight")])
    return s


def layernorm(ctx, node, m: nn.LayerNorm, path: str):
    return layernorm_units(ctx, elementwise(ctx, node), len(ctx.shape(node)), m, path)


def layernorm_units(ctx, s, ndim: int, m: nn.LayerNorm, path: str):
    """LayerNorm over the last axes: permutation-equivariant; weight and bias follow the units."""
    if s is None:
        return None
    k = len(m.normalized_shape)
    if isinstance(s, Param) or s.head_axis is not None or s.axis < ndim - k:
        ctx.fail("LayerNorm over axes that are not the units' axis")
    follow(ctx, s, _state_keys(ctx, m, path, ("weight", "bias")), axis=s.axis - (ndim - k))
    ctx.G.mark(s.parts, mixing=f"layer {path!r} (LayerNorm): {LAYER_NORM_WHY}")
    return s


def groupnorm(ctx, node, m: nn.GroupNorm, path: str):
    """GroupNorm(G, C): G blocks of units, normalized per block; blocks move as wholes."""
    s = _channel_units(ctx, elementwise(ctx, node), "GroupNorm")
    if s is None:
        return None
    if len(s.parts) != 1 or s.parts[0][1] != 1:
        ctx.fail("GroupNorm over concatenated unit groups")
    ctx.G.set_blocks(s.parts[0][0], m.num_groups, ctx.where)
    follow(ctx, s, _state_keys(ctx, m, path, ("weight", "bias")))
    ctx.G.mark(s.parts, mixing=f"layer {path!r} (GroupNorm): it normalizes across the units of each group")
    return s


def embedding(ctx, node, m: nn.Embedding, path: str):
    """An embedding table's columns make the embedding units (on the output's last axis)."""
    if elementwise(ctx, node) is not None:
        ctx.fail("an embedding looking up hidden units")
    gid = ctx.G.new(path, m.embedding_dim, path)
    ctx.G.attach([(gid, 1)], "producers", ctx.key(path, "weight"), 1)
    return Units(len(ctx.shape(node)) - 1, ((gid, 1),))


def flatten(ctx, node, m, path: str):
    return reshape_units(ctx, elementwise(ctx, node), ctx.shape(node.args[0]), ctx.shape(node))
