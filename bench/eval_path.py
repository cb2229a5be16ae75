"""Benchmark: evaluating a path many points at once versus one model at a time.

Trains (or, with ``--no-train``, just initialises) two endpoints of a model, builds the straight path
between them with ``modeconn.paths.linear`` and evaluates it at ``--points`` values of t on the train and
test splits, three ways, on the same data:

* ``loop``: the ten-line loop a user writes without modeconn (:func:`loop_baseline`): for each t
  ``model.load_state_dict(path.state_dict(t))``, for BatchNorm models the running statistics reset and
  recomputed (``momentum=None``, BatchNorm in train mode over the first ``--bn-items`` training inputs in
  modeconn's batches of 512), then one eval-mode forward per split;
* ``evaluate_path(..., batched=False)``: modeconn's one-point-at-a-time reference mode;
* ``evaluate_path(..., batched=True)``: the default, many t per data batch through ``torch.func.vmap``
  (BatchNorm statistics of a chunk of points computed together); ``--chunks 4 8`` also times it with
  those point chunks forced (e.g. to measure stacked convolutions on a CPU, which evaluates them one
  point at a time by default).

Each method runs in a fresh plain Python process of its own (``--heap`` calls
``modeconn.io.heap.keep_freed_memory()`` first, as the CLI does), as in a user's script that runs only it: in
one process the methods change each other's speed through the C heap (glibc raises its mmap threshold for
good once a large block is freed, and a method that frees one made the user's conv-net loop after it 1.7x
faster); ``--same-process`` interleaves them in one process instead (less drift, but that coupling). Each
method is run once to warm up, then ``--repeats`` times; the table gives the median and the best
wall-clock seconds (``time.perf_counter``, with a CUDA synchronisation on a GPU), the speed-up of the median
over ``loop``, the same for the process CPU seconds (with ``--threads 1`` on a busy CPU these measure the
work whatever else runs), and the largest absolute difference in train (and test) loss and error between the batched
evaluation and each of the other two. Times are only reported, never asserted on.

    python bench/eval_path.py                                  # the default MLP on digits, 61 points
    python bench/eval_path.py --model convnet                  # the all-conv net on 1x8x8 digits
    python bench/eval_path.py --model vgg11 --data synthetic   # a narrow VGG-11 on CIFAR-shaped data
    python bench/eval_path.py --model mlp_bn                   # the MLP with BatchNorm1d after each hidden layer
    python bench/eval_path.py --model mlp --hidden 65 33 49 --no-train   # issue 28's table: also mlp_bn --hidden 200 150, convnet_bn
    python bench/eval_path.py --model vgg11_bn --data synthetic --points 21 --repeats 1 --epochs 1
    python bench/eval_path.py --model preresnet20 --data synthetic --width 0.5 --chunks 4
    python bench/eval_path.py --device cuda --json eval_mlp.json
    python bench/eval_path.py --suite --json eval_suite.json       # every model kind, one table (issue 28)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from modeconn import data as D  # noqa: E402
from modeconn import models  # noqa: E402
from modeconn.params.batchnorm import has_batchnorm  # noqa: E402
from modeconn.evaluation.evaluate import evaluate_path, grid  # noqa: E402
from modeconn.io.heap import keep_freed_memory  # noqa: E402
from modeconn.paths import linear  # noqa: E402
from modeconn.training.train import TrainConfig, train  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp", choices=MODELS)
    p.add_argument("--data", default="digits", choices=["digits", "synthetic"])
    p.add_argument("--points", type=int, default=61, help="grid points along the path")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (after one warm-up run)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--epochs", type=int, default=3, help="endpoint training epochs (kept small)")
    p.add_argument("--no-train", action="store_true", help="use the random initialisations as endpoints")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256], help="MLP hidden widths")
    p.add_argument("--dropout", type=float, default=0.5, help="MLP dropout (off during evaluation)")
    p.add_argument("--width", type=float, default=None,
                   help="channel width multiplier (default: 1/8 for VGGs, 1 for PreResNet)")
    p.add_argument("--input-shape", type=int, nargs="+", default=None,
                   help="synthetic input shape (default: 3 32 32 for conv models, 64 for the MLP)")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic classes")
    p.add_argument("--num-train", type=int, default=None, help="synthetic train size (default 2048 CPU, 10000 GPU)")
    p.add_argument("--num-test", type=int, default=None, help="synthetic test size (default 512 CPU, 2000 GPU)")
    p.add_argument("--batch-size", type=int, default=2048, help="evaluate_path batch_size (conf/eval default)")
    p.add_argument("--bn-items", type=int, default=2048, help="training inputs for BatchNorm statistics")
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="also time batched=True with these point chunks")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--heap", action="store_true",
                   help="call modeconn.io.heap.keep_freed_memory() first, as the CLI does (default: a plain process)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--suite", action="store_true",
                   help="run SUITE (every model kind against the loop, each in a fresh process) and print one table")
    p.add_argument("--processes", type=int, default=1,
                   help="fresh processes per method (their timed runs pooled; the spread shows the C heap's regimes)")
    p.add_argument("--same-process", action="store_true",
                   help="time the methods interleaved in this one process (default: each in a fresh process)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one method, in the child process
    return p.parse_args(argv)


# Issue 28's table: every model kind against the user's loop (each entry: extra command-line arguments)
SUITE = {
    "MLP 64-65-33-49-10": ["--model", "mlp", "--hidden", "65", "33", "49", "--no-train"],
    "default MLP 2x256": ["--model", "mlp", "--no-train"],
    "MLP + BatchNorm1d (200, 150)": ["--model", "mlp_bn", "--hidden", "200", "150", "--no-train"],
    "conv net (Kuditipudi et al.)": ["--model", "convnet", "--no-train"],
    "small conv net + BatchNorm2d": ["--model", "convnet_bn", "--no-train"],
    "VGG-11-BN (1/8 width), 3x32x32": ["--model", "vgg11_bn", "--data", "synthetic", "--points", "21", "--no-train"],
    "PreResNet-20, 3x32x32": ["--model", "preresnet20", "--data", "synthetic", "--points", "11",
                              "--num-train", "1024", "--num-test", "256", "--repeats", "2", "--no-train"],
}


def suite(argv: list[str]) -> list[dict]:
    """Every entry of :data:`SUITE` (with ``argv``'s other options, e.g. ``--threads``), then one table.

    Each entry runs in a fresh Python process, as a user's script would: in one long process the earlier
    models leave the allocator's state behind (glibc raises its mmap threshold after large frees), which
    made the user's loop over a conv net 1.8x faster than in a fresh process and the comparison depend on
    the order of the entries.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, extra) in enumerate(SUITE.items()):
            print(f"\n== {label}", flush=True)
            out = Path(tmp) / f"{k}.json"
            subprocess.run([sys.executable, __file__, *extra, *argv, "--json", str(out)], check=True)
            rows.append({"label": label, **json.loads(out.read_text())})
    print("\n| model | points | loop s | one at a time / loop | batched / loop |\n|---|---|---|---|---|")
    for r in rows:
        m = r["methods"]
        print(f"| {r['label']} | {r['points']} | {m['loop']['median_s']:.3f} | "
              f"{m['one_at_a_time']['speedup_vs_loop']:.2f}x | **{m['batched']['speedup_vs_loop']:.2f}x** |")
    return rows


MODELS = ["mlp", "mlp_bn", "convnet", "convnet_bn", "vgg11", "vgg11_bn", "vgg16_bn", "preresnet20"]


def load_data(args, dev: torch.device) -> D.Dataset:
    conv = not args.model.startswith("mlp")
    if args.data == "digits":
        return D.load("digits", device=dev, image=conv)
    shape = tuple(args.input_shape) if args.input_shape else ((3, 32, 32) if conv else (64,))
    gpu = dev.type == "cuda"
    return D.load("synthetic", device=dev, input_shape=shape, num_classes=args.num_classes,
                  num_train=args.num_train or (10000 if gpu else 2048), num_test=args.num_test or (2000 if gpu else 512))


def build(args, ds: D.Dataset) -> torch.nn.Module:
    if args.model.startswith("mlp"):
        kw = {"hidden": tuple(args.hidden), "dropout": args.dropout, "batch_norm": args.model == "mlp_bn"}
        return models.build("mlp", ds.input_shape, ds.num_classes, **kw)
    if args.model == "convnet_bn":  # a small conv net with BatchNorm2d, written here (no such zoo model)
        c, h, w = ds.input_shape
        return torch.nn.Sequential(torch.nn.Conv2d(c, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                   torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.nn.BatchNorm2d(32),
                                   torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * ((h + 1) // 2) * ((w + 1) // 2), ds.num_classes))
    kw = {}
    if args.model.startswith(("vgg", "preresnet")):
        kw["width"] = args.width if args.width is not None else (0.125 if args.model.startswith("vgg") else 1.0)
    return models.build(args.model, ds.input_shape, ds.num_classes, **kw)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def loop_baseline(model: torch.nn.Module, path, ts: list[float], splits: dict, bn_items: int) -> dict:
    """The ten-line loop a user writes without modeconn: load each point, recompute BatchNorm statistics
    (reset, momentum=None, train-mode forwards over the first ``bn_items`` training inputs in modeconn's
    batches of 512, dropout off), then one eval-mode forward per split."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    bn_inputs, out = splits["train"][0][:bn_items], {f"{s}_{m}": [] for s in splits for m in ("loss", "error")}
    for t in ts:
        model.load_state_dict(path.state_dict(t))
        if norms:
            for m in norms:
                m.reset_running_stats(); m.momentum = None; m.train()
            for xb in bn_inputs.split(512):
                model(xb)
            model.eval()
        for split, (x, y) in splits.items():
            logits = model(x)
            out[f"{split}_loss"].append(F.cross_entropy(logits, y).item())
            out[f"{split}_error"].append((logits.argmax(1) != y).float().mean().item())
    return out


def timed(fns: dict, repeats: int, dev: torch.device) -> tuple[dict, dict, dict]:
    """Wall-clock and process CPU seconds of every method, interleaved (one run of each per round, after a
    warm-up round), and each method's last result."""
    seconds, cpu, out = {k: [] for k in fns}, {k: [] for k in fns}, {}
    for k, fn in fns.items():
        fn()  # warm-up
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            sync(dev)
            started, started_cpu = time.perf_counter(), time.process_time()
            out[k] = fn()
            sync(dev)
            seconds[k].append(time.perf_counter() - started)
            cpu[k].append(time.process_time() - started_cpu)
    return seconds, cpu, out


def isolated(keys: list[str], argv: list[str] | None, processes: int = 1) -> tuple[dict, dict, dict]:
    """Every method timed in ``processes`` fresh Python processes of its own (this script with ``--only``, the
    same options; the methods take turns): its seconds (all runs pooled), CPU seconds and last result by method."""
    seconds, cpu, out = {k: [] for k in keys}, {k: [] for k in keys}, {}
    rest = list(sys.argv[1:] if argv is None else argv)
    if "--json" in rest:
        i = rest.index("--json")
        rest = rest[:i] + rest[i + 2:]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(max(1, processes)):
            for key in keys:
                file = Path(tmp) / f"{key}.json"
                subprocess.run([sys.executable, __file__, *rest, "--only", key, "--json", str(file)], check=True)
                got = json.loads(file.read_text())
                seconds[key] += got["seconds"]
                cpu[key] += got["cpu_seconds"]
                out[key] = got["metrics"]
    return seconds, cpu, out


def max_diff(a: dict, b: dict, key: str) -> float:
    return max(abs(x - y) for x, y in zip(a[key], b[key]))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    heap = keep_freed_memory() if args.heap else False
    dev = D.resolve_device(args.device)
    ds = load_data(args, dev)
    n_params = sum(p.numel() for p in build(args, ds).parameters())
    if args.only is None:
        print(f"{D.describe(ds)}; model {args.model} ({n_params:,} parameters); device {dev}; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; malloc thresholds raised: {heap}; "
              + ("methods interleaved in this process" if args.same_process else "each method in a fresh process"))

    ends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build(args, ds).to(dev)
        if not args.no_train and (args.same_process or args.only is not None):  # an isolated run's parent
            cfg = TrainConfig(epochs=args.epochs, lr=0.05, weight_decay=1e-4, batch_size=64, schedule="cosine",
                              device=str(dev))
            m = train(net, ds, cfg, seed=seed, progress=False)
            if args.only is None:
                print(f"endpoint seed {seed}: {args.epochs} epochs, train loss {m['train_loss']:.4f}, "
                      f"test acc {m['test_acc']:.4f}")
        ends.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    path = linear(ends[0], ends[1])  # the endpoints live on dev
    model = build(args, ds).to(dev).eval()
    ts = grid(args.points)
    splits = {"train": (ds.x_train, ds.y_train), "test": (ds.x_test, ds.y_test)}

    def run_loop():
        return loop_baseline(model, path, ts, splits, args.bn_items)

    def run_eval(batched: bool, chunk: int | None = None):
        return lambda: evaluate_path(model, path, ds, ts=ts, batch_size=args.batch_size, batched=batched,
                                     point_chunk=chunk, bn_items=args.bn_items, device=dev, progress=False).metrics

    methods = [("loop (the user's ten lines)", "loop", run_loop),
               ("evaluate_path(batched=False)", "one_at_a_time", run_eval(False)),
               ("evaluate_path(batched=True)", "batched", run_eval(True))]
    methods += [(f"evaluate_path(point_chunk={c})", f"chunk_{c}", run_eval(True, c)) for c in args.chunks]
    results: dict = {"model": args.model, "data": args.data, "parameters": n_params, "points": len(ts),
                     "train_items": ds.num_train, "test_items": ds.num_test, "device": str(dev),
                     "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
                     "trained_epochs": 0 if args.no_train else args.epochs, "batchnorm": has_batchnorm(model),
                     "bn_items": args.bn_items, "malloc_thresholds_raised": heap,
                     "processes": "one" if args.same_process else f"{args.processes} per method", "methods": {}}
    if args.only is not None:  # the child of an isolated run: time this one method, hand back its numbers
        fns = {key: fn for _, key, fn in methods if key == args.only}
        seconds, cpu, out = timed(fns, args.repeats, dev)
        child = {"seconds": seconds[args.only], "cpu_seconds": cpu[args.only], "metrics": out[args.only]}
        Path(args.json).write_text(json.dumps(child) + "\n")
        return child
    if args.same_process:
        all_seconds, all_cpu, metrics = timed({key: fn for _, key, fn in methods}, args.repeats, dev)
    else:
        all_seconds, all_cpu, metrics = isolated([key for _, key, _ in methods], argv, args.processes)
    for label, key, fn in methods:
        seconds, cpu = all_seconds[key], all_cpu[key]
        results["methods"][key] = {"label": label, "seconds": seconds, "median_s": statistics.median(seconds),
                                   "best_s": min(seconds), "cpu_seconds": cpu, "median_cpu_s": statistics.median(cpu)}
    base = results["methods"]["loop"]
    for key, r in results["methods"].items():
        r["speedup_vs_loop"] = base["median_s"] / r["median_s"]
        r["cpu_speedup_vs_loop"] = base["median_cpu_s"] / r["median_cpu_s"]
    diffs = {}
    for other in ("loop", "one_at_a_time"):
        diffs[f"batched_vs_{other}"] = {k: max_diff(metrics["batched"], metrics[other], k) for k in metrics["batched"]}
    for c in args.chunks:
        diffs[f"chunk_{c}_vs_one_at_a_time"] = {k: max_diff(metrics[f"chunk_{c}"], metrics["one_at_a_time"], k)
                                                 for k in metrics["batched"]}
    results["max_abs_diff"] = diffs
    results["max_train_loss"] = max(metrics["batched"]["train_loss"])

    print(f"{len(ts)} points, train {ds.num_train} + test {ds.num_test} items, median (best) of {args.repeats} runs")
    print(f"{'method':38s} {'median s':>9s} {'best s':>8s} {'speed-up':>9s} {'CPU s':>8s} {'CPU speed-up':>12s}")
    for key, r in results["methods"].items():
        print(f"{r['label']:38s} {r['median_s']:9.3f} {r['best_s']:8.3f} {r['speedup_vs_loop']:8.2f}x "
              f"{r['median_cpu_s']:8.3f} {r['cpu_speedup_vs_loop']:11.2f}x")
    if args.processes > 1 and not args.same_process:
        for key, r in results["methods"].items():
            print(f"{r['label']:38s} runs: " + ", ".join(f"{v:.3g}" for v in sorted(r["seconds"])))
    for name, d in diffs.items():
        print(f"max |diff| {name:26s} train loss {d['train_loss']:.2e}  test loss {d['test_loss']:.2e}  "
              f"train error {d['train_error']:.2e}  test error {d['test_error']:.2e}")
    worst = max(max(d["train_loss"], d["test_loss"]) for name, d in diffs.items() if name.endswith("one_at_a_time"))
    results["equal_to_reference"] = worst <= 1e-5
    print(f"speed-up batched / loop: {results['methods']['batched']['speedup_vs_loop']:.2f}x  "
          f"(batched / one-at-a-time: {results['methods']['one_at_a_time']['median_s'] / results['methods']['batched']['median_s']:.2f}x); "
          f"losses equal to the one-at-a-time reference within 1e-5: {results['equal_to_reference']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    if "--suite" in sys.argv[1:]:
        rest = [a for a in sys.argv[1:] if a != "--suite"]
        if "--json" in rest:
            i = rest.index("--json")
            out, rest = rest[i + 1], rest[:i] + rest[i + 2:]
            Path(out).write_text(json.dumps(suite(rest), indent=2) + "\n")
        else:
            suite(rest)
    else:
        main()
