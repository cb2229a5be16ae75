"""Noise stability of a trained network (Kuditipudi et al. 2019, Definitions 2-4).

:func:`noise_stability` measures, per layer and per data point, the quantities that make a network
epsilon-noise stable and the resulting epsilon of Definition 4.

Conventions (how the paper's fully connected, bias-free definitions are read on real models):

* **Layers.** The model is a feed-forward chain of weight layers A_1..A_d: the Linear/Conv layers that
  produce the hidden unit groups of :func:`modeconn.units.infer` (in forward order), then the output layer
  (paper d = number of hidden groups + 1). Residual or branching models raise :class:`NotAChainError`.
  Models with BatchNorm are first folded with :func:`modeconn.batchnorm.fold_batchnorm` (eval-mode
  statistics; ``result.settings["folded_batchnorm"]``), so a layer's pre-activation x^i is the output of
  its conv/linear layer *after* the folded BN. Dropout layers are off (eval mode).
* **Layer input.** The paper's phi(x^{i-1}) is read as the tensor that layer i actually receives: the
  activation of the previous layer, after any pooling / flattening / (eval-mode) dropout in between; for
  layer 1 it is the network input.
* **Norms.** Every norm of an activation is the Euclidean norm of the flattened per-example tensor (a conv
  feature map C x H x W is a vector of C*H*W entries). For a conv layer h_i is its number of channels.
* **Layer cushion** mu_i(x) = ||A_i z|| / (||A_i||_F ||z||), z the layer input, A_i z the layer without
  its bias. For a conv, A_i is the linear operator on that input size and ||A_i||_F its Frobenius norm,
  computed exactly (zero padding): ||A||_F^2 = sum over kernel entries w^2 * (number of output positions at
  which that kernel offset reads a real, non-padding input). :func:`operator_frobenius_norm`.
* **Interlayer cushion** mu_{i,j}(x) = ||J x^i|| / (||J||_2 ||x^i||), J the Jacobian of M^{i,j} (the
  sub-network from x^i to x^j, run through the model's fx graph) at x^i. J x^i is a ``torch.func.jvp``;
  ||J||_2 comes from power iteration on J^T J with ``jvp`` + ``vjp`` (:func:`spectral_norms`), a fixed
  number of iterations from a seeded random start, per data point (the batched map is block diagonal, so
  the whole batch is iterated at once; no Jacobian is ever formed). Power iteration gives a lower bound
  of ||J||_2, so cushions are (slightly) over-estimated if it has not converged. With biases
  M^{i,j}(x^i) != J x^i; the definition is applied as written (J x^i). mu_{i->}(x) = min_{i<=j<=d}
  mu_{i,j}(x), with mu_{i,i} = 1.
* **Activation contraction** per hidden layer ||x^i|| / ||phi(x^i)||, with phi the activation right after
  the layer (identity if there is none); c(x) = the max over hidden layers, c = max over points.
* **Interlayer smoothness.** One Algorithm-1 draw theta_hat = :func:`random_dropout` (theta, p) on all
  hidden groups. For layer i >= 2 and t on the grid ``ts``: x_hat^i_i(t) is layer i's pre-activation under
  theta + t (theta_hat - theta), and x_hat^i_{i-1}(t) the same with A_i itself not dropped (Definition 3's
  theta_{i-1}). For each, and every j > i, the *first-order remainder*
  r = M^{i,j}(x_hat) - M^{i,j}(x^i) - J (x_hat - x^i), and rho_{i,j}(x, t) = ||x_hat - x^i|| ||x^j|| /
  (||x^i|| ||r||). For a bias-free positively homogeneous net M(x^i) = J x^i, so r is the paper's
  M(x_hat) - J x_hat; with biases the first-order remainder is the quantity that vanishes for an affine M.
  rho_i(x) = min over j > i, t and both variants (inf where r = 0: the inequality then holds for any
  rho). Layer 1 (never perturbed) and layer d (no j > d) put no constraint on rho: ``None``. With several
  ``draws`` the per-point arrays pool the draws and rho is the largest value that at least half of the
  draws reach (Definition 3's "with probability >= 1/2").
* **Epsilon** (Definition 4): beta c d^{3/2} max_x ||f(x)|| / (h_min^{1/2} min_{2<=i<=d} mu_i mu_{i->}),
  with mu_i, mu_{i->} minima over points (NaN, from an all-zero vector, is skipped), f(x) = x^d the output
  layer's output (logits), beta = sqrt(2) (cross-entropy).
* **Side conditions.** h_min >= Omega~(1) is asymptotic: reported, ``holds`` is None. rho >= 3d: boolean.
  No dominant unit, ||phi(x_hat^i_i(t))||_inf <= C/sqrt(h_i) ||phi(x_hat^i_i(t))||: we report
  kappa_i = max over points and t in {0} + ts of sqrt(h_i) * max_unit ||phi_unit|| / ||phi||, where
  ``phi_unit`` is one unit's block (a neuron's value; a channel's whole H x W map, since channel dropout
  removes whole channels), and compare it to C = ``dominance_constant`` (default 8). Reason for 8: ReLU
  of i.i.d. Gaussian pre-activations gives kappa ~ 2 sqrt(ln h) (4.3 for h = 100, 5.3 for h = 1000), so 8
  accepts "spread-out" layers up to very large widths and flags layers where one unit carries more than
  8/sqrt(h) of the norm. The entry-wise variant (flattened map, same sqrt(h_i)) is also reported.
"""
from __future__ import annotations

import copy
import json
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node, symbolic_trace
from torch.fx.node import map_arg

from modeconn.batchnorm import fold_batchnorm, has_batchnorm
from modeconn.checkpoint import atomic_write_json
from modeconn.data import materialize
from modeconn.stability.dropout_mask import random_dropout
from modeconn.units import UnitSpec, infer

__all__ = ["NoiseStability", "NotAChainError", "noise_stability", "spectral_norms",
           "operator_frobenius_norm", "layer_cushion", "LayerChain"]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU,
                nn.Mish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.elu, F.selu, F.celu, F.silu, F.mish,
                  F.softplus, torch.tanh, torch.sigmoid, F.tanh, F.sigmoid, F.hardtanh, F.hardswish}
_ACT_METHODS = {"relu", "sigmoid", "tanh"}
_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, torch.relu_: torch.relu}


class NotAChainError(ValueError):
    """The model is not a feed-forward chain of weight layers (e.g. it has residual connections)."""


# ============================================================================ small measurements

def _norms(t: Tensor) -> Tensor:
    """Euclidean norm of each example (dim 0) of ``t``, flattened."""
    return t.flatten(1).norm(dim=1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, with 0/0 = NaN and x/0 = inf (x > 0)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny),
                       torch.where(num > 0, torch.full_like(num, math.inf), torch.full_like(num, math.nan)))


def _without_bias(module: nn.Module, z: Tensor) -> Tensor:
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


def layer_cushion(module: nn.Module, z: Tensor) -> Tensor:
    """Per example: ||A z|| / (||A||_F ||z||) for the Linear/Conv layer ``module`` and its inputs ``z``."""
    with torch.no_grad():
        fro = operator_frobenius_norm(module, z.shape[1:])
        return _safe_div(_norms(_without_bias(module, z)), fro * _norms(z))


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
    v = v / _bcast(_norms(v).clamp_min(torch.finfo(x.dtype).tiny), v)
    sigma = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(max(int(iters), 0)):
        _, u = torch.func.jvp(f, (x,), (v,))
        sigma = torch.maximum(sigma, _norms(u))
        (w,) = vjp_fn(u)
        wn = _norms(w)
        v = torch.where(_bcast(wn > 0, w), w / _bcast(wn.clamp_min(torch.finfo(x.dtype).tiny), w), v)
    _, u = torch.func.jvp(f, (x,), (v,))
    return torch.maximum(sigma, _norms(u)).detach()


# ============================================================================ the layer chain

def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


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

    def __init__(self, chain: "LayerChain"):
        super().__init__()
        self.gm = chain.gm
        self._chain = [chain]  # not a submodule

    def forward(self, x):
        return self._chain[0].run(x)


class LayerChain:
    """A traced model seen as the chain of weight layers A_1..A_d (see the module docstring).

    ``layers`` are module paths, ``layer_nodes`` / ``input_nodes`` / ``activation_nodes`` the fx nodes of
    each layer's output x^i, its input, and the activation phi(x^i) (``None``: identity; always ``None``
    for the output layer). :meth:`run` evaluates every node; :meth:`downstream` builds M^{i,j}.
    """

    def __init__(self, gm: GraphModule, spec: UnitSpec):
        self.gm, self.spec = gm, spec
        if not spec.groups:
            raise NotAChainError("the model has no hidden layer (noise stability needs d >= 2 layers)")
        if not spec.is_chain() or not spec.output:
            raise _not_a_chain(spec)
        self.layers = [g.layers[0] if g.layers else _module_of(g.producers[0].name) for g in spec.groups]
        self.layers.append(_module_of(spec.output[0]))
        self.widths = [g.size for g in spec.groups]
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


def _not_a_chain(spec: UnitSpec) -> NotAChainError:
    return NotAChainError(
        "noise_stability needs a feed-forward chain of Linear/Conv layers (each hidden unit group made by one "
        "layer and read only by the next); this model has residual connections, branches or merged groups "
        "(e.g. a ResNet). Groups: " + ", ".join(f"{g.name} (layers {g.layers})" for g in spec.groups))


def _prepare(model: nn.Module, theta: Mapping[str, Tensor] | None, example: Tensor, device
             ) -> tuple[GraphModule, bool]:
    """An eval-mode, BN-folded, out-of-place GraphModule of ``model`` holding ``theta``, on ``device``."""
    folded = has_batchnorm(model)
    if folded:  # refuse non-chains before folding (a residual net's pre-activation BN would not fold)
        spec = infer(model, example.to(next(model.parameters()).device))
        if spec.groups and not spec.is_chain():
            raise _not_a_chain(spec)
    if folded:
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


# ============================================================================ the result

def _encode(a: Any) -> Any:
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return [_encode(float(v)) for v in a.reshape(-1)]
    if isinstance(a, (list, tuple)):
        return [_encode(v) for v in a]
    if isinstance(a, dict):
        return {k: _encode(v) for k, v in a.items()}
    if isinstance(a, (float, np.floating)):
        f = float(a)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(a, np.integer):
        return int(a)
    if isinstance(a, np.bool_):
        return bool(a)
    return a


def _decode_float(v: Any) -> Any:
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return _decode_float(v)


def _array(v: Any) -> np.ndarray | None:
    return None if v is None else np.asarray([_decode_float(x) for x in v], dtype=np.float64)


def _nanmin(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.min()) if a.size else math.nan


def _nanmax(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.max()) if a.size else math.nan


def _nanmedian(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(np.median(a)) if a.size else math.nan


_ARRAY_LISTS = ("cushion", "interlayer_min", "contraction", "smoothness")


@dataclass
class NoiseStability:
    """Noise-stability measurements of one network (see the module docstring for every convention).

    Layer lists have one entry per weight layer A_1..A_d (0-based position i is the paper's layer i+1);
    per-point arrays have one value per measured data point. ``None`` marks a quantity the paper does not
    define for that layer (contraction of the output layer; smoothness of layers 1 and d).
    """

    layers: list[str]                       # module paths of A_1..A_d
    kinds: list[str]                        # layer class names
    widths: list[int]                       # h_1..h_{d-1} (units = neurons / channels)
    activations: list[str]                  # phi after each hidden layer
    d: int
    h_min: int
    num_points: int
    cushion: list[np.ndarray]               # mu_i(x), d arrays
    interlayer_min: list[np.ndarray]        # mu_{i->}(x) = min_{j>=i} mu_{i,j}(x), d arrays
    interlayer: dict[str, np.ndarray]       # "i,j" (1-based, i < j) -> mu_{i,j}(x)
    contraction: list[np.ndarray | None]    # ||x^i|| / ||phi(x^i)||, hidden layers (None for layer d)
    contraction_max: np.ndarray             # c(x) = max over hidden layers
    smoothness: list[np.ndarray | None]     # rho_i(x), pooled over draws; None for layers 1 and d
    dominance: list[float]                  # kappa_i (unit blocks), hidden layers
    dominance_entry: list[float]            # kappa_i (flattened entries), hidden layers
    mu: list[float]                         # mu_i = min_x mu_i(x)
    mu_arrow: list[float]                   # mu_{i->} = min_x mu_{i->}(x)
    c: float
    rho: float
    rho_draws: list[float]
    max_output_norm: float
    epsilon: float
    beta: float
    conditions: dict
    settings: dict
    info: dict = field(default_factory=dict)

    @property
    def noise_stable_conditions_hold(self) -> bool:
        """Whether every checkable side condition of Definition 4 holds (h_min is only reported)."""
        return all(c.get("holds") is not False for c in self.conditions.values())

    def summaries(self) -> dict[str, dict[str, list[float | None]]]:
        """Per quantity and layer, the min and median over the data points."""
        out: dict[str, dict[str, list[float | None]]] = {}
        for name in _ARRAY_LISTS:
            arrays = getattr(self, name)
            out[name] = {
                "min": [None if a is None else _nanmin(a) for a in arrays],
                "median": [None if a is None else _nanmedian(a) for a in arrays],
            }
        return out

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["summaries"] = self.summaries()
        return _encode(d)

    @classmethod
    def from_dict(cls, d: Mapping) -> "NoiseStability":
        d = dict(d)
        d.pop("summaries", None)
        for name in _ARRAY_LISTS:
            d[name] = [_array(a) for a in d[name]]
        d["contraction_max"] = _array(d["contraction_max"])
        d["interlayer"] = {k: _array(v) for k, v in d["interlayer"].items()}
        for name in ("dominance", "dominance_entry", "mu", "mu_arrow", "rho_draws"):
            d[name] = [_decode_float(v) for v in d[name]]
        for name in ("c", "rho", "max_output_norm", "epsilon", "beta"):
            d[name] = _decode_float(d[name])
        for name in ("conditions", "settings", "info"):
            d[name] = _decode(d.get(name, {}))
        return cls(**d)

    def save_json(self, path: str | FilePath) -> FilePath:
        """Write the result as JSON atomically (non-finite numbers as the strings "inf", "-inf", "nan")."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | FilePath) -> "NoiseStability":
        return cls.from_dict(json.loads(FilePath(path).read_text()))

    def describe(self) -> str:
        """A short multi-line text summary."""
        s = self.summaries()
        rows = [f"noise stability: d={self.d}, h_min={self.h_min}, {self.num_points} points, epsilon="
                f"{self.epsilon:.4g} (c={self.c:.3g}, rho={self.rho:.3g}, max||f||={self.max_output_norm:.3g})"]
        for i, name in enumerate(self.layers):
            def fmt(q):
                v = s[q]["median"][i]
                return "   -  " if v is None else f"{v:6.3g}"
            rows.append(f"  layer {i + 1} ({name}): mu={self.mu[i]:.3g} mu->={self.mu_arrow[i]:.3g} "
                        f"median cushion={fmt('cushion')} interlayer={fmt('interlayer_min')} "
                        f"contraction={fmt('contraction')} smoothness={fmt('smoothness')}")
        for k, c in self.conditions.items():
            rows.append(f"  condition {k}: {c}")
        return "\n".join(rows)


# ============================================================================ the measurement

def _dominance(phi: Tensor, h: int) -> tuple[Tensor, Tensor]:
    """Per example: sqrt(h) * max unit-block norm / norm, and sqrt(h) * max |entry| / norm."""
    n = phi.shape[0]
    total = _norms(phi)
    blocks = phi.reshape(n, phi.shape[1], -1).norm(dim=2).amax(dim=1)
    entries = phi.reshape(n, -1).abs().amax(dim=1)
    root = math.sqrt(h)
    return _safe_div(root * blocks, total), _safe_div(root * entries, total)


def noise_stability(model: nn.Module, theta: Mapping[str, Tensor] | None, data: Any, *,
                    max_items: int = 256, batch_size: int | None = None, split: str = "train",
                    p: float = 0.5, ts: Sequence[float] = (0.25, 0.5, 0.75, 1.0), draws: int = 1,
                    power_iters: int = 30, seed: int = 0, beta: float = math.sqrt(2.0),
                    dominance_constant: float = 8.0, device: Any = None) -> NoiseStability:
    """Measure the noise stability of ``model`` with parameters ``theta`` on ``data``.

    ``theta``: a state dict (or parameters only), ``None`` for the model's own. ``data``: anything
    :func:`modeconn.data.materialize` accepts; its first ``max_items`` examples of ``split`` are used
    (in chunks of ``batch_size``, default all at once). ``p``: Algorithm 1's dropout probability for the
    smoothness draw(s); ``ts``: the grid on the segment theta -> theta_hat (t = 0 is excluded: no
    perturbation); ``draws``: number of dropout draws; ``power_iters``, ``seed``: spectral norm power
    iteration (and dropout draws). ``beta``: Lipschitz constant of the loss (sqrt 2 for cross-entropy).
    ``dominance_constant``: C of the no-dominant-unit condition. The model is not modified.

    Randomness: the dropout draws are ``random_dropout(spec, theta, p, torch.Generator().manual_seed(seed))``
    called ``draws`` times in a row on the (BN-folded) model's spec and parameters; the power iteration
    starts from ``torch.randn`` of a generator on ``device`` seeded with ``seed + 1``.
    """
    if device is None:
        ref = next(iter(model.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
    device = torch.device(device)
    x_all, _ = materialize(data, split=split, max_items=max_items, device=device)
    x_all = x_all.to(torch.get_default_dtype()) if not torch.is_floating_point(x_all) else x_all
    n_total = int(x_all.shape[0])
    if n_total == 0:
        raise ValueError("noise_stability: no data points")
    ts = [float(t) for t in ts if float(t) > 0]
    if any(t > 1 for t in ts):
        raise ValueError(f"ts must lie in (0, 1], got {ts}")
    draws = int(draws)
    if draws < 1:
        raise ValueError("draws must be >= 1")
    batch_size = n_total if batch_size is None else int(batch_size)

    gm, folded = _prepare(model, theta, x_all[:2], device)
    spec = infer(gm, x_all[:2])
    chain = LayerChain(gm, spec)
    d = chain.d
    base = {k: v.detach() for k, v in gm.named_parameters()}
    gen = torch.Generator().manual_seed(int(seed))
    hats, dropped_fraction = [], []
    for _ in range(draws):
        theta_hat, dropped = random_dropout(spec, base, p, gen)
        hats.append({k: v for k, v in theta_hat.items() if v is not base[k]})
        dropped_fraction.append({g.name: len(dropped[g.name]) / g.size for g in spec.groups})
    pgen = torch.Generator(device=device).manual_seed(int(seed) + 1)

    cushion = [[] for _ in range(d)]
    inter_min = [[] for _ in range(d)]
    pairs: dict[tuple[int, int], list] = {(i, j): [] for i in range(d) for j in range(i + 1, d)}
    contraction = [[] for _ in range(d - 1)]
    smooth = [[[] for _ in range(draws)] for _ in range(d)]
    dom = [[] for _ in range(d - 1)]
    dom_entry = [[] for _ in range(d - 1)]
    out_norms = []
    fro = {}

    for start in range(0, n_total, batch_size):
        x0 = x_all[start:start + batch_size]
        with torch.no_grad():
            env = chain.run(x0)
        X = [env[n].detach() for n in chain.layer_nodes]
        Z = [env[n].detach() for n in chain.input_nodes]
        Phi = [env[a].detach() if a is not None else X[i]
               for i, a in enumerate(chain.activation_nodes[:-1])]
        xnorm = [_norms(v) for v in X]
        out_norms.append(xnorm[-1])

        with torch.no_grad():
            for i, module in enumerate(chain.modules):
                key = (i, tuple(Z[i].shape[1:]))
                if key not in fro:
                    fro[key] = operator_frobenius_norm(module, Z[i].shape[1:])
                cushion[i].append(_safe_div(_norms(_without_bias(module, Z[i])), fro[key] * _norms(Z[i])))
            for i in range(d - 1):
                contraction[i].append(_safe_div(xnorm[i], _norms(Phi[i])))
                a, b = _dominance(Phi[i], chain.widths[i])
                dom[i].append(a)
                dom_entry[i].append(b)

        # interlayer cushions
        for i in range(d):
            m = torch.ones_like(xnorm[i])
            js = list(range(i + 1, d))
            if js:
                g = chain.downstream(env, i, js)
                _, jx = torch.func.jvp(g, (X[i],), (X[i],))
                for jj, j in enumerate(js):
                    single = chain.downstream(env, i, [j])
                    sigma = spectral_norms(lambda z: single(z)[0], X[i], power_iters, pgen)
                    mu_ij = _safe_div(_norms(jx[jj].detach()), sigma * xnorm[i])
                    pairs[(i, j)].append(mu_ij)
                    m = torch.fmin(m, mu_ij)
            inter_min[i].append(m)

        # interlayer smoothness and dominance along theta -> theta_hat
        for k, hat in enumerate(hats):
            rho_pts = [torch.full_like(xnorm[0], math.inf) for _ in range(d)]
            for t in ts:
                params_t = {name: base[name] + t * (v - base[name]) for name, v in hat.items()}
                with torch.no_grad():
                    env_t = chain.run_with(x0, params_t)
                    for i in range(d - 1):
                        a = chain.activation_nodes[i]
                        phi_t = env_t[a] if a is not None else env_t[chain.layer_nodes[i]]
                        u, e = _dominance(phi_t, chain.widths[i])
                        dom[i].append(u)
                        dom_entry[i].append(e)
                for i in range(1, d - 1):
                    js = list(range(i + 1, d))
                    g = chain.downstream(env, i, js)
                    with torch.no_grad():
                        xh_i = env_t[chain.layer_nodes[i]]
                        xh_prev = chain.modules[i](env_t[chain.input_nodes[i]])  # A_i not dropped
                    for xh in (xh_i, xh_prev):
                        delta = (xh - X[i]).detach()
                        dn = _norms(delta)
                        with torch.no_grad():
                            mx = g(xh)
                        _, jd = torch.func.jvp(g, (X[i],), (delta,))
                        for jj, j in enumerate(js):
                            rem = _norms((mx[jj] - X[j] - jd[jj]).detach())
                            rho = torch.where(rem > 0, _safe_div(dn * xnorm[j], xnorm[i] * rem),
                                              torch.full_like(rem, math.inf))
                            rho_pts[i] = torch.fmin(rho_pts[i], rho)
            for i in range(1, d - 1):
                smooth[i][k].append(rho_pts[i])

    def cat(parts) -> np.ndarray:
        return torch.cat(parts).double().cpu().numpy()

    cushion_a = [cat(c) for c in cushion]
    inter_min_a = [cat(c) for c in inter_min]
    contraction_a: list[np.ndarray | None] = [cat(c) for c in contraction] + [None]
    contraction_max = np.max(np.stack([c for c in contraction_a if c is not None]), axis=0)
    smooth_a: list[np.ndarray | None] = [
        np.concatenate([cat(smooth[i][k]) for k in range(draws)]) if 1 <= i <= d - 2 else None
        for i in range(d)]
    rho_draws = []
    for k in range(draws):
        vals = [cat(smooth[i][k]) for i in range(1, d - 1)]
        rho_draws.append(_nanmin(np.concatenate(vals)) if vals else math.inf)
    rho = sorted(rho_draws)[draws // 2]
    dominance = [_nanmax(cat(v)) for v in dom]
    dominance_entry = [_nanmax(cat(v)) for v in dom_entry]

    mu = [_nanmin(a) for a in cushion_a]
    mu_arrow = [_nanmin(a) for a in inter_min_a]
    c = _nanmax(contraction_max)
    max_out = float(cat(out_norms).max())
    h_min = min(chain.widths)
    denom = min((mu[i] * mu_arrow[i] for i in range(1, d)), default=math.nan)
    epsilon = beta * c * d ** 1.5 * max_out / (math.sqrt(h_min) * denom) if denom > 0 else math.inf
    if math.isnan(denom) or math.isnan(c):
        epsilon = math.nan

    conditions = {
        "h_min": {"value": h_min, "holds": None,
                  "note": "h_min >= Omega~(1) is asymptotic: reported, not checked"},
        "smoothness": {"value": rho, "required": 3 * d, "holds": bool(rho >= 3 * d)},
        "no_dominant_unit": {"value": _nanmax(np.asarray(dominance)), "constant": float(dominance_constant),
                             "per_layer": dominance,
                             "holds": bool(all(v <= dominance_constant for v in dominance if not math.isnan(v)))},
    }
    settings = {
        "max_items": max_items, "num_points": n_total, "split": split, "p": float(p), "ts": ts,
        "draws": draws, "power_iters": int(power_iters), "seed": int(seed), "batch_size": batch_size,
        "folded_batchnorm": folded, "dominance_constant": float(dominance_constant),
        "smoothness_remainder": "first-order: M(x_hat) - M(x) - J (x_hat - x)",
        "norms": "Euclidean norm of the flattened per-example tensor; conv h_i = channels",
    }
    info = {"dropped_fraction": dropped_fraction, "output_is_last_layer": chain.output_node is chain.layer_nodes[-1]}
    return NoiseStability(
        layers=list(chain.layers), kinds=[type(m).__name__ for m in chain.modules], widths=list(chain.widths),
        activations=list(chain.activation_names), d=d, h_min=h_min, num_points=n_total,
        cushion=cushion_a, interlayer_min=inter_min_a,
        interlayer={f"{i + 1},{j + 1}": cat(v) for (i, j), v in pairs.items()},
        contraction=contraction_a, contraction_max=contraction_max, smoothness=smooth_a,
        dominance=dominance, dominance_entry=dominance_entry, mu=mu, mu_arrow=mu_arrow, c=c, rho=rho,
        rho_draws=rho_draws, max_output_norm=max_out, epsilon=float(epsilon), beta=float(beta),
        conditions=conditions, settings=settings, info=info)
