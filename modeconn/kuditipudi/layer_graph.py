"""A traced model as the chain of weight layers A_1..A_d, and an fx interpreter over it.

The noise-stability quantities need every layer's pre-activation x^i, its input and its activation
phi(x^i) at once, the sub-network M^{i,j} from x^i to x^j as a function (for ``torch.func`` jvp / vjp), and
the whole network under other parameters. :class:`LayerGraph` walks the model's ``torch.fx`` graph to give
them; which layers make the chain comes from :class:`~modeconn.kuditipudi.chain.Chain`.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node, symbolic_trace
from torch.fx.node import map_arg

from modeconn.params.batchnorm import fold_batchnorm, has_batchnorm
from modeconn.kuditipudi.chain import Chain, NotAChainError
from modeconn.units import infer

__all__ = ["LayerGraph", "traced_model"]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU,
                nn.Mish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.elu, F.selu, F.celu, F.silu, F.mish,
                  F.softplus, torch.tanh, torch.sigmoid, F.tanh, F.sigmoid, F.hardtanh, F.hardswish}
_ACT_METHODS = {"relu", "sigmoid", "tanh"}
_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, torch.relu_: torch.relu}



def _no_inplace(gm: GraphModule) -> GraphModule:
    """Make every operation out of place (recorded activations must not be overwritten; torch.func)."""
    for m in gm.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    for n in gm.graph.nodes:
        if "inplace" in n.kwargs:
            n.kwargs = {**n.kwargs, "inplace": False}
        if n.op == "call_function" and n.target in _INPLACE_FUNCTIONS:
            n.target = _INPLACE_FUNCTIONS[n.target]
        elif n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("_"):
            n.target = n.target[:-1]
    gm.recompile()
    return gm


class _Runner(nn.Module):
    """Holds the graph module so that ``torch.func.functional_call`` can swap its parameters."""

    def __init__(self, chain: "LayerGraph"):
        super().__init__()
        self.gm = chain.gm
        self._chain = [chain]  # not a submodule

    def forward(self, x):
        return self._chain[0].run(x)


class LayerGraph:
    """A traced model seen as the chain of weight layers A_1..A_d of ``chain``.

    ``layers`` are module paths (``chain.layers``), ``layer_nodes`` / ``input_nodes`` / ``activation_nodes`` the fx nodes of
    each layer's output x^i, its input, and the activation phi(x^i) (``None``: identity; always ``None``
    for the output layer). :meth:`run` evaluates every node; :meth:`downstream` builds M^{i,j}.
    """

    def __init__(self, gm: GraphModule, chain: Chain):
        self.gm, self.chain, self.spec = gm, chain, chain.spec
        self.layers = list(chain.layers)
        self.widths = list(chain.sizes)
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.index = {n: k for k, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise NotAChainError(f"the model must take one input tensor, its graph has {len(placeholders)}")
        self.placeholder = placeholders[0]
        weight_nodes = [n for n in self.nodes if n.op == "call_module"
                        and isinstance(gm.get_submodule(str(n.target)), _WEIGHT_LAYERS)]
        found = [str(n.target) for n in weight_nodes]
        if found != self.layers:
            raise NotAChainError(f"the model's weight layers in forward order are {found}, but its unit groups "
                                 f"give the chain {self.layers}: not a plain feed-forward chain")
        self.layer_nodes = weight_nodes
        self.modules = [gm.get_submodule(name) for name in self.layers]
        self.input_nodes = []
        for n in weight_nodes:
            if not n.args or not isinstance(n.args[0], Node):
                raise NotAChainError(f"layer {n.target!r} is not called on a tensor of the graph")
            self.input_nodes.append(n.args[0])
        self.activation_nodes: list[Node | None] = []
        self.activation_names: list[str] = []
        for i, n in enumerate(weight_nodes):
            if i == len(weight_nodes) - 1:
                self.activation_nodes.append(None)
                continue
            users = list(n.users)
            if len(users) != 1:
                raise NotAChainError(f"the output of layer {n.target!r} is used {len(users)} times "
                                     "(a chain layer feeds one operation)")
            act = users[0] if self._is_activation(users[0]) else None
            self.activation_nodes.append(act)
            self.activation_names.append(self._describe(act))
        outs = [a for a in next(n for n in gm.graph.nodes if n.op == "output").args
                if isinstance(a, Node)]
        self.output_node = outs[0] if len(outs) == 1 else None

    @property
    def d(self) -> int:
        return len(self.layers)

    def _is_activation(self, n: Node) -> bool:
        if n.op == "call_module":
            return isinstance(self.gm.get_submodule(str(n.target)), _ACT_MODULES)
        if n.op == "call_function":
            return n.target in _ACT_FUNCTIONS
        if n.op == "call_method":
            return n.target in _ACT_METHODS
        return False

    def _describe(self, n: Node | None) -> str:
        if n is None:
            return "identity"
        if n.op == "call_module":
            return type(self.gm.get_submodule(str(n.target))).__name__
        return getattr(n.target, "__name__", str(n.target))

    # ---------------------------------------------------------------- execution
    def _eval(self, n: Node, env: dict) -> Any:
        args = map_arg(n.args, lambda a: env[a])
        kwargs = map_arg(n.kwargs, lambda a: env[a])
        if n.op == "call_module":
            return self.gm.get_submodule(str(n.target))(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            obj, *rest = args
            return getattr(obj, n.target)(*rest, **kwargs)
        if n.op == "get_attr":
            obj = self.gm
            for atom in str(n.target).split("."):
                obj = getattr(obj, atom)
            return obj
        raise RuntimeError(f"unexpected graph node {n.name} ({n.op})")

    def run(self, x: Tensor) -> dict:
        """Every node's value on the batch ``x``, with the chain's own parameters."""
        env: dict = {}
        for n in self.nodes:
            env[n] = x if n is self.placeholder else self._eval(n, env)
        return env

    def run_with(self, x: Tensor, params: Mapping[str, Tensor]) -> dict:
        """:meth:`run` with some parameters replaced (``params``: names as in ``gm.named_parameters()``)."""
        runner = _Runner(self)
        return torch.func.functional_call(runner, {f"gm.{k}": v for k, v in params.items()}, (x,))

    def downstream(self, env: Mapping, i: int, js: Sequence[int]) -> Callable[[Tensor], tuple[Tensor, ...]]:
        """z -> (M^{i,j}(z) for j in js): the graph re-run from layer i's output (set to z) on, with every
        value computed before layer i taken from ``env`` (0-based layer indices, j > i)."""
        start = self.index[self.layer_nodes[i]]
        stop = max(self.index[self.layer_nodes[j]] for j in js)
        layer_i = self.layer_nodes[i]
        targets = [self.layer_nodes[j] for j in js]
        segment = self.nodes[start + 1: stop + 1]

        def f(z: Tensor) -> tuple[Tensor, ...]:
            local = dict(env)
            local[layer_i] = z
            for n in segment:
                local[n] = self._eval(n, local)
            return tuple(local[t] for t in targets)

        return f



def traced_model(model: nn.Module, theta: Mapping[str, Tensor] | None, example: Tensor, device
                 ) -> tuple[GraphModule, bool]:
    """An eval-mode, BN-folded, out-of-place GraphModule of ``model`` holding ``theta``, on ``device``, and
    whether BatchNorm was folded."""
    folded = has_batchnorm(model)
    if folded:  # refuse non-chains before folding (a residual net's pre-activation BN would not fold)
        spec = infer(model, example.to(next(model.parameters()).device))
        if spec.groups:
            Chain.from_spec(spec)
        gm = fold_batchnorm(model, theta)
    else:
        source = copy.deepcopy(model)
        if theta is not None:
            source.load_state_dict(dict(theta), strict=False)
        source.eval()
        gm = source if isinstance(source, GraphModule) else symbolic_trace(source)
    gm = _no_inplace(gm.to(device).eval())
    for prm in gm.parameters():
        prm.requires_grad_(False)
    return gm, folded
