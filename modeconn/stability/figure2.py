"""Kuditipudi et al. (2019), Figure 2: how dropout stable independently trained nets are, over trials.

Three measurements per trained net ("trial"), each on the same training images (the paper: 4096 of them):

* **left** (:func:`best_subnetworks`): for every kept fraction, ``samples`` dropout subnetworks, each keeping
  exactly ``floor(keep * h)`` units of *every* hidden layer (uniformly, without replacement) with their
  outgoing weights scaled by 1/keep (:func:`modeconn.stability.apply_dropout`); the lowest-loss one is
  reported (its loss and accuracy).
* **centre** (:func:`dropout_segment`): the straight segment from theta to one such subnetwork at
  p = ``segment_p``, drawn again until the subnetwork's accuracy exceeds ``segment_accuracy`` (the paper's
  code does so, keeping the draw; the most accurate of ``segment_tries`` draws otherwise), evaluated at
  ``segment_points`` points by :func:`modeconn.evaluation.evaluate.evaluate_path`.
* **right**: narrow nets (``widths`` units in every hidden layer) trained like the wide ones; their loss
  and accuracy.

:func:`figure2` runs all three for every trial and returns per-trial values with mean and standard
deviation (the paper's error bars); :func:`train_trial_net` trains (or reloads) one net of a trial.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path as FilePath

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from modeconn.io.checkpoint import load_checkpoint
from modeconn.io.jsonfile import Required
from modeconn.data import materialize
from modeconn.evaluation.evaluate import evaluate_path
from modeconn.training.loop import global_rng
from modeconn.models import build, from_options, is_target
from modeconn.paths import linear
from modeconn.stability import apply_dropout
from modeconn.params.state import State
from modeconn.training.train import TrainConfig, evaluate_model, train
from modeconn.units import infer

__all__ = ["Figure2Options", "figure2", "pool_figure2", "RESULT_SHAPE", "best_subnetworks", "dropout_segment",
           "train_trial_net", "mean_std"]

#: (seed, width or None for the configured model) -> (module, trained state dict)
NetTrainer = Callable[[int, "int | None"], tuple[nn.Module, State]]


@dataclass
class Figure2Options:
    """The ``stability.figure2`` config group (defaults: the paper's settings)."""

    trials: int = 5                 # trained nets per panel
    samples: int = 20               # dropout subnetworks per kept fraction (left); the best is reported
    keeps: list[float] = field(default_factory=lambda: [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    segment_p: float = 0.2          # centre: dropout probability of the segment's far end
    segment_points: int = 101
    segment_accuracy: float = 0.98  # centre: redraw the subnetwork until its accuracy exceeds this
    segment_tries: int = 20
    widths: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 8, 10])
    max_items: int | None = 4096    # training images every loss is measured on (first ones)

    @classmethod
    def from_dict(cls, d: Mapping) -> Figure2Options:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown stability.figure2 key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        opts = cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()})
        return opts.validate()

    def validate(self) -> Figure2Options:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"stability.figure2.{key} must be {what}; got {getattr(self, key)!r}")

        for key in ("trials", "samples", "segment_points", "segment_tries"):
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= (2 if key == "segment_points" else 1),
                 key, "an integer >= 2" if key == "segment_points" else "an integer >= 1")
        need(isinstance(self.keeps, list) and all(isinstance(k, (int, float)) and not isinstance(k, bool) and 0 < k <= 1
                                                  for k in self.keeps), "keeps", "a list of fractions in (0, 1]")
        need(isinstance(self.segment_p, (int, float)) and 0 <= self.segment_p < 1, "segment_p", "in [0, 1)")
        need(isinstance(self.segment_accuracy, (int, float)) and 0 <= self.segment_accuracy <= 1,
             "segment_accuracy", "in [0, 1]")
        need(isinstance(self.widths, list) and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                                                   for w in self.widths), "widths", "a list of positive integers")
        need(self.max_items is None or (isinstance(self.max_items, int) and self.max_items >= 1), "max_items",
             "null or a positive integer")
        return self


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, as error bars over trials."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std())


def _kept_counts(spec, keep: float) -> dict[str, int]:
    return {g.name: min(g.size, max(1, math.floor(keep * g.size + 1e-9))) for g in spec.groups}


def _draw(spec, keep: float, gen: torch.Generator) -> dict[str, Tensor]:
    """Dropped units per hidden group: all but a uniform random ``floor(keep * h)`` of them."""
    counts = _kept_counts(spec, keep)
    return {g.name: torch.randperm(g.size, generator=gen)[counts[g.name]:] for g in spec.groups}


def _scorer(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` to load states into; conv nets in channels-last memory (about 1.3x
    faster on a CPU; same function)."""
    module = copy.deepcopy(model).eval()
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()):
        module = module.to(memory_format=torch.channels_last)
    return module


def _score(module: nn.Module, state: State, xy: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """(loss, accuracy) of ``state`` loaded into ``module`` (from :func:`_scorer`)."""
    module.load_state_dict(state, strict=False)
    return evaluate_model(module, xy, batch_size=256)


def best_subnetworks(model: nn.Module, theta: State, xy: tuple[Tensor, Tensor], keeps: Sequence[float],
                     samples: int, seed: int, progress: bool = False) -> list[dict]:
    """Figure 2 left for one net: per kept fraction, the loss and accuracy of the best of ``samples``
    random fixed-size subnetworks (every hidden layer dropped) and of all samples."""
    module = _scorer(model)
    spec = infer(copy.deepcopy(model), xy[0][:2])
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    bar = tqdm(total=len(keeps) * samples, desc=f"figure 2 left (seed {seed})", disable=not progress, leave=False)
    for keep in keeps:
        scores = []
        for _ in range(samples):
            scores.append(_score(module, apply_dropout(spec, theta, _draw(spec, keep, gen), 1.0 - keep), xy))
            bar.update()
        best = min(range(samples), key=lambda i: scores[i][0])
        rows.append({"keep": float(keep), "kept": _kept_counts(spec, keep), "loss": scores[best][0],
                     "accuracy": scores[best][1], "sample_losses": [s[0] for s in scores],
                     "sample_accuracies": [s[1] for s in scores]})
    bar.close()
    return rows


def dropout_segment(model: nn.Module, theta: State, xy: tuple[Tensor, Tensor], p: float, points: int,
                    accuracy: float, tries: int, seed: int, device=None, progress: bool = False) -> dict:
    """Figure 2 centre for one net: loss and accuracy along the straight segment theta -> a p-dropout copy."""
    module = _scorer(model)
    spec = infer(copy.deepcopy(model), xy[0][:2])
    gen = torch.Generator().manual_seed(int(seed))
    best, made = None, 0
    for made in range(1, tries + 1):
        dropped = apply_dropout(spec, theta, _draw(spec, 1.0 - p, gen), p)
        loss, acc = _score(module, dropped, xy)
        if best is None or acc > best[2]:
            best = (dropped, loss, acc, made)
        if acc > accuracy:
            break
    dropped, loss, acc, used = best
    ts = [float(t) for t in np.linspace(0.0, 1.0, points)]
    ev = evaluate_path(model, linear(theta, dropped), xy, ts=ts, max_items=None, device=device or "cpu",
                       name=f"segment to p={p} copy", progress=progress)
    return {"p": float(p), "tries": made, "draw_used": used, "accuracy_met": acc > accuracy, "copy_loss": loss, "copy_accuracy": acc,
            "ts": ev.ts, "loss": ev.metrics["train_loss"], "accuracy": [1.0 - e for e in ev.metrics["train_error"]]}


def train_trial_net(model_options: Mapping, trainer: TrainConfig, data, file: FilePath, seed: int,
                    width: int | None = None, progress: bool = False) -> tuple[nn.Module, State]:
    """Build the configured model (``width`` overriding its hidden width) with torch's RNG seeded by ``seed``,
    train it with ``trainer`` into the checkpoint ``file`` (resumable; a finished one is reused)."""
    options = dict(model_options)
    if is_target(options):
        if width is not None:
            raise ValueError(f"figure2 widths need a zoo model (model.name); model._target_ {options['_target_']} "
                             "has no width option modeconn knows")
        with global_rng(seed):
            net = from_options(options, tuple(data.input_shape), data.num_classes)
        return _train_trial(net, options, trainer, data, file, seed, progress)
    name = options.pop("name")
    if width is not None:  # convnet / vgg: "width"; mlp: every entry of "hidden"
        if "hidden" in options:
            options["hidden"] = [int(width)] * len(options["hidden"])
        else:
            options["width"] = int(width)
    with global_rng(seed):  # seeded initialisation; the caller's RNG is left as it was
        net = build(name, tuple(data.input_shape), data.num_classes, **options)
    return _train_trial(net, {"name": name, **options}, trainer, data, file, seed, progress)


def _train_trial(net: nn.Module, model_options: Mapping, trainer: TrainConfig, data, file: FilePath, seed: int,
                 progress: bool) -> tuple[nn.Module, State]:
    file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": dict(model_options), "data": getattr(data, "name", None), "figure2": True}
    train(net, data, trainer, seed=seed, checkpoint_path=file, meta=meta, progress=progress)
    state, _ = load_checkpoint(file, model=net)
    return net, {k: v.to(trainer.device if trainer.device != "auto" else "cpu") for k, v in state.items()}


def _panel(per_trial: list[list[dict]], key: str) -> list[dict]:
    """Mean and std over trials, row by row (rows aligned across trials)."""
    out = []
    for i, row in enumerate(per_trial[0]):
        loss = mean_std([t[i]["loss"] for t in per_trial])
        acc = mean_std([t[i]["accuracy"] for t in per_trial])
        out.append({key: row[key], "loss_mean": loss[0], "loss_std": loss[1], "accuracy_mean": acc[0],
                    "accuracy_std": acc[1]})
    return out


def _centre_rows(centre: list[dict]) -> list[list[dict]]:
    return [[{"t": t, "loss": lo, "accuracy": ac} for t, lo, ac in zip(c["ts"], c["loss"], c["accuracy"])]
            for c in centre]


def _with_means(result: dict) -> dict:
    result["left"]["mean_std"] = _panel(result["left"]["per_trial"], "keep")
    result["centre"]["mean_std"] = _panel(_centre_rows(result["centre"]["per_trial"]), "t")
    result["right"]["mean_std"] = _panel(result["right"]["per_trial"], "width")
    return result


def _grid(result: dict) -> tuple[list, list, list]:
    return ([x["keep"] for x in result["left"]["mean_std"]], result["centre"]["per_trial"][0]["ts"],
            [x["width"] for x in result["right"]["mean_std"]])


_NUM = (int, float, type(None))  # a loss or accuracy (null: not finite)
_ROW = {"loss": Required(_NUM), "accuracy": Required(_NUM)}
#: what :func:`pool_figure2` reads of a ``figure2.json`` (:func:`modeconn.io.jsonfile.check_shape`)
RESULT_SHAPE = {
    "options": Required(dict), "num_items": Required(int), "seeds": Required(list),
    "seconds": Required({str: (int, float)}),
    "left": Required({"per_trial": Required([[{**_ROW, "keep": Required((int, float))}]]),
                      "mean_std": Required([{"keep": Required((int, float))}])}),
    "centre": Required({"per_trial": Required([{"ts": Required([(int, float)]), "loss": Required([_NUM]),
                                                 "accuracy": Required([_NUM])}])}),
    "right": Required({"per_trial": Required([[{**_ROW, "width": Required(int)}]]),
                       "mean_std": Required([{"width": Required(int)}])}),
}


def pool_figure2(results: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """Several runs' :func:`figure2` results as one, their trials pooled (seeds become ``"<run>:<seed>"``);
    the runs must share the kept fractions, segment grid and widths."""
    if not results:
        raise ValueError("pool_figure2: no results")
    names = list(names) if names is not None else [str(i) for i in range(len(results))]
    first = results[0]
    for name, r in zip(names, results):
        if _grid(r) != _grid(first):
            raise ValueError(f"run {name} measured Figure 2 on other kept fractions, segment points or widths "
                             f"than {names[0]}; it cannot be pooled with it")
    pooled = {"options": first["options"], "num_items": first["num_items"],
              "seeds": [f"{n}:{s}" for n, r in zip(names, results) for s in r["seeds"]],
              "seconds": {k: sum(r["seconds"].get(k, 0.0) for r in results) for k in first["seconds"]},
              **{panel: {"per_trial": [t for r in results for t in r[panel]["per_trial"]]}
                 for panel in ("left", "centre", "right")}}
    return _with_means(pooled)


def figure2(nets: Mapping[int, tuple[nn.Module, State]], data, opts: Figure2Options, train_net: NetTrainer,
            device=None, progress: bool = False) -> dict:
    """All three panels of Figure 2 for the trained nets ``nets`` (seed -> (module, state)), trials in
    seed order; ``train_net(seed, width)`` trains the narrow nets. Returns per-trial values, mean / std
    per point and the seconds each panel took."""
    opts.validate()
    seeds = sorted(nets)[: opts.trials]
    if len(seeds) < opts.trials:
        raise ValueError(f"figure2 needs {opts.trials} trained nets, got {len(seeds)}")
    xy = materialize(data, "train", opts.max_items, device)
    seconds = {"left": 0.0, "centre": 0.0, "right": 0.0}
    left, centre, right = [], [], []
    for seed in tqdm(seeds, desc="figure 2 trials", disable=not progress, leave=False):
        model, theta = nets[seed]
        t0 = time.perf_counter()
        left.append(best_subnetworks(model, theta, xy, opts.keeps, opts.samples, seed, progress))
        t1 = time.perf_counter()
        centre.append(dropout_segment(model, theta, xy, opts.segment_p, opts.segment_points, opts.segment_accuracy,
                                      opts.segment_tries, seed, device, progress))
        t2 = time.perf_counter()
        rows = []
        for width in opts.widths:
            narrow, state = train_net(seed, width)
            loss, acc = _score(_scorer(narrow), state, xy)
            rows.append({"width": int(width), "loss": loss, "accuracy": acc})
        right.append(rows)
        t3 = time.perf_counter()
        seconds["left"] += t1 - t0
        seconds["centre"] += t2 - t1
        seconds["right"] += t3 - t2
    return _with_means({"options": asdict(opts), "seeds": seeds, "num_items": len(xy[1]), "seconds": seconds,
                        "left": {"per_trial": left}, "centre": {"per_trial": centre}, "right": {"per_trial": right}})
