"""Tracer handlers for attention: ``nn.MultiheadAttention``, ``nn.TransformerEncoder(Layer)`` (leaf modules
for fx, described from their parameters) and ``F.scaled_dot_product_attention``.

Symmetries used: the heads are blocks permuted as wholes, one block permutation for the query/key units
and the value/output units of an attention; inside each head, query and key share one permutation of the
head dimension, value and the output projection's columns another. Not used: scaling q by c and k by 1/c,
any invertible (non-permutation) map of a head's query/key space, or of its value space.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.units.groups import Param, Units
from modeconn.units.layers import dense_units, layernorm_units
from modeconn.units.ops import ELEMENTWISE_FUNCTIONS, ELEMENTWISE_MODULES
from modeconn.units.spec import UnitAxis


def _arg(node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _rows(key: str, axis: int, offsets: list[int]) -> list[UnitAxis]:
    return [UnitAxis(key, axis, 1, off) for off in offsets]


def _stream(ctx, s, ndim: int, what: str):
    if s is not None and (not isinstance(s, Units) or s.axis != ndim - 1 or s.head_axis is not None):
        ctx.fail(f"{what} reading units that are not on the last axis")
    return s


def mha_units(ctx, m: nn.MultiheadAttention, path: str, q, k, v, ndim: int) -> Units:
    """q/k/v: the units of the query, key and value inputs; returns the attention output's units."""
    E, H = m.embed_dim, m.num_heads
    key = lambda n: ctx.key(path, n)  # noqa: E731
    why = f"layer {path!r} (MultiheadAttention): a head's units are read jointly by its attention"
    qk = ctx.G.new(f"{path}.qk", E, blocks=H)
    vo = ctx.G.new(f"{path}.vo", E, blocks=H)
    ctx.G.tie(qk, vo, ctx.where)
    ctx.G.mark([(qk, 1), (vo, 1)], mixing=why)
    if m._qkv_same_embed_dim:
        for other in (k, v):
            if (q is None) != (other is None):
                ctx.fail("attention whose query, key and value inputs differ in having hidden units")
            if q is not None:
                ctx.G.unify(q.parts, other.parts, ctx.where)
        if q is not None:
            ctx.G.attach(q.parts, "consumers", key("in_proj_weight"), 1)
        rows = [("in_proj_weight", 0), ("in_proj_bias", 0)]
        for name, axis in rows:
            if getattr(m, name) is None:
                continue
            ctx.G[qk].producers.extend(_rows(key(name), axis, [0, E]))
            ctx.G[vo].producers.extend(_rows(key(name), axis, [2 * E]))
    else:
        for s, w, grp in ((q, "q_proj_weight", qk), (k, "k_proj_weight", qk), (v, "v_proj_weight", vo)):
            if s is not None:
                ctx.G.attach(s.parts, "consumers", key(w), 1)
            ctx.G[grp].producers.extend(_rows(key(w), 0, [0]))
        if m.in_proj_bias is not None:
            ctx.G[qk].producers.extend(_rows(key("in_proj_bias"), 0, [0, E]))
            ctx.G[vo].producers.extend(_rows(key("in_proj_bias"), 0, [2 * E]))
    for name, grp in (("bias_k", qk), ("bias_v", vo)):
        if getattr(m, name) is not None:
            ctx.G[grp].producers.extend(_rows(key(name), 2, [0]))
    ctx.G[vo].consumers.extend(_rows(key("out_proj.weight"), 1, [0]))
    out_bias = key("out_proj.bias") if m.out_proj.bias is not None else None
    return dense_units(ctx, None, ndim, key("out_proj.weight"), out_bias, E, key("out_proj"))


def multihead_attention(ctx, node, m: nn.MultiheadAttention, path: str):
    nd = len(ctx.shape(node.args[0]))
    q, k, v = (_stream(ctx, ctx.state(_arg(node, i, n)), nd, "attention")
               for i, n in enumerate(("query", "key", "value")))
    for i, n in ((3, "key_padding_mask"), (5, "attn_mask")):
        if ctx.state(_arg(node, i, n)) is not None:
            ctx.fail("an attention mask with hidden units")
    return (mha_units(ctx, m, path, q, k, v, nd), None)


def _residual(ctx, x, y):
    if x is None:
        ctx.fail("a residual addition to a tensor without hidden units")
    return Units(x.axis, ctx.G.unify(x.parts, y.parts, ctx.where))


def encoder_layer_units(ctx, m: nn.TransformerEncoderLayer, path: str, x, ndim: int):
    act = m.activation
    if not (act in ELEMENTWISE_FUNCTIONS or isinstance(act, ELEMENTWISE_MODULES)):
        ctx.fail(f"a transformer layer with activation {act!r}")
    p = lambda n: ctx.key(path, n)  # noqa: E731

    def norm(name, s):
        return layernorm_units(ctx, s, ndim, getattr(m, name), p(name))

    def attend(s):
        return mha_units(ctx, m.self_attn, p("self_attn"), s, s, s, ndim)

    def feed_forward(s):
        h = dense_units(ctx, s, ndim, p("linear1.weight"), p("linear1.bias") if m.linear1.bias is not None else None,
                        m.linear1.out_features, p("linear1"))
        return dense_units(ctx, h, ndim, p("linear2.weight"), p("linear2.bias") if m.linear2.bias is not None else None,
                           m.linear2.out_features, p("linear2"))

    if m.norm_first:
        x = _residual(ctx, x, attend(norm("norm1", x)))
        return _residual(ctx, x, feed_forward(norm("norm2", x)))
    x = norm("norm1", _residual(ctx, x, attend(x)))
    return norm("norm2", _residual(ctx, x, feed_forward(x)))


def transformer_encoder_layer(ctx, node, m, path: str):
    nd = len(ctx.shape(node.args[0]))
    return encoder_layer_units(ctx, m, path, _stream(ctx, ctx.state(node.args[0]), nd, "a transformer layer"), nd)


def transformer_encoder(ctx, node, m: nn.TransformerEncoder, path: str):
    nd = len(ctx.shape(node.args[0]))
    x = _stream(ctx, ctx.state(node.args[0]), nd, "a transformer encoder")
    for i, layer in enumerate(m.layers):
        if not isinstance(layer, nn.TransformerEncoderLayer):
            ctx.fail(f"an encoder layer of type {type(layer).__name__}")
        x = encoder_layer_units(ctx, layer, ctx.key(path, f"layers.{i}"), x, nd)
    if m.norm is not None:
        if not isinstance(m.norm, nn.LayerNorm):
            ctx.fail(f"a final norm of type {type(m.norm).__name__}")
        x = layernorm_units(ctx, x, nd, m.norm, ctx.key(path, "norm"))
    return x


def scaled_dot_product_attention(ctx, node):
    """``F.scaled_dot_product_attention(q, k, v)``: q and k units are one group; with heads split out by a
    view, v's heads move with q/k's (a tie)."""
    q, k, v = (ctx.state(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    if ctx.state(_arg(node, 3, "attn_mask")) is not None:
        ctx.fail("an attention mask with hidden units")
    if not all(isinstance(s, Units) for s in (q, k, v)):
        ctx.fail("attention whose query, key or value has no hidden units")
    nd = len(ctx.shape(node))
    for s in (q, k, v):
        if s.axis != nd - 1 or len(s.parts) != 1 or s.parts[0][1] != 1:
            ctx.fail("attention whose head dimension is not the last axis of one unit group")
    if q.head_axis != k.head_axis or (q.head_axis is None) != (v.head_axis is None):
        ctx.fail("attention whose query, key and value split heads differently")
    ctx.G.union(q.parts[0][0], k.parts[0][0], ctx.where)
    if v.head_axis is not None:
        ctx.G.tie(q.parts[0][0], v.parts[0][0], ctx.where)
    why = f"{ctx.where}: a head's units are read jointly by its attention"
    ctx.G.mark(q.parts + v.parts, mixing=why)
    return v


def _heads_at(s, offset: int):
    """The output axis of ``s``'s heads (``None`` without heads) for an operand ``offset`` axes shorter."""
    if s.scores:
        return s.axis + offset
    return None if s.head_axis is None else s.head_axis + offset


def matmul(ctx, node):
    """Attention written out: ``q @ k.transpose(-2, -1)`` contracts the q/k units (one group; the result
    holds the heads only, as scores), ``scores @ v`` ties v's heads to q/k's; a product with an unpermuted
    matrix keeps the units of the other operand's free axis."""
    a, b = node.args[0], node.args[1]
    sa, sb = ctx.state(a), ctx.state(b)
    na, nb, nd = len(ctx.shape(a) or ()), len(ctx.shape(b) or ()), len(ctx.shape(node) or ())
    if isinstance(sb, Param) and not isinstance(sa, Param) and na >= 2 and nb == 2:
        return _times_param(ctx, node, sa, sb, nd)
    if min(na, nb) < 2 or isinstance(sa, Param) or isinstance(sb, Param):
        ctx.fail("a matrix product of vectors or with a parameter")
    off_a, off_b = nd - na, nd - nb
    why = f"{ctx.where}: a head's units are read jointly by its attention"
    single = lambda s: len(s.parts) == 1 and s.parts[0][1] == 1  # noqa: E731
    if isinstance(sa, Units) and isinstance(sb, Units):
        ha, hb = _heads_at(sa, off_a), _heads_at(sb, off_b)
        if ha != hb or not (single(sa) and single(sb)):
            ctx.fail("a product of hidden-unit tensors whose heads do not line up")
        if not sa.scores and not sb.scores and sa.axis == na - 1 and sb.axis == nb - 2:  # q @ k^T
            ctx.G.union(sa.parts[0][0], sb.parts[0][0], ctx.where)
            ctx.G.mark(sa.parts, mixing=why)
            return None if ha is None else Units(ha, sa.parts, scores=True)
        if sa.scores and not sb.scores and sb.axis == nb - 1 and ha is not None:  # scores @ v
            ctx.G.tie(sa.parts[0][0], sb.parts[0][0], ctx.where)
            ctx.G.mark(sb.parts, mixing=why)
            return Units(nd - 1, sb.parts, hb)
        ctx.fail("a product of hidden-unit tensors that is not attention")
    s, free, other, off = (sb, nb - 1, a, off_b) if isinstance(sb, Units) else (sa, na - 2, b, off_a)
    h = _heads_at(s, off)
    pos = None if h is None else h - (nd - len(ctx.shape(other)))
    if s.scores or s.axis != free or (pos is not None and pos >= 0 and ctx.shape(other)[pos] != 1):
        ctx.fail("a matrix product that mixes hidden units with an unpermuted tensor")
    return s.moved(lambda x: x + off)


def _times_param(ctx, node, s, w: Param, nd: int) -> Units:
    """``x @ W`` with ``W`` a model matrix or its transpose (the tied output ``h @ E.T`` of a language model):
    a linear layer whose input axis is ``W``'s contracted axis and whose units lie on its other axis."""
    c, f = w.axes
    if c is None or f is None or c == f:
        ctx.fail("a matrix product with a view of a parameter that is not the matrix or its transpose")
    if isinstance(s, Units) and s.scores:
        ctx.fail("attention scores multiplied by a parameter")
    return dense_units(ctx, s, nd, w.key, None, ctx.shape(node)[-1], w.key.rsplit(".", 1)[0], in_axis=c, out_axis=f)


MODULES = {
    nn.MultiheadAttention: multihead_attention,
    nn.TransformerEncoderLayer: transformer_encoder_layer,
    nn.TransformerEncoder: transformer_encoder,
}
FUNCTIONS = {F.scaled_dot_product_attention: scaled_dot_product_attention, torch.matmul: matmul,
             operator.matmul: matmul}
METHODS = {"matmul": matmul}
