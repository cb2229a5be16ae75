"""AutoNEB (Draxler et al. 2018): a nudged elastic band between two minima that inserts pivots where the
path's loss rises, as a path constructor: :func:`autoneb`.

A chain of pivots (parameters only, one ``[P, D]`` tensor) runs cycles (:mod:`modeconn.paths.autoneb_cycles`):
each may insert pivots, then runs NEB iterations (string-method redistribution or a spring, every interior
pivot's loss and gradient in one vmapped call (:mod:`modeconn.paths.neb_step`), the improved tangent, the
nudge, an optimiser step: :mod:`modeconn.paths.neb`), and is then evaluated densely (9 sub-points per
segment, BatchNorm statistics recomputed at every point by :func:`modeconn.evaluation.evaluate.evaluate_path`).
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path as FilePath

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from modeconn.data import Dataset, materialize, resolve_device
from modeconn.evaluation.evaluate import evaluate_path
from modeconn.io.checkpoint import atomic_torch_save
from modeconn.io.jsonfile import Required
from modeconn.params.path import PiecewiseLinearPath, check_endpoints
from modeconn.paths.autoneb_cycles import (Cycle, dense_fractions, equal_insertions, expand_cycles,
                                           highest_insertions, insert_pivots, parse_rule)
from modeconn.paths.neb import TANGENTS, segment_lengths
from modeconn.paths.neb_step import BatchStream, ChainStep, chain_force
from modeconn.training.loop import Resume, global_rng, make_optimizer

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "modeconn.autoneb/1"
CHECK_EVERY = 50  # iterations between checks for non-finite losses (one device sync each)


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_autoneb_options(cycles=None, batch_size=512, weight_decay=1e-4, spring=None, tangent="improved",
                          max_items=None, seed=0, iterations_scale=1.0, **_) -> dict:
    """:func:`autoneb`'s option checks (the CLI runs them before any work); returns the checked settings
    with every cycle merged and expanded. Raises ``ValueError`` naming the option."""
    expanded = expand_cycles(cycles, iterations_scale)
    if not (_integer(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if not (isinstance(weight_decay, numbers.Real) and not isinstance(weight_decay, bool)
            and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0; got {weight_decay!r}")
    if spring is not None and not (isinstance(spring, numbers.Real) and not isinstance(spring, bool)
                                   and math.isfinite(spring) and spring > 0):
        raise ValueError(f"spring must be null (the string method) or a spring constant > 0; got {spring!r}")
    if tangent not in TANGENTS:
        raise ValueError(f"tangent must be one of {', '.join(TANGENTS)}; got {tangent!r}")
    if max_items is not None and not (_integer(max_items) and max_items >= 1):
        raise ValueError(f"max_items must be null or an integer >= 1; got {max_items!r}")
    if not _integer(seed):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    return {"cycles": [c.to_dict() for c in expanded], "batch_size": int(batch_size),
            "weight_decay": float(weight_decay), "spring": None if spring is None else float(spring),
            "tangent": tangent, "max_items": None if max_items is None else int(max_items), "seed": int(seed)}


def _cycle_list(settings: dict) -> list[Cycle]:
    out = []
    for c in settings["cycles"]:
        rule, count, threshold = parse_rule(c["insert"])
        out.append(Cycle(rule, count, threshold, c["iterations"], c["lr"], c["optimizer"], c["momentum"]))
    return out


class _Chain:
    """The chain's state between cycles: pivots, spacing weights, the last dense profile, the history."""

    def __init__(self, step: ChainStep) -> None:
        self.pivots = torch.stack([step.flat_a, step.flat_b])
        self.weights = torch.ones(1, dtype=torch.float64)
        self.profile: dict | None = None
        self.history: list[dict] = []

    def knots(self) -> list[float]:
        """Each pivot's normalised arc length along the chain (parameters only)."""
        lengths = segment_lengths(self.pivots)
        total = float(lengths.sum())
        if total == 0:
            return [i / (len(self.pivots) - 1) for i in range(len(self.pivots))]
        cum = (torch.cumsum(lengths, 0) / total).tolist()
        return [0.0, *cum[:-1], 1.0]


def _path(step: ChainStep, pivots: Tensor, knots: Sequence[float] | str) -> PiecewiseLinearPath:
    """The piecewise-linear path through ``pivots`` (endpoints exactly theta_a and theta_b)."""
    spots = knots if not isinstance(knots, str) else [i / (len(pivots) - 1) for i in range(len(pivots))]
    states = [step.a] + [step.state(p, t) for p, t in zip(pivots[1:-1], spots[1:-1])] + [step.b]
    return PiecewiseLinearPath(states, knots=list(spots))


def _profile(model: nn.Module, step: ChainStep, pivots: Tensor, data: tuple[Tensor, Tensor],
             device: torch.device) -> dict:
    """The dense train loss of the chain: every pivot and 9 sub-points per segment (uniform in each)."""
    fractions = dense_fractions()
    n = len(pivots) - 1
    ts = [(j + f) / n for j in range(n) for f in fractions] + [1.0]
    was = model.training
    try:
        ev = evaluate_path(model, _path(step, pivots, "uniform"), data, ts=ts, device=device, progress=False,
                           name="autoneb profile")
    finally:
        model.train(was)
    loss = ev.metrics["train_loss"]
    k = len(fractions)
    return {"pivot_losses": loss[::k], "dense": [loss[j * k + 1 : (j + 1) * k] for j in range(n)], "dense_loss": loss}


def _run_iterations(step: ChainStep, chain: _Chain, cycle: Cycle, settings: dict, stream: BatchStream,
                    train: tuple[Tensor, Tensor], augment: bool, bar, number: int) -> Tensor:
    """One cycle's NEB iterations on ``chain.pivots`` (in place); returns the interior losses ``[its, Q]``."""
    q = len(chain.pivots) - 2
    if q == 0 or cycle.iterations == 0:
        bar.update(cycle.iterations)
        return torch.zeros(cycle.iterations, q)
    full = chain.pivots.clone()  # the chain for this cycle: the optimiser steps its interior rows in place
    interior = full[1:-1]
    opt = make_optimizer([interior], cycle.optimizer, cycle.lr, cycle.momentum)
    weights = chain.weights.to(interior.device)
    losses = torch.empty(cycle.iterations, q, dtype=interior.dtype, device=interior.device)
    options = {"weight_decay": settings["weight_decay"], "spring": settings["spring"], "tangent": settings["tangent"]}
    checked = 0
    for it in range(cycle.iterations):
        x, y = stream.many(q + 2, *train, augment)  # a batch per pivot, in chain order, endpoints included
        loss, interior.grad = chain_force(step, full, weights, x, y, **options)
        opt.step()
        losses[it] = loss
        if (it + 1) % CHECK_EVERY == 0 or it + 1 == cycle.iterations:
            _check_finite(losses[checked : it + 1], interior, number, checked)
            checked = it + 1
            bar.set_postfix(cycle=number, pivots=q + 2, loss=f"{float(loss.max()):.4g}")
        bar.update(1)
    chain.pivots = full
    return losses


def _check_finite(losses: Tensor, interior: Tensor, cycle: int, offset: int) -> None:
    bad = ~torch.isfinite(losses)
    if bool(bad.any()) or not bool(torch.isfinite(interior).all()):
        it, pivot = (int(v) for v in bad.nonzero()[0]) if bool(bad.any()) else (len(losses) - 1, -1)
        where = f"pivot {pivot + 1}" if pivot >= 0 else "the pivots' parameters"
        raise ValueError(f"autoneb: non-finite pivot loss in cycle {cycle}, iteration {offset + it + 1} ({where}); "
                         "lower that cycle's lr. The resume file keeps the last finished cycle.")


def _insert(chain: _Chain, cycle: Cycle) -> int:
    """Apply the cycle's insertion rule; returns how many pivots it inserted."""
    if cycle.rule == "leave":
        return 0
    if cycle.rule == "equal":
        where = equal_insertions(len(chain.pivots) - 1, cycle.count)
    else:
        where = highest_insertions(chain.profile["pivot_losses"], chain.profile["dense"], cycle.count,
                                   cycle.threshold)
    if where:
        chain.pivots, chain.weights = insert_pivots(chain.pivots, chain.weights, where)
    return len(where)


def autoneb(
    model: nn.Module,
    theta_a: Mapping[str, Tensor],
    theta_b: Mapping[str, Tensor],
    data,
    *,
    cycles: Sequence[Mapping] | None = None,
    batch_size: int = 512,
    weight_decay: float = 1e-4,
    spring: float | None = None,
    tangent: str = "improved",
    max_items: int | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int = 0,
    iterations_scale: float = 1.0,
    device: str | torch.device = "auto",
    callback: Callable[[int, dict], None] | None = None,
) -> PiecewiseLinearPath:
    """Connect ``theta_a`` and ``theta_b`` by AutoNEB; returns the piecewise-linear path through the final
    pivots, knots at their normalised arc length (in parameters), endpoints exactly the given states.

    ``model`` is any ``nn.Module`` of the endpoints' architecture (called through ``functional_call`` only);
    ``data`` a modeconn ``Dataset`` (its train split; augmented as it asks), an ``(inputs, targets)`` pair or
    batches. ``cycles``: per-cycle settings, each a diff on the previous one (keys ``insert`` =
    ``equal(n)`` / ``highest(n[, threshold])`` / ``leave``, ``iterations``, ``lr``, ``optimizer``,
    ``momentum``, ``repeat``: :mod:`modeconn.paths.autoneb_cycles`); ``None`` is the paper's 14-cycle
    schedule; ``iterations_scale`` multiplies every cycle's iterations (a quick run keeps the structure).
    An iteration draws a batch of ``batch_size`` per pivot (endpoints included) from one stream, computes every
    interior pivot's train-mode loss and gradient in one vmapped call plus ``weight_decay * theta``, the endpoints' eval-mode
    losses, the tangent (``"improved"``: Henkelman & Jonsson; ``"reference"``: Draxler et al.'s code), and
    steps the nudged gradient; ``spring=None`` redistributes the pivots (string method) before every
    iteration, a number is a spring constant. After every cycle the chain is evaluated densely (pivots and
    9 sub-points per segment, the first ``max_items`` training examples, BatchNorm recomputed per point).

    ``resume``: a file; every finished cycle is saved there atomically and a rerun continues after the last
    finished cycle, bit for bit on a CPU (a finished file returns the path without work). A non-finite pivot
    loss raises ``ValueError`` naming the cycle and iteration. ``callback(cycle, record)`` runs after each
    cycle is saved. ``info`` holds ``settings``, per-cycle ``history`` (insertion, pivots, iterations, lr,
    pivot losses, dense profile, its saddle, seconds), ``saddle`` (the last cycle's dense maximum),
    ``best_cycle``, ``pivots`` (their t), ``gradient_evaluations`` and ``resumed_from``.
    """
    settings = check_autoneb_options(cycles, batch_size, weight_decay, spring, tangent, max_items, seed,
                                     iterations_scale)
    check_endpoints(theta_a, theta_b, model, data)
    dev = resolve_device(device)
    step = ChainStep(model, theta_a, theta_b, dev)
    plan = _cycle_list(settings)
    train = materialize(data, "train", None, dev)
    dense_data = (train[0][: settings["max_items"]], train[1][: settings["max_items"]])
    augment = isinstance(data, Dataset) and data.augment
    chain, stream = _Chain(step), BatchStream(len(train[1]), settings["batch_size"],
                                              torch.Generator().manual_seed(settings["seed"]))
    file = FilePath(resume) if resume is not None else None
    keeper = None if file is None else Resume(file, CHECKPOINT_FORMAT, {**settings, "endpoints": step.digest()},
                                              what="autoneb resume file", shape=RESUME_SHAPE)
    saved = keeper.read() if keeper is not None else None
    done = 0
    if saved is not None:
        done = _restore(keeper, saved, chain, stream, len(plan), dev)
        log.info("autoneb: %s cycle %d of %d (%s)", "finished at" if done == len(plan) else "resumed after", done,
                 len(plan), file)
    total = sum(c.iterations for c in plan)
    bar = tqdm(total=total, initial=sum(c.iterations for c in plan[:done]), desc="autoneb", disable=not progress,
               leave=False)
    try:
        with global_rng(settings["seed"], dev):
            if saved is not None:
                try:
                    torch.set_rng_state(saved["rng"])
                    if dev.type == "cuda" and saved.get("cuda_rng") is not None:
                        torch.cuda.set_rng_state(saved["cuda_rng"], dev)
                except (RuntimeError, TypeError) as e:
                    raise keeper.unusable(f"holds unusable random states ({str(e).splitlines()[0][:200]})") from None
            for number in range(done + 1, len(plan) + 1):
                started = time.perf_counter()
                cycle = plan[number - 1]
                if cycle.rule == "highest" and chain.profile is None:
                    chain.profile = _profile(model, step, chain.pivots, dense_data, dev)
                inserted = _insert(chain, cycle)
                _run_iterations(step, chain, cycle, settings, stream, train, augment, bar, number)
                chain.profile = _profile(model, step, chain.pivots, dense_data, dev)
                record = _record(chain, cycle, number, inserted, settings["batch_size"], time.perf_counter() - started)
                chain.history.append(record)
                if file is not None:
                    atomic_torch_save(_payload(keeper, chain, number, stream, dev), file)
                if callback is not None:
                    callback(number, dict(record))
    finally:
        bar.close()
    knots = chain.knots()
    path = _path(step, chain.pivots, knots)
    path.name = "autoneb"
    path.info = _info(settings, chain, knots, None if saved is None else done, file)
    return path


#: what an autoneb resume file must hold (:func:`modeconn.io.jsonfile.check_shape`; tensors by type)
RESUME_SHAPE = {"identity": Required(dict), "cycles_done": Required(int), "pivots": Required(Tensor),
                "weights": Required(Tensor), "profile": ({"pivot_losses": Required(list), "dense": Required(list),
                                                          "dense_loss": Required(list)}),
                "history": Required([dict]),
                "stream": Required({"generator": Required(Tensor), "order": Required(Tensor), "pos": Required(int)}),
                "rng": Required(Tensor), "cuda_rng": (Tensor, type(None))}


def chain_problem(saved: Mapping, width: int | None = None, cycles: int | None = None) -> str | None:
    """What in a resume file of :data:`RESUME_SHAPE` cannot be a saved chain (of ``width`` parameters, of a
    schedule of ``cycles`` cycles, where given), else ``None``. Also the CLI's preflight check."""
    pivots, weights, done = saved["pivots"], saved["weights"], saved["cycles_done"]
    if pivots.dim() != 2 or pivots.shape[0] < 2 or not pivots.is_floating_point():
        return f"pivots is {list(pivots.shape)} {pivots.dtype}, not [at least 2 pivots, parameters] floats"
    if width is not None and pivots.shape[1] != width:
        return f"pivots is {list(pivots.shape)}, not [pivots, {width}] for the model's parameters"
    if weights.dim() != 1 or weights.numel() != pivots.shape[0] - 1:
        return f"weights is {list(weights.shape)}, not [{pivots.shape[0] - 1}] for {pivots.shape[0]} pivots"
    if done < 0 or done != len(saved["history"]):
        return f"cycles_done is {done} but its history records {len(saved['history'])} cycles"
    if cycles is not None and done > cycles:
        return f"{done} cycles done of a schedule of {cycles}"
    return None


def _restore(keeper: Resume, saved: dict, chain: _Chain, stream: BatchStream, cycles: int, dev: torch.device) -> int:
    """The chain and batch stream of a resume file (of this run's identity, :data:`RESUME_SHAPE`); returns the
    number of finished cycles. Tensors that do not fit the chain are one error naming the file."""
    problem = chain_problem(saved, chain.pivots.shape[1], cycles)
    if problem:
        raise keeper.unusable(f"does not fit this chain ({problem})")
    pivots, weights, done = saved["pivots"], saved["weights"], saved["cycles_done"]
    chain.pivots, chain.weights = pivots.to(device=dev, dtype=chain.pivots.dtype), weights.double()
    chain.profile, chain.history = saved.get("profile"), list(saved["history"])
    try:
        stream.load_state(saved["stream"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise keeper.unusable(f"holds an unusable batch stream ({str(e).splitlines()[0][:200]})") from None
    return int(done)


def _record(chain: _Chain, cycle: Cycle, number: int, inserted: int, batch_size: int, seconds: float) -> dict:
    dense = chain.profile["dense_loss"]
    knots = chain.knots()
    n = len(knots) - 1
    fr = dense_fractions()
    dense_t = [knots[j] + f * (knots[j + 1] - knots[j]) for j in range(n) for f in fr] + [1.0]
    top = max(range(len(dense)), key=lambda i: dense[i])
    return {"cycle": number, **cycle.to_dict(), "inserted": inserted, "pivots": len(knots),
            "pivot_losses": list(chain.profile["pivot_losses"]), "dense_t": dense_t, "dense_loss": list(dense),
            "saddle_loss": float(dense[top]), "saddle_t": float(dense_t[top]),
            "gradient_evaluations": cycle.iterations * max(0, len(knots) - 2) * batch_size, "seconds": seconds}


def _payload(keeper: Resume, chain: _Chain, number: int, stream: BatchStream, dev: torch.device) -> dict:
    return {"format": CHECKPOINT_FORMAT, "identity": keeper.identity, "cycles_done": number,
            "pivots": chain.pivots.detach().cpu(), "weights": chain.weights.cpu(), "profile": chain.profile,
            "history": chain.history, "stream": stream.state(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}


def _info(settings: dict, chain: _Chain, knots: list[float], resumed_from: int | None, file) -> dict:
    history = chain.history
    last = history[-1] if history else None
    best = min(range(len(history)), key=lambda i: history[i]["saddle_loss"]) + 1 if history else None
    return {"settings": settings, "history": history, "cycles_done": len(history), "pivots": knots,
            "saddle": None if last is None else {"loss": last["saddle_loss"], "t": last["saddle_t"],
                                                 "cycle": last["cycle"]},
            "best_cycle": best, "iterations": sum(h["iterations"] for h in history),
            "gradient_evaluations": sum(h["gradient_evaluations"] for h in history),
            "seconds": sum(h["seconds"] for h in history), "resumed_from": resumed_from,
            "checkpoint": None if file is None else os.fspath(file)}
