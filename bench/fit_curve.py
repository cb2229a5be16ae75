"""Benchmark: time per curve-training epoch relative to a plain training epoch, and the barrier reached.

Trains two endpoints (seeds 0 and 1) with ``modeconn.train.train``, fits a curve between them with
``modeconn.paths.fit_curve`` (same model, same data, same batch size, same process), and prints

* the median seconds per plain training epoch (``modeconn.train.train``) and per curve epoch, and the
  median of their per-round ratios (Garipov et al.'s reference reports under 1.5x): plain and curve epochs
  are timed alternately, each from its call to the end of its first epoch, after one warm-up round;
* the maximum train loss, the epsilon barrier of the train loss and the maximum test error along the
  straight line and along the fitted curve (``modeconn.evaluate.evaluate_path``, 61 points).

Defaults (digits, the project's default
MLP: hidden (256, 256), dropout 0.5) run in well under two minutes on a CPU.

    python bench/fit_curve.py                      # digits MLP
    python bench/fit_curve.py --model convnet      # Kuditipudi et al.'s all-conv net on 1x8x8 digits
    python bench/fit_curve.py --device cuda --data cifar10 --model vgg16 --endpoint-epochs 5 --curve-epochs 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from modeconn import data as D  # noqa: E402
from modeconn import models  # noqa: E402
from modeconn.evaluate import evaluate_path  # noqa: E402
from modeconn.paths import linear  # noqa: E402
from modeconn.paths.curves import fit_curve  # noqa: E402
from modeconn.train import TrainConfig, train  # noqa: E402


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
    p.add_argument("--t-per-step", type=int, default=1)
    p.add_argument("--num-points", type=int, default=61)
    p.add_argument("--timing-rounds", type=int, default=10, help="alternating plain / curve epochs timed")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def build(args, ds: D.Dataset) -> torch.nn.Module:
    kw = {"hidden": tuple(args.hidden), "dropout": args.dropout} if args.model == "mlp" else {}
    return models.build(args.model, ds.input_shape, ds.num_classes, **kw)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
                                         t_per_step=args.t_per_step, seed=r, device=dev, progress=False,
                                         callback=tick))
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
                      epochs=args.curve_epochs, lr=args.lr, wd=args.wd, batch_size=args.batch_size,
                      t_per_step=args.t_per_step, device=dev, progress=False)
    curve_total = time.perf_counter() - started

    results = {"data": args.data, "model": args.model, "device": str(dev), "kind": args.kind,
               "num_bends": args.num_bends, "batch_size": args.batch_size, "t_per_step": args.t_per_step,
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
