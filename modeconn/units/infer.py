"""Unit-spec inference with ``torch.fx``: trace the model, follow every tensor's units from node to node with
one small handler per kind of node (tables below and in :mod:`~modeconn.units.ops`,
:mod:`~modeconn.units.layers`, :mod:`~modeconn.units.attention`), then assemble the groups."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from torch.fx import GraphModule, Tracer
from torch.fx.node import Node, map_arg
from torch.fx.passes.shape_prop import ShapeProp

from modeconn.units import attention, fused, layers, ops
from modeconn.units.groups import Groups, Param, Units, fail
from modeconn.units.spec import UnitAxis, UnitGroup, UnitSpec, UnsupportedLayerError
from modeconn.units.supported import SUPPORTED

__all__ = ["infer", "SUPPORTED"]

#: module type -> handler(ctx, node, module, path); looked up along the type's MRO
MODULES: dict[type, Callable] = {
    nn.Linear: layers.linear, nn.modules.conv._ConvNd: layers.conv,
    nn.modules.batchnorm._BatchNorm: layers.batchnorm, nn.LayerNorm: layers.layernorm,
    nn.GroupNorm: layers.groupnorm, nn.PReLU: layers.prelu, nn.Embedding: layers.embedding,
    nn.Flatten: layers.flatten, nn.Unflatten: layers.flatten,
    **({nn.RMSNorm: layers.layernorm} if hasattr(nn, "RMSNorm") else {}),
    **{t: (lambda ctx, node, m, path: ops.elementwise(ctx, node)) for t in ops.ELEMENTWISE_MODULES},
    **{t: (lambda ctx, node, m, path: ops.pool(ctx, node)) for t in ops.POOL_MODULES},
    **attention.MODULES,
}
FUNCTIONS: dict = {**ops.FUNCTIONS, torch.nn.functional.linear: layers.functional_linear, **attention.FUNCTIONS,
                   **{f: layers.functional_norm for f in layers.FUNCTIONAL_NORMS}, **fused.FUNCTIONS}
METHODS: dict = {**ops.METHODS, **attention.METHODS, **fused.METHODS}
#: elementwise functions and modules known by qualified name (their packages are optional)
NAMED_MODULES = {"torchvision.ops.stochastic_depth.StochasticDepth", "timm.layers.drop.DropPath"}


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"
SCORES_OK = {*ops.SCORES_OK, attention.matmul}


class _Tracer(Tracer):
    """fx tracer that remembers the innermost module being traced when tracing fails."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves, self.failed_in = leaves, None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _trace(model: nn.Module, strict: bool, skipped: list[str]) -> GraphModule | None:
    leaves: set[str] = set()
    while True:
        tracer = _Tracer(leaves)
        try:
            return GraphModule(model, tracer.trace(model), type(model).__name__)
        except Exception as e:  # noqa: BLE001 - report any tracing failure the same way
            where = tracer.failed_in
            sub = model.get_submodule(where) if where else model
            msg = (f"torch.fx could not trace {'module ' + repr(where) if where else 'the model'} "
                   f"({type(sub).__name__}: {type(e).__name__}: {e}); unit inference needs code without "
                   f"data-dependent control flow. Supported layers: {SUPPORTED}.")
            if strict or not where or where in leaves:
                if not strict:
                    skipped.append(msg)
                    return None
                raise UnsupportedLayerError(msg) from e
            skipped.append(msg)
            leaves.add(where)


def _lookup_module(m: nn.Module):
    for t in type(m).__mro__:
        if t in MODULES:
            return MODULES[t]
        if _qualname(t) in NAMED_MODULES:
            return lambda ctx, node, m, path: ops.elementwise(ctx, node)
    return None


class _Context:
    """What the handlers see: the groups being built, each node's units and shape, the current place."""

    def __init__(self, gm: GraphModule, strict: bool):
        self.gm, self.strict = gm, strict
        self.G = Groups()
        self.env: dict[Node, object] = {}
        self.where = ""
        self.calls: dict[str, int] = {}
        self.skipped: list[str] = []
        self.keys = set(gm.state_dict())
        self.unreached: set[str] = set()  # tensors read by a node inference refused (strict=False)

    # ---------------------------------------------------------------- handler helpers
    def state(self, a):
        return self.env.get(a) if isinstance(a, Node) else None

    @staticmethod
    def shape(a):
        meta = getattr(a, "meta", {}).get("tensor_meta") if isinstance(a, Node) else None
        return tuple(int(s) for s in meta.shape) if meta is not None and hasattr(meta, "shape") else None

    @staticmethod
    def inputs(node) -> list[Node]:
        found: list[Node] = []
        map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
        return found

    @staticmethod
    def key(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def fail(self, why: str = ""):
        raise fail(self.where, why)

    # ---------------------------------------------------------------- one node
    def _parts_in(self, value) -> list:
        if isinstance(value, Units):
            return list(value.parts)
        if isinstance(value, tuple):
            return [p for v in value for p in self._parts_in(v)]
        return []

    def run(self, node: Node):
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            shape = self.shape(node)
            return Param(str(node.target), tuple(range(len(shape)))) if node.target in self.keys and shape else None
        states = [self.state(a) for a in self.inputs(node)]
        has_units = any(self._parts_in(s) for s in states)
        if node.op == "call_module":
            path = str(node.target)
            m = self.gm.get_submodule(path)
            self.where = f"layer {path!r} ({type(m).__name__})"
            stateful = any(True for _ in m.parameters()) or any(True for _ in m.buffers())
            if stateful:
                self.calls[path] = self.calls.get(path, 0) + 1
                if self.calls[path] > 1:
                    self.fail("it is called more than once (shared weights)")
            handler = _lookup_module(m)
            if any(self._is_scores(s) for s in states) and not isinstance(m, ops.ELEMENTWISE_MODULES):
                self.fail("attention scores (q @ k^T) reaching a layer")
            if any(self._is_stacked(s) for s in states) and not isinstance(m, ops.ELEMENTWISE_MODULES):
                self.fail("a fused q/k/v tensor reaching a layer before it is taken apart")
            if handler is None:
                return self.fail() if stateful or has_units else None
            return handler(self, node, m, path)
        stack = node.meta.get("nn_module_stack") or {}
        inside = f" in module {next(reversed(stack.values()))[0]!r}" if stack else ""
        if node.op == "call_function":
            fn = node.target
            self.where = (f"function {getattr(fn, '__module__', '') or ''}.{getattr(fn, '__name__', fn)} "
                          f"(node {node.name!r}{inside})")
            handler = FUNCTIONS.get(fn) or (ops.elementwise if _qualname(fn) in ops.NAMED_ELEMENTWISE else None)
        elif node.op == "call_method":
            self.where = f"method Tensor.{node.target} (node {node.name!r}{inside})"
            handler = METHODS.get(str(node.target))
        else:
            raise fail(f"graph node {node.name!r} ({node.op})")
        if handler is None or all(s is None for s in states):
            if not has_units:  # on unpermuted tensors, or computed from parameters only (a mask buffer)
                return None
            if node.target in (torch.stack,):
                self.where += " (stacking hidden-unit tensors)"
            self.fail()
        if handler not in SCORES_OK and any(self._is_scores(s) for s in states):
            self.fail("attention scores (q @ k^T) reaching an operation other than scaling, masking, softmax "
                      "and the product with v")
        if handler not in fused.STACK_OK and any(self._is_stacked(s) for s in states):
            self.fail("a fused q/k/v tensor reaching an operation before it is taken apart (unbind or indexing)")
        return handler(self, node)

    def _is_stacked(self, value) -> bool:
        if isinstance(value, tuple):
            return any(self._is_stacked(v) for v in value)
        return isinstance(value, Units) and value.stack_axis is not None

    def _params_in(self, value) -> list[str]:
        if isinstance(value, tuple):
            return [k for v in value for k in self._params_in(v)]
        return [value.key] if isinstance(value, Param) else []

    def _is_scores(self, value) -> bool:
        if isinstance(value, tuple):
            return any(self._is_scores(v) for v in value)
        return isinstance(value, Units) and value.scores

    def trace(self):
        outputs: list = []
        for node in self.gm.graph.nodes:
            if node.op == "output":
                outputs.extend(self.inputs(node))
                continue
            try:
                self.env[node] = self.run(node)
            except UnsupportedLayerError as e:
                if self.strict:
                    raise
                self.skipped.append(str(e).split(". Supported layers")[0])
                self.unreached.update(k for a in self.inputs(node) for k in self._params_in(self.state(a)))
                if node.op == "call_module":
                    sub = self.gm.get_submodule(str(node.target))
                    self.unreached.update(self.key(str(node.target), k) for k, _ in sub.named_parameters())
                parts = [p for a in self.inputs(node) for p in self._parts_in(self.state(a))]
                self.G.poison(parts, self.where)
                self.env[node] = self._opaque(node)
        return outputs

    def _opaque(self, node: Node):
        """What a refused node outputs: hidden units that cannot move (a new, unpermutable group on its first
        hidden-unit input's axis, when the output keeps that axis), so that whatever reads or adds to them
        stays in place too and counts as unaligned; ``None`` when no such axis is known."""
        out = self.shape(node)
        for a in self.inputs(node):
            s, shape = self.state(a), self.shape(a)
            if isinstance(s, Units) and not s.scores and s.head_axis is None and s.stack_axis is None \
                    and out is not None and shape is not None and len(out) == len(shape) and out[s.axis] == shape[s.axis]:
                gid = self.G.new(node.name, out[s.axis])
                self.G.poison([(gid, 1)], self.where)
                return Units(s.axis, ((gid, 1),))
        return None


def infer(model: nn.Module, example_input, *, strict: bool = True) -> UnitSpec:
    """Derive the :class:`UnitSpec` of ``model`` by tracing it with ``torch.fx`` on ``example_input``
    (a tensor, or a tuple of positional inputs).

    Units are followed along their axis of every intermediate tensor (the channel axis of conv maps, the
    last axis of token sequences). Linear/Conv/Embedding layers create groups; norm layers, elementwise
    ops, dropout and pooling pass them through; flattening ``(N, C, H, W)`` keeps the group with
    ``block = H*W``; adding tensors merges their groups; concatenating along the unit axis keeps each
    input's group; attention splits its units into head blocks. The group that reaches the model's output
    is not hidden: its producers' keys are ``UnitSpec.output``.

    ``strict=True``: anything else raises :class:`UnsupportedLayerError` naming the node and module.
    ``strict=False``: the spec leaves the units touching an unsupported node (or untraceable module)
    unpermuted, says why in ``spec.skipped`` and gives the fraction of parameters still permuted in
    ``spec.covered``. The model is traced in eval mode (its mode is restored) and not modified.
    """
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    skipped: list[str] = []
    was_training = model.training
    model.eval()
    try:
        gm = _trace(model, strict, skipped)
        if gm is None:
            return UnitSpec(groups=[], output=[], skipped=skipped, covered=0.0)
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    finally:
        model.train(was_training)
    ctx = _Context(gm, strict)
    outputs = ctx.trace()
    spec = _assemble(ctx, outputs, model)
    spec.skipped = skipped + ctx.skipped + spec.skipped
    spec.covered = spec.coverage(model)
    return spec


def _assemble(ctx: _Context, outputs: list, model: nn.Module) -> UnitSpec:
    G = ctx.G
    state = model.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    same: dict[int, list[str]] = {}
    for k, v in state.items():  # tied weights: every key of one tensor moves alike
        same.setdefault(id(v), []).append(k)

    def alias(axes):
        return [replace(ax, name=k) for ax in axes for k in same.get(id(state.get(ax.name)), [ax.name])]

    out_roots = {g for n in outputs for g, _ in G.leaves(ctx._parts_in(ctx.state(n)))}
    leaves = sorted({g for g in range(len(G.parent)) if G.find(g) == g and G.data[g].children is None},
                    key=lambda r: G.data[r].order)
    output = list(dict.fromkeys(ax.name for r in leaves if r in out_roots for ax in G.data[r].producers))
    skipped: list[str] = []

    def check(d) -> str | None:
        for ax in d.producers + d.consumers:
            if ax.name not in shapes:
                return f"state entry {ax.name!r}: it is not a state_dict key of the model"
            length = shapes[ax.name][ax.axis]
            want = d.size // d.blocks if ax.within is not None else d.size * ax.block
            if (ax.within is None and ax.offset + want > length) or (ax.within is not None and length != want):
                return (f"state entry {ax.name!r}: axis {ax.axis} has length {length}, expected {d.size} units "
                        f"x block {ax.block} from offset {ax.offset}")
        return None

    # a tie is dropped as a whole when a member cannot move (or is the output's)
    drop_ties = {G.tie_of(r) for r in leaves if G.tie_of(r) is not None
                 and (G.data[r].bad is not None or r in out_roots)}
    groups, names = [], set()
    tie_names: dict[int, str] = {}
    unaligned: list[UnitAxis] = [UnitAxis(name, 0, block=shapes[name][0] if shapes[name] else 1)
                                 for key in sorted(ctx.unreached) for name in same.get(id(state.get(key)), [key])
                                 if name in shapes]  # tensors a refused node read: all unaligned

    def leave(d) -> None:  # the group's hidden units stay in place: every entry of its axes is unaligned
        for ax in alias(d.producers + d.consumers):
            if ax.name in shapes:
                n = shapes[ax.name][ax.axis]
                unaligned.append(UnitAxis(ax.name, ax.axis, n, 0) if ax.within is not None else
                                 UnitAxis(ax.name, ax.axis, min(d.size * ax.block, n - ax.offset), ax.offset))

    for r in leaves:
        d = G.data[r]
        tie = G.tie_of(r)
        if r in out_roots or d.bad is not None or tie in drop_ties:
            if d.bad:
                skipped.append(f"group {d.name!r} ({d.size} units) left unpermuted: it reaches {d.bad}")
            if r not in out_roots and d.bad != "":  # not the output's or the model input's own units
                leave(d)
            continue
        why = check(d)
        if why:
            if ctx.strict:
                raise fail(why)
            skipped.append(f"group {d.name!r} left unpermuted: {why}")
            leave(d)
            continue
        name = d.name
        while name in names:
            name += "'"
        names.add(name)
        tie_name = None if tie is None else tie_names.setdefault(tie, name)
        producers = list(dict.fromkeys(alias(d.producers)))  # a tied weight reads the units it makes: once
        consumers = [ax for ax in dict.fromkeys(alias(d.consumers)) if ax not in producers]
        groups.append(UnitGroup(name, d.size, producers, consumers, list(d.layers), blocks=d.blocks, tie=tie_name,
                                mixing=list(d.mixing)))
    _check_disjoint(groups, ctx.strict, skipped)
    return UnitSpec(groups=groups, output=output, skipped=skipped, unaligned=unaligned)


def _check_disjoint(groups: list[UnitGroup], strict: bool, skipped: list[str]) -> None:
    """No entry of a tensor axis may belong to two groups (or twice to one)."""
    seen: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    for g in groups:
        for ax in g.axes:
            if ax.within is not None:
                continue
            lo, hi = ax.offset, ax.offset + g.size * ax.block
            for a, b, other in seen.get((ax.name, ax.axis), []):
                if lo < b and a < hi:
                    msg = (f"state entry {ax.name!r}: its axis {ax.axis} belongs to two unit groups "
                           f"({other!r} and {g.name!r})")
                    if strict:
                        raise fail(msg)
                    skipped.append(msg)
            seen.setdefault((ax.name, ax.axis), []).append((lo, hi, g.name))
