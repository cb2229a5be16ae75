"""Benchmark: barriers between independently trained modern nets, naive and aligned lines, REPAIR, Bezier, AutoNEB.

For every model of ``--models`` (torchvision's mobilenet_v2 at width 0.35, efficientnet_b0 and resnet18, a small
torchvision ViT, timm's convnext_atto when timm is installed, and a GPT-style decoder on characters) it trains
``2 x --pairs`` endpoints (pair i: seeds 2i and 2i + 1, initialisation and data order from the seed) with
``modeconn.training.train.train`` and connects each pair six ways:

* ``naive line``: ``paths.linear(theta_a, theta_b)``;
* ``weights``: the line to B after ``align.weight_matching`` (Git Re-Basin on the inferred unit spec);
* ``activations``: the line to B after ``align.activation_matching`` (on all the training items used);
* ``weights+REPAIR``: ``align.repair`` on the weight-aligned line (skipped, with a notice, where every REPAIR
  site is a BatchNorm: ``modeconn.align.repair.only_batchnorm``; the evaluator already renormalises there);
* ``bezier``: ``paths.fit_curve`` between the unaligned endpoints with the library's defaults (quadratic
  Bezier, 3 bends, lr 0.15, golden / bends-weighted t) for ``--curve-epochs``;
* ``autoneb``: ``paths.autoneb`` between the unaligned endpoints on the short schedule ``AUTONEB_CYCLES``
  (3 cycles, at most 4 pivots) with its iterations multiplied by ``--autoneb-scale``, batches of
  ``--autoneb-batch``, dense checks on the first ``--autoneb-items`` training items.

Each path is scored by ``evaluate_path`` on the training items at ``--num-points`` uniform t: the max-endpoint
(epsilon) barrier of the train loss, max_t L(t) - max(L(0), L(1)). It prints the endpoints' train loss and
train / test accuracy and one Markdown row per model and constructor: the barrier's mean ± std over pairs and
the mean wall seconds to build (alignment, REPAIR's statistics, curve or NEB training) and to evaluate a path.

Data: digits (bench/fit_curve.py's ``digits_3x32``: 8x8 upsampled bilinearly to 32x32, repeated over 3
channels) or, with ``--data cifar10`` (for a GPU), torchvision's CIFAR-10 from ``--data-root`` (``--download``
to fetch it); the first ``--max-items`` training images (0: all), the whole test split. The GPT reads a
character corpus that ships with Python: the text of ``pydoc_data.topics`` (Python's ``help()`` topics), the
topics in sorted order, lowercased; example i is characters [i, i + 16) and its label character i + 16:
``CORPUS`` = 2048 training windows, then 512 test windows from the text after them. The GPT is
tests/test_units_modern.py's (tied embeddings, ``logits = h @ tok.weight.T``), read at the last position
(:class:`NextChar`).

``--work DIR`` keeps the trained endpoints (``train``'s atomic checkpoints, checked against their settings)
and every scored row (``rows.json``, written atomically), so a rerun only does what is missing.

    nice -n 19 .venv/bin/python bench/modern_nets.py --threads 1 --work /tmp/modern --json modern.json
    .venv/bin/python bench/modern_nets.py --data cifar10 --data-root ~/data --device cuda --max-items 0 \
        --endpoint-epochs 30 --curve-epochs 20 --autoneb-scale 0.25 --num-points 21
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from modeconn import align, models, paths  # noqa: E402
from modeconn import data as D  # noqa: E402
from modeconn.align.repair import only_batchnorm  # noqa: E402
from modeconn.evaluation.evaluate import evaluate_path  # noqa: E402
from modeconn.io.checkpoint import atomic_write_json, read_meta  # noqa: E402
from modeconn.io.heap import keep_freed_memory  # noqa: E402
from modeconn.io.jsonfile import read_json  # noqa: E402
from modeconn.training.train import TrainConfig, train  # noqa: E402

SGD = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "schedule": "cosine"}
ADAM = {"optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "batch_size": 64, "schedule": "cosine"}


@dataclasses.dataclass(frozen=True)
class Net:
    """A benchmarked model: its modeconn model node (``_target_`` and keyword arguments), how its endpoints
    are trained (``TrainConfig`` fields, ``epochs`` the default budget) and whether it reads the corpus."""

    options: dict
    trainer: dict
    text: bool = False


VIT = {"_target_": "torchvision.models.VisionTransformer", "image_size": 32, "patch_size": 4, "num_layers": 2,
       "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}
GPT = {"d": 64, "heads": 4, "depth": 2, "context": 16}
# Endpoint budgets chosen on 256 digits (seed 0, 1 CPU thread): every model ends at train accuracy >= 0.99
# (efficientnet_b0 with SGD at lr 0.05 stopped at 0.56 after 20 epochs, hence Adam at batch 32).
NETS = {
    "mobilenet_v2": Net({"_target_": "torchvision.models.mobilenet_v2", "width_mult": 0.35}, {**SGD, "epochs": 30}),
    "efficientnet_b0": Net({"_target_": "torchvision.models.efficientnet_b0"},
                           {**ADAM, "batch_size": 32, "epochs": 20}),
    "resnet18": Net({"_target_": "torchvision.models.resnet18"}, {**SGD, "epochs": 20}),
    "vit": Net(VIT, {**ADAM, "epochs": 60}),
    "convnext_atto": Net({"_target_": "timm.create_model", "model_name": "convnext_atto"}, {**SGD, "epochs": 20}),
    "gpt": Net({"_target_": "NextChar", **GPT}, {**ADAM, "lr": 3e-3, "epochs": 30}, text=True),
}
CORPUS = (2048, 512)  # the GPT's train and test windows
# AutoNEB's short schedule (each cycle a diff on the previous one; iterations times --autoneb-scale): one
# pivot in the middle, one more where the chain rises most, a last cycle at a tenth of the lr (<= 4 pivots).
AUTONEB_CYCLES = ({"insert": "equal(1)", "iterations": 1000, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9},
                  {"insert": "highest(1)"},
                  {"insert": "leave", "lr": 0.01})
CONSTRUCTORS = ("naive line", "weights", "activations", "weights+REPAIR", "bezier", "autoneb")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--pairs", type=int, default=4, help="independent endpoint pairs (seeds 2i, 2i + 1)")
    p.add_argument("--data", default="digits", choices=["digits", "cifar10"], help="the images (the GPT reads text)")
    p.add_argument("--data-root", default=None, help="--data cifar10: torchvision's folder")
    p.add_argument("--download", action="store_true", help="--data cifar10: download it into --data-root")
    p.add_argument("--endpoint-epochs", type=int, default=None, help="every model's budget (default: per model)")
    p.add_argument("--curve-epochs", type=int, default=40, help="Bezier curve training epochs")
    p.add_argument("--autoneb-scale", type=float, default=0.02, help="multiplies AUTONEB_CYCLES' iterations")
    p.add_argument("--autoneb-batch", type=int, default=64, help="AutoNEB's batch size")
    p.add_argument("--autoneb-items", type=int, default=128, help="training items of AutoNEB's dense checks")
    p.add_argument("--num-points", type=int, default=11, help="uniform t at which each path is scored")
    p.add_argument("--max-items", type=int, default=256,
                   help="first N training images, used throughout (0: all; the corpus is CORPUS windows)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--work", default=None, help="cache folder: endpoint checkpoints and scored rows")
    p.add_argument("--json", default=None, help="write settings, endpoints, rows and the summary here")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.num_points < 2 or args.max_items < 0:
        p.error("--pairs must be >= 1, --num-points >= 2 and --max-items >= 0")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- data
def first_items(ds: D.Dataset, n: int) -> D.Dataset:
    """``ds`` with only its first ``n`` training items (0: all)."""
    return ds if not n else dataclasses.replace(ds, x_train=ds.x_train[:n], y_train=ds.y_train[:n])


def images(args, device: torch.device) -> D.Dataset:
    """Digits upsampled to 3x32x32 (bench/fit_curve.py's helper) or CIFAR-10 (a clear error when absent)."""
    if args.data == "digits":
        sys.path.insert(0, str(BENCH))
        from fit_curve import digits_3x32  # the one upsampling helper; it lives in that bench script

        return digits_3x32(device)
    try:
        return D.load("cifar10", root=args.data_root, download=args.download, device=device)
    except D.DatasetNotFoundError as err:
        raise SystemExit(f"--data cifar10: {err} (this script: --data-root DIR, --download)") from None


def corpus(context: int, num_train: int, num_test: int, device: torch.device) -> D.Dataset:
    """Next-character prediction on ``pydoc_data.topics`` (stdlib): the topics in sorted order, lowercased;
    windows of ``context`` characters at stride 1 labelled by the following one, test windows after the train text."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics)).lower()[: num_train + num_test + 2 * context]
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    x, y = ids.unfold(0, context, 1)[:-1], ids[context:]
    start = num_train + context  # the test windows share no character with a training window
    ds = D.Dataset("pydoc_topics_chars", x[:num_train], y[:num_train], x[start:start + num_test],
                   y[start:start + num_test], len(vocab), (context,), info={"vocab": "".join(vocab)})
    return ds.to(device)


# ---------------------------------------------------------------------------------------------- models
class NextChar(nn.Module):
    """tests/test_units_modern.py's GPT-style decoder (causal attention, tied embeddings ``h @ tok.weight.T``)
    read at its last position: the next character's logits, one label per example as modeconn trains."""

    def __init__(self, vocab: int, d: int, heads: int, depth: int, context: int) -> None:
        super().__init__()
        sys.path.insert(0, str(BENCH.parent / "tests"))
        from test_units_modern import GPT as Decoder  # the test suite's model, not a second copy

        self.gpt = Decoder(vocab=vocab, d=d, heads=heads, depth=depth, context=context, tie="matmul")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx)[:, -1]


def build(name: str, ds: D.Dataset) -> nn.Module:
    """A fresh model ``name`` for ``ds`` (``num_classes`` passed explicitly: torchvision's and timm's builders
    take it through ``**kwargs``, where ``models.from_options`` does not fill it in)."""
    opts = dict(NETS[name].options)
    if opts["_target_"] == "NextChar":
        return NextChar(vocab=ds.num_classes, **{k: v for k, v in opts.items() if k != "_target_"})
    return models.from_options({**opts, "num_classes": ds.num_classes}, ds.input_shape, ds.num_classes)


def available(name: str) -> bool:
    """Whether ``name`` can be built here (timm is optional); prints a notice when not."""
    if NETS[name].options["_target_"].startswith("timm."):
        try:
            import timm  # noqa: F401
        except ImportError:
            log(f"{name}: skipped, timm is not installed (pip install timm)")
            return False
    return True


# ---------------------------------------------------------------------------------------------- endpoints
def trainer(name: str, args, device: torch.device) -> TrainConfig:
    cfg = dict(NETS[name].trainer)
    if args.endpoint_epochs:
        cfg["epochs"] = args.endpoint_epochs
    return TrainConfig(**cfg, device=str(device))


def endpoint(name: str, ds: D.Dataset, seed: int, args, device: torch.device) -> tuple[dict, dict]:
    """Train endpoint ``seed`` of ``name`` (or load it from ``--work``); returns its state and metrics."""
    torch.manual_seed(seed)
    model = build(name, ds).to(device)
    cfg = trainer(name, args, device)
    folder = Path(args.work or ".") / "endpoints" / f"{ds.name}-{ds.num_train}" / name
    ckpt = folder / f"seed{seed}.pt" if args.work else None
    identity = {"bench": "modern_nets", "model": json.dumps(NETS[name].options, sort_keys=True),
                "data": ds.name, "train_items": ds.num_train, "device_type": device.type, "torch": torch.__version__}
    started = time.perf_counter()
    metrics = train(model, ds, cfg, seed=seed, checkpoint_path=ckpt, progress=False, identity=identity)
    seconds = time.perf_counter() - started  # the epochs' own seconds when cached: a rerun only loads it
    if ckpt is not None:
        seconds = sum(h["seconds"] for h in read_meta(ckpt)["history"])
    metrics = {**metrics, "seconds": seconds, "seed": seed}
    log(f"{name} seed {seed}: {cfg.epochs} epochs, train loss {metrics['train_loss']:.4f}, train acc "
        f"{metrics['train_acc']:.4f}, test acc {metrics['test_acc']:.4f} ({metrics['seconds']:.1f} s)")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics


# ---------------------------------------------------------------------------------------------- paths
def timed(fn: Callable):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def builders(model: nn.Module, a: dict, b: dict, ds: D.Dataset, args, device: torch.device, seed: int) -> dict:
    """Constructor label -> a function returning ``(path, build seconds, info)``; the aligned lines and
    REPAIR share one weight matching (REPAIR's seconds include it)."""
    n = ds.num_train
    example = ds.x_train[:2]
    matched: dict = {}

    def weights():
        if "wm" not in matched:
            matched["wm"] = timed(lambda: align.weight_matching(model, a, b, example_input=example, seed=seed))
        return matched["wm"]

    def weight_line():
        al, s = weights()
        return paths.linear(a, al.theta), s, {"objective": al.objective[-1], "permuted": al.fraction_permuted}

    def activation_line():
        al, s = timed(lambda: align.activation_matching(model, a, b, ds, max_items=n))
        return paths.linear(a, al.theta), s, {"permuted": al.fraction_permuted}

    def repaired():
        if only_batchnorm(model, example):
            return None, 0.0, {"skipped": "every REPAIR site is a BatchNorm (align.repair.only_batchnorm)"}
        al, s = weights()
        path, r = timed(lambda: align.repair(paths.linear(a, al.theta), model, ds, max_items=n))
        return path, s + r, {}

    def bezier():
        path, s = timed(lambda: paths.fit_curve(model, a, b, ds, epochs=args.curve_epochs, seed=seed,
                                                device=device, progress=False))
        return path, s, {"settings": path.info.get("settings")}

    def neb():
        path, s = timed(lambda: paths.autoneb(model, a, b, ds, cycles=list(AUTONEB_CYCLES), seed=seed,
                                              iterations_scale=args.autoneb_scale, batch_size=args.autoneb_batch,
                                              max_items=min(n, args.autoneb_items), device=device,
                                              progress=False))
        info = path.info
        return path, s, {"pivots": info["pivots"], "iterations": info["iterations"],
                         "saddle_loss": info["saddle"]["loss"]}

    return {"naive line": lambda: (paths.linear(a, b), 0.0, {}), "weights": weight_line,
            "activations": activation_line, "weights+REPAIR": repaired, "bezier": bezier, "autoneb": neb}


def scored(make: Callable, model: nn.Module, ds: D.Dataset, args, device: torch.device) -> dict:
    """Build a path with ``make`` and score it: the train-loss barriers at ``--num-points`` uniform t, the
    seconds to build and to evaluate it. A constructor that fails (a non-finite loss, a refusal) gives a row
    whose ``info["failed"]`` holds the error, so the other rows still run."""
    row = {"epsilon": None, "max": None, "build_s": 0.0, "eval_s": 0.0}
    try:
        path, row["build_s"], row["info"] = make()
        if path is not None:
            ev, row["eval_s"] = timed(lambda: evaluate_path(model, path, ds, num_points=args.num_points,
                                                            device=device, progress=False))
            row.update(epsilon=ev.barriers["train_loss"]["epsilon"], max=ev.barriers["train_loss"]["max"])
    except (RuntimeError, ValueError) as err:
        row["info"] = {"failed": f"{type(err).__name__}: {err}"}
    return row


def not_done(row: dict) -> str:
    info = row["info"]
    return f"skipped: {info['skipped']}" if "skipped" in info else f"failed: {info.get('failed', '?')}"


# ---------------------------------------------------------------------------------------------- cache
def settings_key(name: str, args, ds: D.Dataset) -> str:
    """A digest of everything that determines a row but the pair and the constructor."""
    s = {"model": NETS[name].options, "trainer": NETS[name].trainer, "endpoint_epochs": args.endpoint_epochs,
         "data": ds.name, "items": ds.num_train, "curve_epochs": args.curve_epochs, "autoneb": AUTONEB_CYCLES,
         "autoneb_scale": args.autoneb_scale, "autoneb_batch": args.autoneb_batch,
         "autoneb_items": args.autoneb_items, "points": args.num_points,
         "torch": torch.__version__}
    return hashlib.sha256(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Rows:
    """Scored rows by key, kept in ``--work``/rows.json (rewritten atomically after every row)."""

    def __init__(self, work: str | None) -> None:
        self.file = Path(work) / "rows.json" if work else None
        self.rows = read_json(self.file, "bench rows") if self.file and self.file.exists() else {}

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        self.rows[key] = row
        if self.file:
            atomic_write_json(self.file, self.rows)


def run_pair(name: str, pair: int, ds: D.Dataset, args, device, rows: Rows) -> tuple[list[dict], list[dict]]:
    """Both endpoints of ``pair`` and one scored row per constructor (from the cache where present)."""
    (a, ma), (b, mb) = (endpoint(name, ds, s, args, device) for s in (2 * pair, 2 * pair + 1))
    model = build(name, ds).to(device)
    makers = builders(model, a, b, ds, args, device, seed=pair)
    out, key = [], settings_key(name, args, ds)
    for label in CONSTRUCTORS:
        row = rows.get(f"{name}|{pair}|{label}|{key}")
        if row is None:
            row = {"model": name, "pair": pair, "constructor": label, **scored(makers[label], model, ds, args, device)}
            rows.put(f"{name}|{pair}|{label}|{key}", row)
        eps = f"barrier {row['epsilon']:.4f}" if row["epsilon"] is not None else not_done(row)
        log(f"{name} pair {pair} {label:>14}: {eps} (build {row['build_s']:.1f} s, eval {row['eval_s']:.1f} s)")
        out.append(row)
    return out, [ma, mb]


# ---------------------------------------------------------------------------------------------- report
def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def endpoint_table(ends: dict) -> str:
    lines = ["| model | parameters | epochs | train loss (mean, max) | train acc (min) | test acc (mean ± std) | "
             "training s per endpoint |",
             "|---|---:|---:|---|---|---|---:|"]
    for name, e in ends.items():
        ms = e["metrics"]
        loss, acc, test = [m["train_loss"] for m in ms], [m["train_acc"] for m in ms], [m["test_acc"] for m in ms]
        tm, ts = mean_std(test)
        lines.append(f"| {name} | {e['parameters']:,} | {e['epochs']} | {statistics.mean(loss):.4f}, {max(loss):.4f} "
                     f"| {min(acc):.4f} | {tm:.4f} ± {ts:.4f} | {statistics.mean(m['seconds'] for m in ms):.1f} |")
    return "\n".join(lines)


def barrier_table(rows: list[dict]) -> str:
    lines = ["| model | constructor | epsilon barrier (mean ± std) | pairs | build s | eval s |",
             "|---|---|---|---:|---:|---:|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        for label in CONSTRUCTORS:
            got = [r for r in rows if r["model"] == name and r["constructor"] == label]
            done = [r["epsilon"] for r in got if r["epsilon"] is not None]
            if not done:
                lines.append(f"| {name} | {label} | {not_done(got[0]) if got else '-'} | 0 | - | - |")
                continue
            m, s = mean_std(done)
            b = statistics.mean(r["build_s"] for r in got)
            e = statistics.mean(r["eval_s"] for r in got)
            lines.append(f"| {name} | {label} | {m:.4f} ± {s:.4f} | {len(done)} | {b:.1f} | {e:.1f} |")
    return "\n".join(lines)


def environment(args, device: torch.device) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "argv": sys.argv[1:],
            "settings": {**vars(args), "autoneb_cycles": AUTONEB_CYCLES,
                         "trainers": {n: NETS[n].trainer for n in args.models}}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    device = D.resolve_device(args.device)
    rows, started = Rows(args.work), time.perf_counter()
    names = [n for n in args.models if available(n)]
    if not names:
        raise SystemExit("no model of --models can be built here")
    img = first_items(images(args, device), args.max_items) if any(not NETS[n].text for n in names) else None
    text = corpus(GPT["context"], *CORPUS, device) if "gpt" in names else None
    result = {**environment(args, device), "endpoints": {}, "rows": []}
    for name in names:
        ds = text if NETS[name].text else img
        n_params = sum(p.numel() for p in build(name, ds).parameters())
        log(f"{name}: {n_params:,} parameters; {D.describe(ds)}")
        t0, metrics = time.perf_counter(), []
        for pair in range(args.pairs):
            got, ends = run_pair(name, pair, ds, args, device, rows)
            result["rows"] += got
            metrics += ends
        result["endpoints"][name] = {"parameters": n_params, "epochs": trainer(name, args, device).epochs,
                                     "data": D.describe(ds), "metrics": metrics, "seconds": time.perf_counter() - t0}
        log(f"{name}: done in {time.perf_counter() - t0:.0f} s")
    result["seconds"] = time.perf_counter() - started
    result["work_seconds"] = (sum(m["seconds"] for e in result["endpoints"].values() for m in e["metrics"])
                              + sum(r["build_s"] + r["eval_s"] for r in result["rows"]))
    tables = endpoint_table(result["endpoints"]) + "\n\n" + barrier_table(result["rows"])
    print(f"\ntorch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s); {args.pairs} pairs; "
          f"{args.num_points} points; this run {result['seconds'] / 60:.1f} min; "
          f"work {result['work_seconds'] / 60:.1f} min "
          f"(endpoint epochs + every row's build and evaluation, cached ones included)\n\n{tables}", flush=True)
    result["markdown"] = tables
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
