"""Tracer handlers for layers with parameters: which of their axes read, create or follow units.

Module handlers take ``(ctx, node, module, path)``; the ``*_units`` functions are their cores, shared with
composite layers (:mod:`modeconn.units.attention`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.units.groups import Param, Units
from modeconn.units.ops import elementwise, reshape_units
from modeconn.units.spec import UnitAxis

LAYER_NORM_WHY = "it normalizes across units (only BatchNorm is per unit)"


def _last_axis_units(ctx, s, ndim: int, what: str):
    if isinstance(s, Param):
        ctx.fail(f"{what} reading a parameter")
    if isinstance(s, Units) and (s.axis != ndim - 1 or s.head_axis is not None or s.stack_axis is not None):
        ctx.fail(f"{what} reading units that are not on the last axis")
    return s


def dense_units(ctx, s, ndim: int, weight: str, bias: str | None, size: int, layer: str, *,
                in_axis: int = 1, out_axis: int = 0) -> Units:
    """A Linear-like layer on the last axis: axis ``in_axis`` of ``weight`` (its columns) reads ``s``, axis
    ``out_axis`` (its rows) and ``bias`` make ``size`` new units (``h @ E.T`` with a tied embedding ``E``:
    the same axes)."""
    _last_axis_units(ctx, s, ndim, "a linear layer")
    if s is not None:
        ctx.G.attach(s.parts, "consumers", weight, in_axis)
    gid = ctx.G.new(layer, size, layer)
    ctx.G.attach([(gid, 1)], "producers", weight, out_axis)
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
    if isinstance(s, Units) and (s.axis != 1 or s.head_axis is not None or s.stack_axis is not None):
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
    """LayerNorm (or RMSNorm) over the last axes: permutation-equivariant; weight and bias follow the units."""
    return norm_units(ctx, s, ndim, len(m.normalized_shape), _state_keys(ctx, m, path, ("weight", "bias")),
                      f"layer {path!r} ({type(m).__name__})")


def norm_units(ctx, s, ndim: int, k: int, keys: list[str], label: str):
    """A norm over the last ``k`` axes whose per-entry ``keys`` (weight, bias) follow the units."""
    if s is None:
        return None
    if isinstance(s, Param) or s.head_axis is not None or s.stack_axis is not None or s.axis < ndim - k:
        ctx.fail("LayerNorm over axes that are not the units' axis")
    follow(ctx, s, keys, axis=s.axis - (ndim - k))
    ctx.G.mark(s.parts, mixing=f"{label}: {LAYER_NORM_WHY}")
    return s


def _arg(node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _own_keys(ctx, node, names: dict[str, int]) -> list[str]:
    """State keys of a functional norm's tensor arguments ``{name: position}``: each must be a whole
    parameter or buffer of the model (or absent)."""
    keys = []
    for name, i in names.items():
        a = _arg(node, i, name)
        if a is None:
            continue
        st = ctx.state(a)
        if not isinstance(st, Param) or st.axes != tuple(range(len(st.axes))):
            ctx.fail(f"its {name} is not a parameter or buffer of the model")
        keys.append(st.key)
    return keys


#: functional norms: {function: (kind, {tensor argument: position})}
FUNCTIONAL_NORMS = {
    F.layer_norm: ("layer", {"weight": 2, "bias": 3}), torch.layer_norm: ("layer", {"weight": 2, "bias": 3}),
    F.group_norm: ("group", {"weight": 2, "bias": 3}), torch.group_norm: ("group", {"weight": 2, "bias": 3}),
    F.batch_norm: ("batch", {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}),
    torch.batch_norm: ("batch", {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}),
    **({F.rms_norm: ("layer", {"weight": 2})} if hasattr(F, "rms_norm") else {}),
}


def functional_norm(ctx, node):
    """``F.layer_norm`` / ``F.group_norm`` / ``F.batch_norm`` (and ``torch.*``, ``F.rms_norm``) called with the
    model's own parameters (timm's LayerNorm and LayerNorm2d): treated like the modules."""
    kind, names = FUNCTIONAL_NORMS[node.target]
    keys = _own_keys(ctx, node, names)
    s = ctx.state(node.args[0])
    if s is None:
        return None
    if kind == "layer":
        shape = _arg(node, 1, "normalized_shape")
        k = 1 if isinstance(shape, int) else len(shape)
        return norm_units(ctx, s, len(ctx.shape(node)), k, keys, ctx.where)
    s = _channel_units(ctx, s, "a functional norm")
    if kind == "group":
        if len(s.parts) != 1 or s.parts[0][1] != 1:
            ctx.fail("GroupNorm over concatenated unit groups")
        ctx.G.set_blocks(s.parts[0][0], int(_arg(node, 1, "num_groups")), ctx.where)
        ctx.G.mark(s.parts, mixing=f"{ctx.where}: it normalizes across the units of each group")
    follow(ctx, s, keys)
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
