"""Unit-spec inference with ``torch.fx``: units are tracked along dimension 1 (the channel / feature axis)
from layer to layer; residual additions merge the groups they add."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.units.spec import UnitAxis, UnitGroup, UnitSpec, UnsupportedLayerError

__all__ = ["infer", "SUPPORTED"]


_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.SiLU,
    nn.Mish, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.Softsign,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax,
)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.gelu, F.elu, F.selu, F.celu, F.silu,
    F.mish, F.softplus, F.hardtanh, F.hardswish, F.hardsigmoid, torch.sigmoid, torch.tanh, F.sigmoid,
    F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, operator.neg, operator.pos, torch.neg,
    torch.abs, torch.exp, torch.clamp, torch.square,
}
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
}
_BINARY_FUNCTIONS = {
    operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub,
    operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "softmax", "log_softmax",
    "neg", "abs", "exp", "clamp", "square",
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten"}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}

SUPPORTED = (
    "nn.Linear, nn.Conv1d/2d/3d (groups=1), nn.BatchNorm1d/2d/3d, nn.PReLU, elementwise activations "
    "(ReLU, LeakyReLU, GELU, Tanh, Sigmoid, ELU, SiLU, ... and their functional forms), Identity, "
    "Dropout/Dropout2d, Softmax/LogSoftmax, Max/Avg/AdaptiveAvg/AdaptiveMax pooling, nn.Flatten/nn.Unflatten, "
    "torch.flatten / .view / .reshape that (un)flatten the trailing dims, mean/sum over non-channel dims, "
    "and +, -, *, / between tensors (residual additions merge unit groups)"
)


def _unsupported(what: str, why: str = "") -> UnsupportedLayerError:
    msg = f"unit inference does not support {what}"
    if why:
        msg += f": {why}"
    return UnsupportedLayerError(f"{msg}. Supported layers: {SUPPORTED}.")


class _Groups:
    """Union-find over unit groups."""

    def __init__(self):
        self.parent: list[int] = []
        self.data: list[dict] = []

    def new(self, name: str, size: int, layer: str) -> int:
        gid = len(self.parent)
        self.parent.append(gid)
        self.data.append(dict(name=name, size=size, producers=[], consumers=[], layers=[layer], order=gid))
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.data[a]["order"] > self.data[b]["order"]:
            a, b = b, a
        da, db = self.data[a], self.data[b]
        if da["size"] != db["size"]:
            raise _unsupported(where, f"it combines unit groups of different sizes ({da['size']} and {db['size']})")
        for k in ("producers", "consumers", "layers"):
            da[k].extend(db[k])
        self.parent[b] = a
        return a

    def add(self, gid: int, kind: str, ax: UnitAxis) -> None:
        self.data[self.find(gid)][kind].append(ax)


def _shape(node) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)


def _reshape_state(state, in_shape, out_shape, where: str):
    """Group/block of a reshaped tensor: trailing dims may be (un)flattened into / out of dim 1."""
    if state is None:
        return None
    gid, block = state
    if in_shape is None or out_shape is None or len(in_shape) < 2 or len(out_shape) < 2 \
            or in_shape[0] != out_shape[0]:
        raise _unsupported(where, f"it reshapes a hidden-unit tensor {in_shape} -> {out_shape} across the "
                                  "batch or channel axis")
    if in_shape[1] == out_shape[1]:
        return state
    if out_shape[1] > in_shape[1]:  # flatten dims 1..j-1 into dim 1
        k = 1
        for j in range(2, len(in_shape) + 1):
            if in_shape[1] * k == out_shape[1]:
                return gid, block * k
            if j < len(in_shape):
                k *= in_shape[j]
    elif in_shape[1] % out_shape[1] == 0:  # unflatten dim 1 (e.g. undo a flatten)
        m = in_shape[1] // out_shape[1]
        if block % m == 0:
            return gid, block // m
    raise _unsupported(where, f"it reshapes a hidden-unit tensor {in_shape} -> {out_shape} in a way that "
                              "splits units")


def _norm_dims(dims, ndim: int) -> set[int]:
    if isinstance(dims, int):
        dims = (dims,)
    return {d % ndim for d in dims}


def infer(model: nn.Module, example_input) -> UnitSpec:
    """Derive the :class:`UnitSpec` of ``model`` by tracing it with ``torch.fx`` on ``example_input``
    (a tensor, or a tuple of positional inputs).

    Units are followed along dimension 1 of every intermediate tensor. Linear/Conv layers read a group
    (weight axis 1) and create one (weight/bias axis 0); BatchNorm layers act on their input's group;
    elementwise ops, dropout and pooling pass it through; flattening ``(N, C, H, W)`` keeps the group with
    ``block = H*W``; adding (or multiplying) tensors of two groups merges them. The group that reaches the
    model's output is not hidden: its producers' keys are ``UnitSpec.output``. Anything else raises
    :class:`UnsupportedLayerError` naming the layer. The model is traced in eval mode (its mode is
    restored) and not modified.
    """
    from torch.fx import symbolic_trace
    from torch.fx.node import Node, map_arg
    from torch.fx.passes.shape_prop import ShapeProp

    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    was_training = model.training
    model.eval()
    try:
        try:
            gm = symbolic_trace(model)
        except Exception as e:  # noqa: BLE001 - report any tracing failure the same way
            raise UnsupportedLayerError(
                f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); unit inference "
                f"needs a model without data-dependent control flow. Supported layers: {SUPPORTED}.") from e
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    finally:
        model.train(was_training)

    state_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    G = _Groups()
    env: dict = {}
    calls: dict[str, int] = {}
    outputs: list = []

    def nodes_in(a) -> list:
        found: list = []
        map_arg(a, lambda n: found.append(n) or n)
        return found

    def grouped_inputs(node) -> list:
        return [n for n in nodes_in((node.args, node.kwargs)) if env.get(n) is not None]

    def key(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def elementwise_binary(node, where: str):
        out_shape = _shape(node)
        operands = [n for n in nodes_in((node.args, node.kwargs)) if _shape(n) is not None]
        states = [env.get(n) for n in operands]
        grouped = [(n, s) for n, s in zip(operands, states) if s is not None]
        if not grouped:
            return None
        if out_shape is None or len(out_shape) < 2:
            raise _unsupported(where, "its result is not a batched tensor")
        for n, s in zip(operands, states):
            shp = _shape(n)
            pos = 1 - (len(out_shape) - len(shp))  # the operand's axis aligned with the channel axis
            if s is None:
                if pos >= 0 and shp[pos] != 1:
                    raise _unsupported(where, f"it combines hidden units with a tensor ({n.name}, shape {shp}) "
                                              "that has its own, unpermutable, channel axis")
            elif pos != 1 or shp[1] != out_shape[1]:
                raise _unsupported(where, f"it broadcasts the hidden-unit tensor {n.name} {shp} along the "
                                          f"channel axis (result {out_shape})")
        blocks = {s[1] for _, s in grouped}
        if len(blocks) != 1:
            raise _unsupported(where, "it combines tensors whose units are laid out differently")
        gid = grouped[0][1][0]
        for _, s in grouped[1:]:
            gid = G.union(gid, s[0], where)
        return gid, blocks.pop()

    def reduce(node, dims, where: str):
        x = node.args[0]
        s = env.get(x)
        if s is None:
            return None
        shp = _shape(x)
        if dims is None:
            return None  # reduced over everything: invariant under unit permutations
        d = _norm_dims(dims, len(shp))
        if 0 in d:
            raise _unsupported(where, "it reduces over the batch axis of a hidden-unit tensor")
        if 1 in d:
            return None  # sum/mean/max over the units: invariant
        if s[1] != 1:
            raise _unsupported(where, "it reduces a tensor whose channel axis holds blocked units")
        return s

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = None
            continue
        if node.op == "get_attr":
            env[node] = None
            continue
        if node.op == "output":
            outputs.extend(nodes_in(node.args))
            continue

        x = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        xs = env.get(x) if x is not None else None
        in_shape = _shape(x) if x is not None else None
        out_shape = _shape(node)

        if node.op == "call_module":
            path = str(node.target)
            m = gm.get_submodule(path)
            where = f"layer {path!r} ({type(m).__name__})"
            has_state = any(True for _ in m.parameters()) or any(True for _ in m.buffers())
            if has_state:
                calls[path] = calls.get(path, 0) + 1
                if calls[path] > 1:
                    raise _unsupported(where, "it is called more than once (shared weights)")
            extra = [n for n in grouped_inputs(node) if n is not x]
            if extra:
                raise _unsupported(where, "it takes more than one hidden-unit tensor")

            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                is_linear = isinstance(m, nn.Linear)
                if not is_linear and m.groups != 1:
                    raise _unsupported(where, f"grouped convolution (groups={m.groups})")
                if in_shape is None or (is_linear and len(in_shape) != 2):
                    raise _unsupported(where, f"nn.Linear on a {len(in_shape or ())}-D input (units must be "
                                              "on axis 1 of a 2-D tensor)")
                if xs is not None:
                    if not is_linear and xs[1] != 1:
                        raise _unsupported(where, "a convolution reading a blocked (flattened) unit axis")
                    G.add(xs[0], "consumers", UnitAxis(key(path, "weight"), 1, xs[1]))
                size = m.out_features if is_linear else m.out_channels
                gid = G.new(path, size, path)
                G.add(gid, "producers", UnitAxis(key(path, "weight"), 0))
                if m.bias is not None:
                    G.add(gid, "producers", UnitAxis(key(path, "bias"), 0))
                env[node] = (gid, 1)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if xs is not None:
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        if getattr(m, name, None) is not None:
                            G.add(xs[0], "producers", UnitAxis(key(path, name), 0, xs[1]))
                env[node] = xs
            elif isinstance(m, nn.PReLU):
                if xs is not None and m.num_parameters > 1:
                    G.add(xs[0], "producers", UnitAxis(key(path, "weight"), 0, xs[1]))
                env[node] = xs
            elif isinstance(m, _ELEMENTWISE_MODULES):
                env[node] = xs
            elif isinstance(m, _POOL_MODULES):
                if xs is not None and (in_shape is None or len(in_shape) < 3 or xs[1] != 1):
                    raise _unsupported(where, "pooling over the unit axis of a hidden-unit tensor")
                env[node] = xs
            elif isinstance(m, (nn.Flatten, nn.Unflatten)):
                env[node] = _reshape_state(xs, in_shape, out_shape, where)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                raise _unsupported(where, "it normalizes across units (only BatchNorm is per unit)")
            elif has_state or grouped_inputs(node):
                raise _unsupported(where)
            else:
                env[node] = None  # parameter-free op on unpermuted inputs: output unpermuted
            continue

        if node.op == "call_function":
            fn = node.target
            where = f"function {getattr(fn, '__module__', '') or ''}.{getattr(fn, '__name__', fn)} " \
                    f"(node {node.name!r})"
            if fn in _BINARY_FUNCTIONS:
                env[node] = elementwise_binary(node, where)
                continue
            if fn is getattr:
                env[node] = None
                continue
            others = [n for n in grouped_inputs(node) if n is not x]
            if others:
                raise _unsupported(where, "it takes more than one hidden-unit tensor")
            if fn in _ELEMENTWISE_FUNCTIONS:
                env[node] = xs
            elif fn in _POOL_FUNCTIONS:
                if xs is not None and (in_shape is None or len(in_shape) < 3 or xs[1] != 1):
                    raise _unsupported(where, "pooling over the unit axis of a hidden-unit tensor")
                env[node] = xs
            elif fn in _RESHAPE_FUNCTIONS:
                env[node] = _reshape_state(xs, in_shape, out_shape, where)
            elif fn in _REDUCE_FUNCTIONS:
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                env[node] = reduce(node, dims, where)
            elif xs is None and not grouped_inputs(node):
                env[node] = None
            else:
                if fn in (torch.cat, torch.concat, torch.stack):
                    where += " (concatenating hidden-unit tensors)"
                raise _unsupported(where)
            continue

        if node.op == "call_method":
            meth = str(node.target)
            where = f"method Tensor.{meth} (node {node.name!r})"
            if meth in _BINARY_METHODS:
                env[node] = elementwise_binary(node, where)
                continue
            if meth in _NON_TENSOR_METHODS:
                env[node] = None
                continue
            others = [n for n in grouped_inputs(node) if n is not x]
            if others:
                raise _unsupported(where, "it takes more than one hidden-unit tensor")
            if meth in _ELEMENTWISE_METHODS:
                env[node] = xs
            elif meth in _RESHAPE_METHODS:
                env[node] = _reshape_state(xs, in_shape, out_shape, where)
            elif meth in _REDUCE_METHODS:
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                env[node] = reduce(node, dims, where)
            elif xs is None and not grouped_inputs(node):
                env[node] = None
            else:
                raise _unsupported(where)
            continue

        raise _unsupported(f"graph node {node.name!r} ({node.op})")

    # ------------------------------------------------------------------ assemble
    out_roots = []
    for n in outputs:
        s = env.get(n)
        if s is not None and G.find(s[0]) not in out_roots:
            out_roots.append(G.find(s[0]))
    roots = sorted({G.find(g) for g in range(len(G.parent))}, key=lambda r: G.data[r]["order"])

    output: list[str] = []
    for r in out_roots:
        for ax in G.data[r]["producers"]:
            if ax.name not in output:
                output.append(ax.name)

    groups: list[UnitGroup] = []
    seen: dict[tuple[str, int], str] = {}
    for r in roots:
        if r in out_roots:
            continue
        d = G.data[r]
        g = UnitGroup(d["name"], d["size"], list(d["producers"]), list(d["consumers"]), list(d["layers"]))
        for ax in g.axes:
            if ax.name not in state_shapes:
                raise _unsupported(f"state entry {ax.name!r}", "it is not a state_dict key of the model")
            if (ax.name, ax.axis) in seen:
                raise _unsupported(f"state entry {ax.name!r}",
                                   f"its axis {ax.axis} belongs to two unit groups ({seen[ax.name, ax.axis]!r} "
                                   f"and {g.name!r})")
            seen[ax.name, ax.axis] = g.name
            length = state_shapes[ax.name][ax.axis]
            if length != g.size * ax.block:
                raise _unsupported(f"state entry {ax.name!r}", f"axis {ax.axis} has length {length}, expected "
                                                               f"{g.size} units x block {ax.block}")
        groups.append(g)
    return UnitSpec(groups=groups, output=output)
