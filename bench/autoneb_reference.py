"""Benchmark: Draxler et al.'s reference AutoNEB code against ``modeconn.paths.autoneb`` on the same endpoints.

The reference (https://github.com/fdraxler/PyTorch-AutoNEB, a checkout given by ``--reference``) is imported
as a library and run unchanged apart from three shims that let it run here: ``collections.Iterable`` (removed
in Python 3.10) aliased to ``collections.abc.Iterable``; its DataLoaders without worker processes or pinned
memory (CPU only); its progress bar replaced by a silent timer of the "NEB" loop. The modeconn endpoints of
``bench/autoneb_compare.py`` (``--work``: run that first) enter the reference as a ``CompareModel`` of the
net's log-softmax and ``NLLLoss`` over ``TensorDataset``s of the digits splits.

* ``barriers``: both run the compact schedule of ``bench/autoneb_compare.py`` (``equal(3)``, then four
  ``highest(2)`` cycles at lr 0.1, 0.1, 0.1, 0.01, 0.001, SGD momentum 0.9, N iterations each, batch 128,
  weight decay 1e-4, string method) on ``--pairs`` pairs x ``--seeds`` seeds; modeconn also with the
  reference's tangent. One scorer for all: ``evaluate_path`` on the train split at every pivot and 9
  sub-points a segment, the epsilon barrier of the train loss.
* ``timing``: seconds per iteration of one ``equal(P - 2)`` cycle of ``--k`` iterations at P pivots, the two
  alternating over ``--rounds`` rounds after a warm-up round (the reference's dense analysis after the loop
  is switched off; only the loop is timed, in both).

    python bench/autoneb_compare.py --work /tmp/ac --pairs 4 --budgets 10          # the endpoints
    git clone https://github.com/fdraxler/PyTorch-AutoNEB /tmp/ref-autoneb           # on a machine with network
    python bench/autoneb_reference.py timing --reference /tmp/ref-autoneb --work /tmp/ac --threads 2
    python bench/autoneb_reference.py barriers --reference /tmp/ref-autoneb --work /tmp/ac --models mlp convnet
"""
from __future__ import annotations

import argparse
import collections
import collections.abc
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from modeconn import data as D  # noqa: E402
from modeconn import models  # noqa: E402
from modeconn.evaluation.evaluate import evaluate_path  # noqa: E402
from modeconn.io.checkpoint import load_checkpoint  # noqa: E402
from modeconn.io.runrecord import provenance  # noqa: E402
from modeconn.params.path import PiecewiseLinearPath  # noqa: E402

AUTONEB = importlib.import_module("modeconn.paths.autoneb")  # the module; modeconn.paths.autoneb is the function
BUILD = {"mlp": {"hidden": [256, 256], "dropout": 0.5}, "convnet": {"width": 32, "depth": 3, "bias": False}}
LRS = (0.1, 0.1, 0.1, 0.01, 0.001)
REF_LOOP_S: list[float] = []  # seconds of each of the reference's NEB loops
MC_LOOP_S: list[float] = []  # seconds of each of modeconn's iteration loops


def import_reference(root: str):
    """Import the reference from ``root`` with the three shims; returns its package."""
    if not (Path(root) / "torch_autoneb").is_dir():
        sys.exit(f"--reference {root}: no torch_autoneb/ there (clone https://github.com/fdraxler/PyTorch-AutoNEB)")
    collections.Iterable = collections.abc.Iterable
    sys.path.insert(0, root)
    ta = importlib.import_module("torch_autoneb")
    helpers = importlib.import_module("torch_autoneb.helpers")
    ta_models = importlib.import_module("torch_autoneb.models")
    original_loader = ta_models.ensure_data_loader

    def loader(provider, batch_size, **kw):
        kw.update({k: v for k, v in (("num_workers", 0), ("pin_memory", False)) if k in kw})
        return original_loader(provider, batch_size, **kw)

    class TimedLoop:
        def __init__(self, iterable):
            self.iterable = iterable

        def __iter__(self):
            start = time.perf_counter()
            yield from self.iterable
            REF_LOOP_S.append(time.perf_counter() - start)

    class Silent:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=None):
            pass

    def pbar(iterable=None, desc=None, *a, **k):
        if desc == "NEB":
            return TimedLoop(iterable)
        return iterable if iterable is not None else Silent()

    ta_models.ensure_data_loader = loader
    helpers.pbar = pbar
    original_iterations = AUTONEB._run_iterations

    def timed_iterations(*a, **k):
        start = time.perf_counter()
        out = original_iterations(*a, **k)
        MC_LOOP_S.append(time.perf_counter() - start)
        return out

    AUTONEB._run_iterations = timed_iterations
    return ta


class LogProb(nn.Module):
    """The net's log-probabilities: the reference's ``CompareModel`` takes a loss of them (``NLLLoss``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return F.log_softmax(self.net(x), 1)


def setup(name: str, work: str, pair: int):
    ds = D.load("digits", image=name == "convnet")
    net = models.build(name, ds.input_shape, ds.num_classes, **BUILD[name])
    files = [Path(work) / "endpoints" / f"{name}-e20-seed{s}.pt" for s in (2 * pair, 2 * pair + 1)]
    for f in files:
        if not f.exists():
            sys.exit(f"{f}: not there; run bench/autoneb_compare.py --work {work} first")
    return ds, net, [load_checkpoint(f, model=net)[0] for f in files]


def flat(net: nn.Module, state: dict) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1).float() for n, _ in net.named_parameters()])


def unflat(net: nn.Module, rows: torch.Tensor) -> list[dict]:
    named = list(net.named_parameters())
    return [{n: v.view(p.shape).clone() for (n, p), v in zip(named, row.split([p.numel() for _, p in named]))}
            for row in rows]


def score(net: nn.Module, pivots: torch.Tensor, ds: D.Dataset) -> dict:
    """The one scorer: evaluate_path on the train split at every pivot and 9 sub-points a segment."""
    n = len(pivots) - 1
    ts = [(j + k / 10) / n for j in range(n) for k in range(10)] + [1.0]
    r = evaluate_path(net, PiecewiseLinearPath(unflat(net, pivots), knots="uniform"), (ds.x_train, ds.y_train),
                      ts=ts, progress=False)
    return {"epsilon": r.barriers["train_loss"]["epsilon"], "max": r.barriers["train_loss"]["max"]}


def run_reference(ta, net, states, ds, its, lrs, inserts, batch, wd, seed):
    from networkx import MultiGraph
    from torch.utils.data import TensorDataset

    ta_models = importlib.import_module("torch_autoneb.models")
    config = importlib.import_module("torch_autoneb.config")
    cycles = [{"insert": inserts[0], "subsample_pivot_count": 9, "spring_constant": "inf", "weight_decay": wd,
               "optim": {"nsteps": its[0], "algorithm": {"name": "SGD", "lr": lrs[0], "momentum": 0.9},
                         "eval": {"batch_size": batch}}}]
    cycles += [{"insert": i, "optim": {"nsteps": n, "algorithm": {"lr": lr}}} for n, lr, i in zip(its[1:], lrs[1:], inserts[1:])]
    torch.manual_seed(seed)
    splits = {"train": TensorDataset(ds.x_train, ds.y_train), "test": TensorDataset(ds.x_test, ds.y_test)}
    model = ta_models.ModelWrapper(ta_models.DataModel(ta_models.CompareModel(LogProb(net), nn.NLLLoss()), splits))
    graph = MultiGraph()
    graph.add_node(0, coords=flat(net, states[0]))
    graph.add_node(1, coords=flat(net, states[1]))
    REF_LOOP_S.clear()
    start = time.perf_counter()
    ta.auto_neb(0, 1, graph, model, config.AutoNEBConfig.from_list(cycles))
    total = time.perf_counter() - start
    edges = graph[0][1]
    return edges[max(edges)]["path_coords"], list(REF_LOOP_S), [edges[c]["path_coords"].shape[0] for c in sorted(edges)], total


def run_modeconn(net, states, ds, its, lrs, inserts, batch, wd, seed, tangent="improved"):
    cycles = [{"insert": i, "iterations": n, "lr": lr, "optimizer": "sgd", "momentum": 0.9}
              for n, lr, i in zip(its, lrs, inserts)]
    MC_LOOP_S.clear()
    start = time.perf_counter()
    path = AUTONEB.autoneb(net, states[0], states[1], ds, cycles=cycles, batch_size=batch, weight_decay=wd,
                           spring=None, tangent=tangent, seed=seed, progress=False, device="cpu")
    total = time.perf_counter() - start
    pivots = torch.stack([flat(net, w) for w in path.waypoints])
    return pivots, list(MC_LOOP_S), [h["pivots"] for h in path.info["history"]], total


def barriers(ta, args) -> list[dict]:
    rows = []
    ref_inserts = [{"name": "equal", "count": 3}] + [{"name": "highest", "count": 2, "key": "dense_train_loss"}] * 4
    mc_inserts = ["equal(3)"] + ["highest(2)"] * 4
    for name in args.models:
        for pair in range(args.pairs):
            ds, net, states = setup(name, args.work, pair)
            for n in args.budgets:
                its = [n] * 5
                for seed in range(args.seeds):
                    row = {"model": name, "pair": pair, "n": n, "seed": seed}
                    for who in ("reference", "modeconn", "modeconn-reftangent"):
                        if who == "reference":
                            out = run_reference(ta, net, states, ds, its, LRS, ref_inserts, args.batch, args.wd, seed)
                        else:
                            tangent = "reference" if who.endswith("reftangent") else "improved"
                            out = run_modeconn(net, states, ds, its, LRS, mc_inserts, args.batch, args.wd, seed, tangent)
                        pivots, loops, counts, total = out
                        row[who] = {**score(net, pivots, ds), "pivots": counts, "loop_s": loops,
                                    "s_per_it": [t / i for t, i in zip(loops, its)], "total_s": total}
                    rows.append(row)
                    print(f"{name} pair {pair} N={n} seed {seed}: barrier reference {row['reference']['epsilon']:.4f}, "
                          f"modeconn {row['modeconn']['epsilon']:.4f}, modeconn with the reference's tangent "
                          f"{row['modeconn-reftangent']['epsilon']:.4f}; pivots {row['reference']['pivots']} / "
                          f"{row['modeconn']['pivots']}", flush=True)
    for name in args.models:
        for n in args.budgets:
            sel = [r for r in rows if r["model"] == name and r["n"] == n]
            cells = []
            for who in ("reference", "modeconn", "modeconn-reftangent"):
                v = [r[who]["epsilon"] for r in sel]
                cells.append(f"{who} {statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}")
            print(f"{name} N={n} ({len(sel)} runs): " + ", ".join(cells))
    return rows


def timing(ta, args) -> list[dict]:
    out = []
    neb_model = importlib.import_module("torch_autoneb.neb_model")
    neb_model.NEB.analyse = lambda self, sub=9: {}  # its dense analysis after the loop is not timed: skip it
    for name in args.models:
        ds, net, states = setup(name, args.work, 0)
        for p in args.pivots:
            times = {"reference": [], "modeconn": []}
            for r in range(args.rounds + 1):
                _, loops, counts, _ = run_reference(ta, net, states, ds, [args.k], [0.01],
                                                    [{"name": "equal", "count": p - 2}], args.batch, args.wd, r)
                assert counts == [p], counts
                ref = loops[0] / args.k
                _, loops, counts, _ = run_modeconn(net, states, ds, [args.k], [0.01], [f"equal({p - 2})"],
                                                   args.batch, args.wd, r)
                assert counts == [p], counts
                if r > 0:  # round 0 warms up
                    times["reference"].append(ref)
                    times["modeconn"].append(loops[0] / args.k)
            ratios = [a / b for a, b in zip(times["reference"], times["modeconn"])]
            row = {"model": name, "pivots": p, "k": args.k, **times, "ratio_median": statistics.median(ratios),
                   "reference_median_s": statistics.median(times["reference"]),
                   "modeconn_median_s": statistics.median(times["modeconn"])}
            out.append(row)
            print(f"{name} {p} pivots: reference {row['reference_median_s']:.4f} s/it, modeconn "
                  f"{row['modeconn_median_s']:.4f} s/it, reference / modeconn {row['ratio_median']:.2f}x "
                  f"(rounds {[round(x, 2) for x in ratios]})", flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["barriers", "timing"])
    p.add_argument("--reference", required=True, help="a checkout of fdraxler/PyTorch-AutoNEB")
    p.add_argument("--work", required=True, help="bench/autoneb_compare.py's --work (its endpoints)")
    p.add_argument("--models", nargs="+", default=["mlp"], choices=sorted(BUILD))
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--budgets", nargs="+", type=int, default=[10], help="N, iterations per cycle (barriers)")
    p.add_argument("--pivots", nargs="+", type=int, default=[5, 9, 17, 31], help="pivot counts (timing)")
    p.add_argument("--k", type=int, default=40, help="iterations per timed cycle (timing)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ta = import_reference(args.reference)
    print(provenance(torch.device("cpu")), flush=True)
    rows = barriers(ta, args) if args.what == "barriers" else timing(ta, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"provenance": provenance(torch.device("cpu")), "args": vars(args),
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
