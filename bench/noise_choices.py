"""Two numerical choices of :func:`modeconn.stability.noise_stability`, measured on a bias-free conv net on
digits (docs/kuditipudi.md quotes the output):

1. ReLU'(0) = 0 at kinks (torch's convention): the fraction of first-layer pre-activations that are exactly
   0, and how far the minimal interlayer cushions and Definition 4's epsilon move with ReLU'(0) = 1 instead;
2. power iteration for ||J||_2: how far the power-iteration interlayer cushions mu_{i,j}(x) sit above the
   exact ones (dense Jacobian, exact spectral norm), per point and on the minimum over points.

Run: ``python bench/noise_choices.py [--items 64] [--epochs 15]`` (about a minute on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch import nn

from modeconn.data import load
from modeconn.kuditipudi.chain import Chain
from modeconn.kuditipudi.layer_graph import LayerGraph, traced_model
from modeconn.stability import noise_stability
from modeconn.training.train import TrainConfig, train
from modeconn.units import infer


def bias_free_convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 64, 10, bias=False))


def relu_prime_at_zero_one(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """ReLU with derivative 1 at 0 (the same values): where(x >= 0, x, 0)."""
    return torch.where(x >= 0, x, torch.zeros_like(x))


def exact_cushion_excess(model: nn.Module, x: torch.Tensor, result) -> dict:
    """Power-iteration mu_{i,j}(x) / exact mu_{i,j}(x) - 1 for every pair i < j (j up to the output layer)
    and point (dense Jacobian of the one-point map, exact spectral norm), and the same on each pair's
    minimum over points."""
    gm, _ = traced_model(model, None, x[:2], x.device)
    graph = LayerGraph(gm, Chain.from_spec(infer(gm, x[:2])))
    pairs = [(i, j) for i in range(graph.d) for j in range(i + 1, graph.d)]
    exact = {pair: [] for pair in pairs}
    for k in range(len(x)):
        env = graph.run(x[k:k + 1])
        xs = [env[n].detach() for n in graph.layer_nodes]
        for i, j in pairs:
            f = graph.downstream(env, i, [j])
            jac = torch.func.jacrev(lambda z: f(z)[0])(xs[i]).reshape(xs[j].numel(), xs[i].numel()).double()
            jx = jac @ xs[i].reshape(-1).double()
            exact[(i, j)].append(float(jx.norm() / (torch.linalg.matrix_norm(jac, ord=2) * xs[i].double().norm())))
    per_point, on_min = [], []
    for i, j in pairs:
        e, power = np.asarray(exact[(i, j)]), result.interlayer[f"{i + 1},{j + 1}"]
        ok = np.isfinite(e) & np.isfinite(power) & (e > 0)
        per_point.append(np.max(power[ok] / e[ok] - 1))
        on_min.append(np.min(power[ok]) / np.min(e[ok]) - 1)
    return {"max_per_point": float(max(per_point)), "max_on_minimum": float(max(on_min))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--raw", action="store_true",
                        help="pixels in [0, 1] (blank pixels exactly 0) instead of the loader's standardized ones")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load("digits", image=True)
    if args.raw:  # undo the global standardization: the loader's minimum is a blank pixel (0/16)
        lo, hi = data.x_train.min(), data.x_train.max()
        data.x_train, data.x_test = ((v - lo) / (hi - lo) for v in (data.x_train, data.x_test))
    model = bias_free_convnet()
    train(model, data, TrainConfig(epochs=args.epochs, lr=0.05, batch_size=64), seed=0, progress=False)
    model.eval()
    x = data.x_train[: args.items]
    with torch.no_grad():
        pre1 = model[0](data.x_train)
        pre2 = model[2](model[1](pre1))
    print(f"pre-activations exactly 0 ({len(data.x_train)} training images, {'raw' if args.raw else 'standardized'} "
          f"pixels): layer 1 {float((pre1 == 0).double().mean()):.1%}, layer 2 {float((pre2 == 0).double().mean()):.1%}")

    base = noise_stability(model, None, data, max_items=args.items)
    forward = nn.ReLU.forward
    nn.ReLU.forward = lambda self, z: relu_prime_at_zero_one(z)
    try:
        kink1 = noise_stability(model, None, data, max_items=args.items)
    finally:
        nn.ReLU.forward = forward
    print("min interlayer cushion mu_{i->} per layer, ReLU'(0)=0 vs 1:",
          [f"{a:.4g} / {b:.4g}" for a, b in zip(base.mu_arrow, kink1.mu_arrow)])
    moves = [abs(b / a - 1) for a, b in zip(base.mu_arrow[1:], kink1.mu_arrow[1:]) if a > 0 and math.isfinite(a)]
    print(f"largest relative move of mu_(i->) (layers 2..d): {max(moves):.1%}; epsilon {base.epsilon:.4g} -> "
          f"{kink1.epsilon:.4g} ({kink1.epsilon / base.epsilon - 1:+.1%})")
    excess = exact_cushion_excess(model, x, base)
    print(f"power iteration (30 iterations) over exact interlayer cushions: up to {excess['max_per_point']:.1%} "
          f"per point, {excess['max_on_minimum']:.2%} on the minimum over points")


if __name__ == "__main__":
    main()
