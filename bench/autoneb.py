"""Benchmark: seconds per AutoNEB iteration, every interior pivot in one vmapped call vs one pivot at a time.

One NEB iteration (redistribution, the interior pivots' train-mode loss and gradient, each on its own batch,
the endpoints' eval-mode losses, the improved tangent, the nudge, a plain descent step) is timed with the
interior gradients from ``modeconn.paths.neb_step.ChainStep.interior`` (one ``vmap(grad_and_value)`` call,
every pivot with the same dropout draws; a conv net on a CPU one pivot after another, since a vmapped
convolution is a grouped one and slower there: ``--force-vmap`` times the vmapped call anyway) and from the
loop the reference runs, ``ChainStep.one`` for each pivot (plain autograd, its own dropout draws), at 5, 9,
17 and 31 pivots. The two are timed alternately in one process (``--rounds`` rounds of ``--iterations`` iterations
each, after one warm-up round); it prints the median seconds per iteration of each and the median of the
per-round ratios (loop / batched). Models: the default MLP (conf/model/mlp.yaml: hidden (256, 256), dropout
0.5) on flat 8x8 digits, and Kuditipudi et al.'s conv net (conf/model/convnet.yaml: 3 conv layers of 32
3x3 filters) on 1x8x8 digits; batch 512 (the paper's NEB batch). Timings on a shared machine are noisy;
compare ratios measured in one process, not seconds across runs.

    python bench/autoneb.py                       # both models, CPU, torch's default threads
    python bench/autoneb.py --threads 2 --models mlp --pivots 9 31
    python bench/autoneb.py --device cuda
    python bench/autoneb.py --models mlp --pivots 9 --parts   # where the time goes: interior step vs the rest
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from modeconn import data as D
from modeconn import models
from modeconn.paths.neb_step import ChainStep, chain_force

MODELS = {
    "mlp": (False, lambda: models.build("mlp", (64,), 10, hidden=[256, 256], dropout=0.5)),
    "convnet": (True, lambda: models.build("convnet", (1, 8, 8), 10, width=32, depth=3, bias=False)),
}


def loop(step: ChainStep, rows: torch.Tensor, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """The interior pivots one at a time, as the reference runs them: plain autograd, each its own dropout draws."""
    pairs = [step.one(row, xi, yi) for row, xi, yi in zip(rows, x, y)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def iteration(step: ChainStep, chain: torch.Tensor, weights: torch.Tensor, x, y, batched: bool,
              lr: float = 0.01, wd: float = 1e-4) -> None:
    """One NEB iteration (the library's :func:`chain_force`) and a plain descent step on ``chain``'s interior."""
    _, force = chain_force(step, chain, weights, x, y, weight_decay=wd, spring=None, tangent="improved",
                           interior=None if batched else (lambda rows, xs, ys: loop(step, rows, xs, ys)))
    with torch.no_grad():
        chain[1:-1].sub_(force, alpha=lr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, pivots: int, args, device: torch.device) -> dict:
    image, make = MODELS[name]
    ds = D.load("digits", image=image)
    torch.manual_seed(0)  # a batch per pivot (endpoints included), as autoneb draws them
    idx = torch.stack([torch.randperm(len(ds.y_train))[: args.batch_size] for _ in range(pivots)])
    x, y = ds.x_train[idx].to(device), ds.y_train[idx].to(device)
    model, a, b = make().to(device), make().state_dict(), make().state_dict()
    step = ChainStep(model, a, b, device)
    step.one_by_one = step.one_by_one and not args.force_vmap
    weights = torch.ones(pivots - 1, dtype=torch.float64)
    w = torch.linspace(0, 1, pivots, dtype=step.flat_a.dtype, device=device)[1:-1, None]
    start = torch.cat([step.flat_a[None], torch.lerp(step.flat_a.expand(pivots - 2, -1),
                                                     step.flat_b.expand(pivots - 2, -1), w), step.flat_b[None]])
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds + 1):
        for batched in (True, False):
            chain = start.clone()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.iterations):
                iteration(step, chain, weights, x, y, batched)
            _sync(device)
            if r > 0:  # round 0 warms up
                times[batched].append((time.perf_counter() - t0) / args.iterations)
    ratios = [lo / ba for ba, lo in zip(times[True], times[False])]
    out = {"model": name, "pivots": pivots, "batched_s": statistics.median(times[True]),
           "loop_s": statistics.median(times[False]), "ratio": statistics.median(ratios)}
    if args.parts:
        out.update(parts(step, start, weights, x, y, args.rounds * args.iterations, device))
    return out


def parts(step: ChainStep, chain: torch.Tensor, weights: torch.Tensor, x, y, repeats: int,
          device: torch.device) -> dict:
    """Median seconds of the pieces of one iteration: the interior step batched and looped (the only part
    batching changes), and the rest of ``chain_force`` (endpoints, geometry) with the interior given."""
    rows = chain[1:-1]
    done = step.interior(rows, x[1:-1], y[1:-1])
    scratch = chain.clone()  # chain_force redistributes its chain in place: never the caller's

    def given(*_):  # chain_force reads the gradients, never writes them: no copy to time
        return done

    pieces = {"interior_batched_s": lambda: step.interior(rows, x[1:-1], y[1:-1]),
              "interior_loop_s": lambda: loop(step, rows, x[1:-1], y[1:-1]),
              "rest_s": lambda: chain_force(step, scratch, weights, x, y, weight_decay=1e-4, spring=None,
                                            tangent="improved", interior=given)}
    out = {}
    for key, fn in pieces.items():
        fn()
        seconds = []
        for _ in range(max(3, repeats)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        out[key] = statistics.median(seconds)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--pivots", nargs="+", type=int, default=[5, 9, 17, 31])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force-vmap", action="store_true", help="vmap the pivots of a conv net on a CPU too")
    parser.add_argument("--parts", action="store_true",
                        help="also time the interior step batched and looped, and the rest of the iteration")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.rounds} rounds of {args.iterations} iterations")
    print(f"{'model':8} {'pivots':>6} {'batched s/it':>13} {'loop s/it':>10} {'loop/batched':>13}")
    for name in args.models:
        for p in args.pivots:
            r = measure(name, p, args, device)
            print(f"{r['model']:8} {r['pivots']:>6} {r['batched_s']:>13.4f} {r['loop_s']:>10.4f} {r['ratio']:>12.2f}x",
                  flush=True)
            if args.parts:
                ceiling = (r["interior_loop_s"] + r["rest_s"]) / (r["interior_batched_s"] + r["rest_s"])
                print(f"{'':15} interior batched {r['interior_batched_s'] * 1e3:.1f} ms, looped "
                      f"{r['interior_loop_s'] * 1e3:.1f} ms ({r['interior_loop_s'] / r['interior_batched_s']:.2f}x); "
                      f"the rest {r['rest_s'] * 1e3:.1f} ms; ceiling of the ratio {ceiling:.2f}x", flush=True)


if __name__ == "__main__":
    main()
