"""Benchmark: time per curve-training epoch relative to a plain training epoch, and the barrier reached.

Trains two endpoints (seeds 0 and 1) with ``modeconn.training.train.train``, fits a curve between them with
``modeconn.paths.fit_curve`` (same model, same data, same batch size, same process), and prints

* the median seconds per plain training epoch (``modeconn.training.train.train``) and per curve epoch, and the
  median of their per-round ratios (Garipov et al.'s reference reports under 1.5x): plain and curve epochs
  are timed alternately, each from its call to the end of its first epoch, after one warm-up round;
* the maximum train loss, the epsilon barrier of the train loss and the maximum test error along the
  straight line and along the fitted curve (``modeconn.evaluation.evaluate.evaluate_path``, 61 points).

Defaults (digits, the project's default
MLP: hidden (256, 256), dropout 0.5) run in well under two minutes on a CPU.

``--compare`` instead measures epochs to a barrier: a ConvFC-like net (3 conv layers with max-pooling, 2
hidden linear layers, no BatchNorm) on digits upsampled to 3x32x32, endpoints trained ``--endpoint-epochs``
(30), then for every ``--runs`` entry ``T:EPOCHS:LR[:INIT[:SEQUENCE[:DENSITY]]]`` (t per step, epoch budget
with the Garipov schedule sized to it, learning rate, bend initialisation ``line``/``scaled``, t sequence
``random``/``golden``, t density ``uniform``/``bends``) one curve per curve seed 0..``--seeds``-1. After
every epoch the curve's epsilon barrier of the train loss (``--num-points`` points) is recorded; it prints
each run's mean barrier by epoch, and a summary: the final mean barrier and its range over the seeds, the
epoch at which the mean first reaches the first run's final mean, and what an epoch of each scheme costs
relative to the first run's (process CPU time of one-epoch fits run alternately, ``--timing-rounds``;
0 skips it). ``--plot OUT.png``: mean barrier against epoch and against training seconds. The default runs
are the reference (one random uniform t per batch, 20 epochs, lr 0.05) and the measured short-budget recipe.

    python bench/fit_curve.py                      # digits MLP
    python bench/fit_curve.py --model convnet      # Kuditipudi et al.'s all-conv net on 1x8x8 digits
    python bench/fit_curve.py --device cuda --data cifar10 --model vgg16 --endpoint-epochs 5 --curve-epochs 5
    python bench/fit_curve.py --compare --plot compare.png   # epochs to barrier, reference vs recipe
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from modeconn import data as D  # noqa: E402
from modeconn import models  # noqa: E402
from modeconn.evaluation.evaluate import evaluate_path  # noqa: E402
from modeconn.io.heap import keep_freed_memory  # noqa: E402
from modeconn.paths import linear  # noqa: E402
from modeconn.paths.curve_fit import fit_curve  # noqa: E402
from modeconn.paths.curves import load_curve  # noqa: E402
from modeconn.training.train import TrainConfig, train  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--model", default="mlp", help="mlp | convnet | vgg11 | vgg16 | preresnet20 | ...")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256], help="MLP hidden widths")
    p.add_argument("--dropout", type=float, default=0.5, help="MLP dropout")
    p.add_argument("--kind", default="bezier", choices=["bezier", "polychain"])
    p.add_argument("--num-bends", type=int, default=3)
    p.add_argument("--endpoint-epochs", type=int, default=30)
    p.add_argument("--curve-epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="endpoint and curve learning rate")
    p.add_argument("--wd", type=float, default=1e-4, help="endpoint and curve weight decay")
    p.add_argument("--curve-lr", type=float, default=None, help="the curve's learning rate (default: --lr)")
    p.add_argument("--t-per-step", type=int, default=1)
    p.add_argument("--t-sequence", default="random", choices=["random", "golden"])
    p.add_argument("--t-density", default="uniform", choices=["uniform", "bends"])
    p.add_argument("--init", default="line", choices=["line", "scaled"], help="curve bend initialisation")
    p.add_argument("--num-points", type=int, default=61)
    p.add_argument("--timing-rounds", type=int, default=10, help="alternating plain / curve epochs timed")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--compare", action="store_true", help="epochs to barrier, one t per batch vs several")
    p.add_argument("--runs", nargs="+", default=["1:20:0.05", "1:10:0.15:scaled:golden:bends"],
                   help="--compare: curves as T_PER_STEP:EPOCHS:LR[:INIT[:SEQUENCE[:DENSITY]]] (the first is the "
                        "reference; defaults line, random, uniform)")
    p.add_argument("--seeds", type=int, default=3, help="--compare: curve seeds per run (0..N-1)")
    p.add_argument("--plot", default=None, help="--compare: write barrier against epoch and seconds to this PNG")
    p.add_argument("--work", default=None, help="--compare: folder for the endpoint checkpoints (reused)")
    p.add_argument("--channels", type=int, nargs=3, default=[8, 16, 16], help="--compare: ConvFC conv widths")
    p.add_argument("--fc", type=int, default=128, help="--compare: ConvFC hidden linear width")
    return p.parse_args(argv)


def build(args, ds: D.Dataset) -> torch.nn.Module:
    kw = {"hidden": tuple(args.hidden), "dropout": args.dropout} if args.model == "mlp" else {}
    return models.build(args.model, ds.input_shape, ds.num_classes, **kw)


def convfc(channels=(8, 16, 16), hidden=128, classes=10) -> nn.Module:
    """ConvFC-like (Garipov et al.'s ConvFC, narrower): 3 x [conv 3x3, ReLU, max-pool 2], 2 hidden linear layers."""
    c1, c2, c3 = channels
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c3 * 16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, classes))


def digits_3x32(device) -> D.Dataset:
    """Digits (8x8) upsampled bilinearly to 32x32 and repeated over 3 channels."""
    ds = D.load("digits", image=True)

    def up(x):
        return F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return dataclasses.replace(ds, x_train=up(ds.x_train), x_test=up(ds.x_test), input_shape=(3, 32, 32)).to(device)


def parse_run(spec: str) -> dict:
    """``T:EPOCHS:LR[:INIT[:SEQUENCE[:DENSITY]]]`` -> fit_curve options (defaults: the reference scheme)."""
    fields = spec.split(":")
    if not 3 <= len(fields) <= 6:
        raise SystemExit(f"--runs entries are T:EPOCHS:LR[:INIT[:SEQUENCE[:DENSITY]]]; got {spec!r}")
    m, epochs, lr, init, sequence, density = fields + ["line", "random", "uniform"][len(fields) - 3:]
    return {"t_per_step": int(m), "epochs": int(epochs), "lr": float(lr), "init": init, "t_sequence": sequence,
            "t_density": density}


def label(run: dict) -> str:
    return (f"{run['t_per_step']} t, {run['t_sequence']}/{run['t_density']}, {run['init']}, lr {run['lr']:g}, "
            f"{run['epochs']} ep")


def compare(args, dev) -> dict:
    """Epochs to barrier: one curve per ``args.runs`` entry and curve seed, the barrier after every epoch."""
    ds = digits_3x32(dev)
    print(f"{D.describe(ds)}; ConvFC-like {args.channels} / {args.fc}; device {dev}; threads {torch.get_num_threads()}")
    cfg = TrainConfig(lr=args.lr, weight_decay=args.wd, epochs=args.endpoint_epochs, batch_size=args.batch_size,
                      schedule="garipov", device=str(dev))
    ends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = convfc(args.channels, args.fc)
        ckpt = Path(args.work) / f"convfc_seed{seed}.pt" if args.work else None
        metrics = train(model, ds, cfg, seed=seed, checkpoint_path=ckpt, progress=False)
        ends.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        print(f"endpoint seed {seed}: train loss {metrics['train_loss']:.4f}, test acc {metrics['test_acc']:.4f}")
    model = convfc(args.channels, args.fc)

    def barrier(path) -> float:
        ev = evaluate_path(model, path, ds, num_points=args.num_points, device=dev, progress=False)
        return ev.barriers["train_loss"]["epsilon"]

    results = {"settings": vars(args), "line_barrier": barrier(linear(ends[0], ends[1])), "runs": []}
    print(f"straight line: epsilon barrier {results['line_barrier']:.4f}; curve seeds 0..{args.seeds - 1}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.runs):
            run = {**parse_run(spec), "barrier": [], "wall_s": [], "cpu_s": []}  # [seed][epoch]
            for seed in range(args.seeds):
                ckpt = Path(tmp) / f"run{i}_seed{seed}.pt"
                barriers, cpu, clock = [], [], [time.process_time()]

                def after_epoch(epoch, record, ckpt=ckpt, barriers=barriers, cpu=cpu, clock=clock):
                    cpu.append(time.process_time() - clock[0])
                    barriers.append(barrier(load_curve(ckpt)))
                    clock[0] = time.process_time()  # the barrier's evaluation is not training time

                curve = fit_curve(model, ends[0], ends[1], ds, kind=args.kind, num_bends=args.num_bends,
                                  wd=args.wd, batch_size=args.batch_size, seed=seed, device=dev, checkpoint_path=ckpt,
                                  progress=False, callback=after_epoch,
                                  **{k: run[k] for k in ("t_per_step", "epochs", "lr", "init", "t_sequence",
                                                         "t_density")})
                run["barrier"].append(barriers)
                run["wall_s"].append(curve.info["seconds"])
                run["cpu_s"].append(cpu)
            run["mean_barrier"] = [statistics.fmean(col) for col in zip(*run["barrier"])]
            print(f"  {label(run)}: mean barrier by epoch " + " ".join(f"{b:.4f}" for b in run["mean_barrier"])
                  + "; final per seed " + " ".join(f"{b[-1]:.4f}" for b in run["barrier"]), flush=True)
            results["runs"].append(run)
    # ---- per-epoch cost: one-epoch fits of every scheme, alternately (load on the machine hits all alike)
    schemes = list(dict.fromkeys((r["t_per_step"], r["t_sequence"], r["t_density"]) for r in results["runs"]))
    cost = {key: [] for key in schemes}
    for r in range(args.timing_rounds + 1 if args.timing_rounds else 0):  # round 0 warms up
        for key in schemes:
            started = time.process_time()
            fit_curve(model, ends[0], ends[1], ds, kind=args.kind, num_bends=args.num_bends, epochs=1, lr=0.01,
                      wd=args.wd, batch_size=args.batch_size, t_per_step=key[0], t_sequence=key[1],
                      t_density=key[2], seed=r, device=dev, progress=False)
            if r:
                cost[key].append(time.process_time() - started)
    ratio = {key: statistics.median([c / p for c, p in zip(cost[key], cost[schemes[0]])]) if cost[key] else math.nan
             for key in schemes}
    results["epoch_cost"] = [{"t_per_step": k[0], "t_sequence": k[1], "t_density": k[2], "cpu_s": cost[k],
                              "ratio": ratio[k]} for k in schemes]
    if args.timing_rounds:
        print(f"per-epoch CPU cost, alternating one-epoch fits ({args.timing_rounds} rounds; median ratio to "
              f"{schemes[0][0]} t {schemes[0][1]}/{schemes[0][2]}): "
              + ", ".join(f"{k[0]} t {k[1]}/{k[2]}: {ratio[k]:.3f}x" for k in schemes))
    ref = results["runs"][0]
    target = ref["mean_barrier"][-1]
    print(f"\nreference ({label(ref)}): final mean barrier {target:.4f} over {args.seeds} curve seeds")
    print(f"{'run':48s} {'final mean':>10s} {'range':>15s} {'reaches ref at':>14s} {'s/epoch wall':>12s} "
          f"{'cost vs ref':>11s}")
    for run in results["runs"]:
        hit = next((e + 1 for e, b in enumerate(run["mean_barrier"]) if b <= target), None)
        run["epochs_to_reference"] = hit
        run["cost_vs_reference"] = (ratio[(run["t_per_step"], run["t_sequence"], run["t_density"])]
                                    / ratio[schemes[0]])
        finals = [b[-1] for b in run["barrier"]]
        wall = statistics.median(s for seed in run["wall_s"] for s in seed)
        print(f"{label(run):48s} {run['mean_barrier'][-1]:10.4f} {min(finals):7.4f}-{max(finals):.4f} "
              f"{str(hit or '-'):>14s} {wall:12.2f} {run['cost_vs_reference']:10.3f}x")
    if args.plot:
        plot_compare(results, args.plot)
        print(f"figure: {args.plot}")
    return results


def plot_compare(results: dict, out: str) -> None:
    """Mean barrier (over curve seeds, the seeds' range shaded) against epoch and against training seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from modeconn.reporting.plots import save_figure

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run in results["runs"]:
        b = np.array(run["barrier"])  # [seed, epoch]
        epochs = np.arange(1, b.shape[1] + 1)
        seconds = np.cumsum(np.mean(np.array(run["wall_s"]), axis=0))
        for ax, x in ((by_epoch, epochs), (by_time, seconds)):
            (line,) = ax.plot(x, b.mean(0), marker=".", label=label(run))
            ax.fill_between(x, b.min(0), b.max(0), color=line.get_color(), alpha=0.15)
    target = results["runs"][0]["mean_barrier"][-1]
    for ax, xlabel in ((by_epoch, "epoch"), (by_time, "training seconds (wall, mean over seeds)")):
        ax.axhline(target, color="grey", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    by_epoch.set_ylabel("epsilon barrier of the train loss")
    by_epoch.legend(fontsize=7)
    s = results["settings"]
    fig.suptitle(f"Bezier curve between two ConvFC nets (digits 3x32x32): mean of {s['seeds']} curve seeds, "
                 f"range shaded; dashed: the reference's final barrier", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # as the modeconn command does (modeconn/io/heap.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        results = compare(args, D.resolve_device(args.device))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return results
    dev = D.resolve_device(args.device)
    ds = D.load(args.data, device=dev)
    cfg = TrainConfig(lr=args.lr, weight_decay=args.wd, epochs=args.endpoint_epochs, batch_size=args.batch_size,
                      schedule="garipov", device=str(dev))
    print(f"{D.describe(ds)}; model {args.model}; device {dev}; torch threads {torch.get_num_threads()}")

    ends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build(args, ds)
        metrics = train(model, ds, cfg, seed=seed, progress=False)
        ends.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        print(f"endpoint seed {seed}: train loss {metrics['train_loss']:.4f}, test acc {metrics['test_acc']:.4f}")

    # ---- timing: one plain epoch (the trainer) and one curve epoch, alternately, so that load on the
    # machine hits both alike; each timed from the call to the end of its first epoch (setup included).
    model = build(args, ds)
    one = TrainConfig(lr=args.lr, weight_decay=args.wd, epochs=1, batch_size=args.batch_size, schedule="garipov",
                      device=str(dev))
    plain_s, curve_s, plain_cpu, curve_cpu = [], [], [], []

    def timed(run) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) from the call to the end of the first epoch."""
        stamps = []

        def tick(*_):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            stamps.append((time.perf_counter(), time.process_time()))

        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        tick()
        run(tick)
        return stamps[1][0] - stamps[0][0], stamps[1][1] - stamps[0][1]

    for r in range(args.timing_rounds + 1):  # round 0 warms up
        p = timed(lambda tick: train(model, ds, one, seed=r, progress=False, on_epoch_end=tick))
        c = timed(lambda tick: fit_curve(model, ends[0], ends[1], ds, kind=args.kind, num_bends=args.num_bends,
                                         epochs=1, lr=args.lr, wd=args.wd, batch_size=args.batch_size,
                                         t_per_step=args.t_per_step, t_sequence=args.t_sequence,
                                         t_density=args.t_density, init=args.init, seed=r, device=dev,
                                         progress=False, callback=tick))
        if r:
            plain_s.append(p[0])
            curve_s.append(c[0])
            plain_cpu.append(p[1])
            curve_cpu.append(c[1])
    plain, per_curve = statistics.median(plain_s), statistics.median(curve_s)
    ratio = statistics.median([c / p for c, p in zip(curve_s, plain_s)])
    cpu_ratio = statistics.median(curve_cpu) / statistics.median(plain_cpu)

    # ---- the curve itself
    model = build(args, ds)
    started = time.perf_counter()
    curve = fit_curve(model, ends[0], ends[1], ds, kind=args.kind, num_bends=args.num_bends,
                      epochs=args.curve_epochs, lr=args.curve_lr or args.lr, wd=args.wd, batch_size=args.batch_size,
                      t_per_step=args.t_per_step, t_sequence=args.t_sequence, t_density=args.t_density,
                      init=args.init, device=dev, progress=False)
    curve_total = time.perf_counter() - started

    results = {"data": args.data, "model": args.model, "device": str(dev), "kind": args.kind,
               "num_bends": args.num_bends, "batch_size": args.batch_size, "t_per_step": args.t_per_step,
               "curve_lr": args.curve_lr or args.lr,
               "t_sequence": args.t_sequence, "t_density": args.t_density, "init": args.init,
               "plain_epoch_s": plain, "curve_epoch_s": per_curve, "ratio": ratio,
               "cpu_time_ratio": cpu_ratio, "plain_epoch_s_all": plain_s, "curve_epoch_s_all": curve_s,
               "curve_fit_s": curve_total, "curve_final_train_loss": curve.info["train_loss"][-1],
               "curve_final_regularizer": curve.info["regularizer"][-1]}
    for path in (linear(ends[0], ends[1]), curve):
        ev = evaluate_path(model, path, ds, num_points=args.num_points, device=dev, progress=False)
        b = ev.barriers
        results[path.name] = {"max_train_loss": b["train_loss"]["max"],
                              "epsilon_train_loss": b["train_loss"]["epsilon"],
                              "endpoint_train_loss": [b["train_loss"]["start"], b["train_loss"]["end"]],
                              "max_test_error": b["test_error"]["max"],
                              "endpoint_test_error": [b["test_error"]["start"], b["test_error"]["end"]]}

    print(f"plain training epoch : {plain * 1e3:8.2f} ms (median of {len(plain_s)}, batch {args.batch_size})")
    print(f"curve training epoch : {per_curve * 1e3:8.2f} ms (median of {len(curve_s)}, t per step {args.t_per_step})")
    print(f"ratio curve / plain  : {ratio:8.3f}x   (median of the per-round ratios; reference: < 1.5x)")
    if dev.type == "cpu":
        print(f"CPU-time ratio       : {cpu_ratio:8.3f}x   (process CPU seconds; robust to other load on the machine)")
    print(f"curve fit            : {args.curve_epochs} epochs in {curve_total:.1f} s")
    print(f"{'path':10s} {'max train loss':>15s} {'eps barrier':>12s} {'max test err':>13s} {'ends test err':>16s}")
    for name in ("linear", curve.name):
        r = results[name]
        ends_err = "/".join(f"{e:.4f}" for e in r["endpoint_test_error"])
        print(f"{name:10s} {r['max_train_loss']:15.4f} {r['epsilon_train_loss']:12.4f} {r['max_test_error']:13.4f} "
              f"{ends_err:>16s}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
