"""Noise stability of a trained network (Kuditipudi et al. 2019, Definitions 2-4).

:func:`noise_stability` measures, per layer and per data point, the quantities that make a network
epsilon-noise stable and the resulting epsilon of Definition 4.

Conventions (how the paper's fully connected, bias-free definitions are read on real models):

* **Layers.** The model is a feed-forward chain of weight layers A_1..A_d: the Linear/Conv layers that
  produce the hidden unit groups of :func:`modeconn.units.infer` (in forward order), then the output layer
  (paper d = number of hidden groups + 1). Residual or branching models raise
  :class:`~modeconn.kuditipudi.chain.NotAChainError`.
  Models with BatchNorm are first folded with :func:`modeconn.params.batchnorm.fold_batchnorm` (eval-mode
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
  of ||J||_2, so cushions are over-estimated if it has not converged (30 iterations: up to a few percent
  per point, a fraction of a percent on the minimum; docs/kuditipudi.md). With biases
  M^{i,j}(x^i) != J x^i; the definition is applied as written (J x^i). Derivatives take ReLU'(0) = 0
  (torch's convention) at kinks. mu_{i->}(x) = min_{i<=j<=d}
  mu_{i,j}(x), with mu_{i,i} = 1.
* **Activation contraction** per hidden layer ||x^i|| / ||phi(x^i)||, with phi the activation right after
  the layer (identity if there is none); c(x) = the max over hidden layers, c = max over points. A layer
  with phi(x^i) = 0 but x^i != 0 (all <= 0 under ReLU) gives inf; the layers above it then have
  x^j = 0 in a bias-free net, 0/0 = NaN, which the max over layers skips: c(x) = inf, and so c and epsilon
  are infinite and ``conditions["activation_contraction"]`` fails, naming the points.
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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modeconn.data import materialize
from modeconn.kuditipudi.algorithm1 import random_dropout
from modeconn.kuditipudi.chain import Chain
from modeconn.kuditipudi.layer_graph import LayerGraph, traced_model
from modeconn.kuditipudi.noise_result import NoiseStability
from modeconn.kuditipudi.norms import (
    dominance, layer_cushion, nanmax, nanmin, norms, operator_frobenius_norm, safe_div, spectral_norms,
)
from modeconn.units import infer

__all__ = ["noise_stability"]


@dataclass
class _PerPoint:
    """Per-point values, one list of batch tensors per layer (or pair of layers, or dropout draw)."""

    d: int
    draws: int
    cushion: list = field(init=False)
    inter_min: list = field(init=False)
    pairs: dict = field(init=False)
    contraction: list = field(init=False)
    smooth: list = field(init=False)
    dom: list = field(init=False)
    dom_entry: list = field(init=False)
    out_norms: list = field(default_factory=list)

    def __post_init__(self) -> None:
        d = self.d
        self.cushion = [[] for _ in range(d)]
        self.inter_min = [[] for _ in range(d)]
        self.pairs = {(i, j): [] for i in range(d) for j in range(i + 1, d)}
        self.contraction = [[] for _ in range(d - 1)]
        self.smooth = [[[] for _ in range(self.draws)] for _ in range(d)]
        self.dom = [[] for _ in range(d - 1)]
        self.dom_entry = [[] for _ in range(d - 1)]


@dataclass
class _Batch:
    """One batch's forward pass: every node's value and, per layer, x^i, its input z and phi(x^i)."""

    x0: Tensor
    env: dict
    X: list[Tensor]
    Z: list[Tensor]
    Phi: list[Tensor]
    xnorm: list[Tensor]


def _forward(graph: LayerGraph, x0: Tensor) -> _Batch:
    with torch.no_grad():
        env = graph.run(x0)
    X = [env[n].detach() for n in graph.layer_nodes]
    Z = [env[n].detach() for n in graph.input_nodes]
    Phi = [env[a].detach() if a is not None else X[i] for i, a in enumerate(graph.activation_nodes[:-1])]
    return _Batch(x0, env, X, Z, Phi, [norms(v) for v in X])


def _at_the_network(graph: LayerGraph, b: _Batch, acc: _PerPoint, fro: dict) -> None:
    """Layer cushions, activation contractions and unit dominance at theta itself."""
    acc.out_norms.append(b.xnorm[-1])
    with torch.no_grad():
        for i, module in enumerate(graph.modules):
            key = (i, tuple(b.Z[i].shape[1:]))
            if key not in fro:
                fro[key] = operator_frobenius_norm(module, b.Z[i].shape[1:])
            acc.cushion[i].append(layer_cushion(module, b.Z[i], fro[key]))
        for i in range(graph.d - 1):
            acc.contraction[i].append(safe_div(b.xnorm[i], norms(b.Phi[i])))
            u, e = dominance(b.Phi[i], graph.widths[i])
            acc.dom[i].append(u)
            acc.dom_entry[i].append(e)


def _interlayer(graph: LayerGraph, b: _Batch, acc: _PerPoint, power_iters: int, pgen: torch.Generator) -> None:
    """mu_{i,j}(x) = ||J x^i|| / (||J||_2 ||x^i||) for every j > i, and their minimum with mu_{i,i} = 1."""
    for i in range(graph.d):
        m = torch.ones_like(b.xnorm[i])
        js = list(range(i + 1, graph.d))
        if js:
            g = graph.downstream(b.env, i, js)
            _, jx = torch.func.jvp(g, (b.X[i],), (b.X[i],))
            for jj, j in enumerate(js):
                single = graph.downstream(b.env, i, [j])
                sigma = spectral_norms(lambda z: single(z)[0], b.X[i], power_iters, pgen)
                mu_ij = safe_div(norms(jx[jj].detach()), sigma * b.xnorm[i])
                acc.pairs[(i, j)].append(mu_ij)
                m = torch.fmin(m, mu_ij)
        acc.inter_min[i].append(m)


def _smoothness_at(graph: LayerGraph, b: _Batch, env_t: dict, rho_pts: list[Tensor]) -> None:
    """Fold rho_{i,j}(x, t) of both Definition 3 variants (A_i dropped or not) into ``rho_pts``."""
    for i in range(1, graph.d - 1):
        js = list(range(i + 1, graph.d))
        g = graph.downstream(b.env, i, js)
        with torch.no_grad():
            xh_i = env_t[graph.layer_nodes[i]]
            xh_prev = graph.modules[i](env_t[graph.input_nodes[i]])  # A_i not dropped
        for xh in (xh_i, xh_prev):
            delta = (xh - b.X[i]).detach()
            dn = norms(delta)
            with torch.no_grad():
                mx = g(xh)
            _, jd = torch.func.jvp(g, (b.X[i],), (delta,))
            for jj, j in enumerate(js):
                rem = norms((mx[jj] - b.X[j] - jd[jj]).detach())
                rho = torch.where(rem > 0, safe_div(dn * b.xnorm[j], b.xnorm[i] * rem),
                                  torch.full_like(rem, math.inf))
                rho_pts[i] = torch.fmin(rho_pts[i], rho)


def _along_dropout(graph: LayerGraph, b: _Batch, acc: _PerPoint, base: Mapping[str, Tensor],
                   hats: Sequence[Mapping[str, Tensor]], ts: Sequence[float]) -> None:
    """Interlayer smoothness and unit dominance along theta -> theta_hat, for every draw."""
    d = graph.d
    for k, hat in enumerate(hats):
        rho_pts = [torch.full_like(b.xnorm[0], math.inf) for _ in range(d)]
        for t in ts:
            params_t = {name: base[name] + t * (v - base[name]) for name, v in hat.items()}
            with torch.no_grad():
                env_t = graph.run_with(b.x0, params_t)
                for i in range(d - 1):
                    a = graph.activation_nodes[i]
                    phi_t = env_t[a] if a is not None else env_t[graph.layer_nodes[i]]
                    u, e = dominance(phi_t, graph.widths[i])
                    acc.dom[i].append(u)
                    acc.dom_entry[i].append(e)
            _smoothness_at(graph, b, env_t, rho_pts)
        for i in range(1, d - 1):
            acc.smooth[i][k].append(rho_pts[i])


def _cat(parts) -> np.ndarray:
    return torch.cat(parts).double().cpu().numpy()


def _contraction_per_point(per_layer: Sequence[np.ndarray]) -> np.ndarray:
    """c(x) = max over hidden layers of ||x^i|| / ||phi(x^i)||, skipping layers where it is 0/0 (x^i = 0,
    e.g. above a layer that is all <= 0 in a bias-free net): a point with [inf, 0/0] has c(x) = inf, not
    NaN. NaN only where every layer is 0/0."""
    stacked = np.stack(per_layer)
    out = np.full(stacked.shape[1], np.nan)
    for layer in stacked:
        out = np.fmax(out, layer)
    return out


def _contraction_condition(c: float, per_layer: Sequence[np.ndarray]) -> dict:
    """Definition 4 needs a finite c: a point with phi(x^i) = 0 but x^i != 0 (a hidden layer all <= 0 under
    ReLU) makes c, and so epsilon, infinite. Names those points (0-based indices into the measured data)
    and their layers (1-based)."""
    stacked = np.stack(per_layer)
    points = [int(k) for k in np.nonzero(np.isinf(stacked).any(axis=0))[0]]
    return {"value": c, "holds": None if math.isnan(c) else bool(math.isfinite(c)), "infinite_points": points,
            "infinite_layers": {str(k): [int(i) + 1 for i in np.nonzero(np.isinf(stacked[:, k]))[0]]
                                for k in points},
            "note": "c is infinite at a point whose hidden layer is all <= 0 (phi(x^i) = 0, x^i != 0)"}


def _result(graph: LayerGraph, acc: _PerPoint, beta: float, dominance_constant: float) -> dict:
    """The per-point arrays, Definition 4's minima and maxima, epsilon and the side conditions."""
    d, draws = graph.d, acc.draws
    cushion = [_cat(c) for c in acc.cushion]
    inter_min = [_cat(c) for c in acc.inter_min]
    contraction: list[np.ndarray | None] = [_cat(c) for c in acc.contraction] + [None]
    contraction_max = _contraction_per_point(contraction[:-1])
    smooth: list[np.ndarray | None] = [
        np.concatenate([_cat(acc.smooth[i][k]) for k in range(draws)]) if 1 <= i <= d - 2 else None
        for i in range(d)]
    rho_draws = []
    for k in range(draws):
        vals = [_cat(acc.smooth[i][k]) for i in range(1, d - 1)]
        rho_draws.append(nanmin(np.concatenate(vals)) if vals else math.inf)
    rho = sorted(rho_draws)[draws // 2]
    dom = [nanmax(_cat(v)) for v in acc.dom]
    dom_entry = [nanmax(_cat(v)) for v in acc.dom_entry]
    mu = [nanmin(a) for a in cushion]
    mu_arrow = [nanmin(a) for a in inter_min]
    c = nanmax(contraction_max)
    max_out = float(_cat(acc.out_norms).max())
    h_min = min(graph.widths)
    denom = min((mu[i] * mu_arrow[i] for i in range(1, d)), default=math.nan)
    epsilon = beta * c * d ** 1.5 * max_out / (math.sqrt(h_min) * denom) if denom > 0 else math.inf
    if math.isnan(denom) or math.isnan(c):
        epsilon = math.nan
    conditions = {
        "h_min": {"value": h_min, "holds": None,
                  "note": "h_min >= Omega~(1) is asymptotic: reported, not checked"},
        "activation_contraction": _contraction_condition(c, contraction[:-1]),
        "smoothness": {"value": rho, "required": 3 * d, "holds": bool(rho >= 3 * d)},
        "no_dominant_unit": {"value": nanmax(np.asarray(dom)), "constant": float(dominance_constant),
                             "per_layer": dom,
                             "holds": bool(all(v <= dominance_constant for v in dom if not math.isnan(v)))},
    }
    return dict(
        cushion=cushion, interlayer_min=inter_min,
        interlayer={f"{i + 1},{j + 1}": _cat(v) for (i, j), v in acc.pairs.items()},
        contraction=contraction, contraction_max=contraction_max, smoothness=smooth,
        dominance=dom, dominance_entry=dom_entry, mu=mu, mu_arrow=mu_arrow, c=c, rho=rho,
        rho_draws=rho_draws, max_output_norm=max_out, epsilon=float(epsilon), beta=float(beta),
        h_min=h_min, conditions=conditions)


def _dropout_draws(spec, base: Mapping[str, Tensor], p: float, draws: int, seed: int) -> tuple[list, list]:
    """``draws`` Algorithm 1 copies (only the changed tensors) and each one's dropped fraction per group."""
    gen = torch.Generator().manual_seed(int(seed))
    hats, dropped_fraction = [], []
    for _ in range(draws):
        theta_hat, dropped = random_dropout(spec, base, p, gen)
        hats.append({k: v for k, v in theta_hat.items() if v is not base[k]})
        dropped_fraction.append({g.name: len(dropped[g.name]) / g.size for g in spec.groups})
    return hats, dropped_fraction


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

    gm, folded = traced_model(model, theta, x_all[:2], device)
    spec = infer(gm, x_all[:2])
    graph = LayerGraph(gm, Chain.from_spec(spec))
    base = {k: v.detach() for k, v in gm.named_parameters()}
    hats, dropped_fraction = _dropout_draws(spec, base, p, draws, seed)
    pgen = torch.Generator(device=device).manual_seed(int(seed) + 1)
    acc, fro = _PerPoint(graph.d, draws), {}
    for start in range(0, n_total, batch_size):
        b = _forward(graph, x_all[start:start + batch_size])
        _at_the_network(graph, b, acc, fro)
        _interlayer(graph, b, acc, power_iters, pgen)
        _along_dropout(graph, b, acc, base, hats, ts)

    settings = {
        "max_items": max_items, "num_points": n_total, "split": split, "p": float(p), "ts": ts,
        "draws": draws, "power_iters": int(power_iters), "seed": int(seed), "batch_size": batch_size,
        "folded_batchnorm": folded, "dominance_constant": float(dominance_constant),
        "smoothness_remainder": "first-order: M(x_hat) - M(x) - J (x_hat - x)",
        "norms": "Euclidean norm of the flattened per-example tensor; conv h_i = channels",
    }
    info = {"dropped_fraction": dropped_fraction, "output_is_last_layer": graph.output_node is graph.layer_nodes[-1]}
    return NoiseStability(
        layers=list(graph.layers), kinds=[type(m).__name__ for m in graph.modules], widths=list(graph.widths),
        activations=list(graph.activation_names), d=graph.d, num_points=n_total,
        **_result(graph, acc, float(beta), float(dominance_constant)), settings=settings, info=info)
