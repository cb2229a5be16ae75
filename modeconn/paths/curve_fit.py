"""Training a curve's interior bends for *any* ``nn.Module`` (Garipov et al. 2018): :func:`fit_curve`.

The bends are kept as one flat ``[bends, parameters]`` matrix (:class:`FlatCurve`); at every step the point
phi(t) is one small matmul, split into views shaped like the model's parameters, and the model runs on it
through ``torch.func.functional_call`` (:class:`CurveStep`, one step of the one training loop). Which t each
step uses is :mod:`modeconn.paths.curve_times`'s; the result is a :class:`~modeconn.paths.curves.CurvePath`.
"""
from __future__ import annotations

import functools
import itertools
import hashlib
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path as FilePath

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from modeconn.params.batchnorm import has_batchnorm
from modeconn.data import iter_batches, resolve_device
from modeconn.training.loop import OPTIMIZERS, SCHEDULES, Loop, Resume, Schedule, make_optimizer
from modeconn.params.path import State, check_compatible, check_endpoints, float_state
from modeconn.paths.curve_lr import PROBE_STEPS, probe_lr
from modeconn.paths.curve_times import GRID_TIMES, T_DENSITIES, T_SEQUENCES, CurveTimes
from modeconn.paths.curves import CHECKPOINT_FORMAT, INITS, CurvePath, _check_kind, coefficient_row, coefficients, curve_info


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_curve_options(kind="bezier", num_bends=3, epochs=30, lr=0.15, wd=1e-4, batch_size=128, momentum=0.9,
                        optimizer="sgd", schedule="garipov", t_per_step=1, fixed_ends=True, augment=True, seed=0,
                        init="scaled", t_sequence="golden", t_density="bends", **_) -> dict:
    """:func:`fit_curve`'s option checks (the CLI runs them on a config before any training); returns the
    checked settings, which identify a curve checkpoint. Raises ``ValueError`` naming the option."""
    if not _integer(num_bends):
        raise ValueError(f"num_bends must be an integer; got {num_bends!r}")
    kind = _check_kind(kind, num_bends)
    if fixed_ends and num_bends < 3:
        raise ValueError(f"with fixed endpoints a curve needs num_bends >= 3 to have anything to train; got "
                         f"num_bends={num_bends}")
    for name, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("t_per_step", t_per_step, 1)):
        if not (_integer(value) and value >= low):
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if t_per_step > batch_size:
        raise ValueError(f"t_per_step splits each batch across that many t, so it must be at most batch_size "
                         f"({batch_size}); got {t_per_step}")
    if not _integer(seed):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    if not (lr == "auto" or (_real(lr) and lr > 0)):
        raise ValueError(f"lr must be a finite number > 0 or 'auto'; got {lr!r}")
    if not (_real(wd) and wd >= 0):
        raise ValueError(f"wd must be a number >= 0; got {wd!r}")
    if not (_real(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be a number in [0, 1); got {momentum!r}")
    optimizer = str(optimizer).lower()
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if t_sequence not in T_SEQUENCES:
        raise ValueError(f"t_sequence must be one of {', '.join(T_SEQUENCES)}; got {t_sequence!r}")
    if t_density not in T_DENSITIES:
        raise ValueError(f"t_density must be one of {', '.join(T_DENSITIES)}; got {t_density!r}")
    return {"kind": kind, "num_bends": int(num_bends), "epochs": int(epochs), "lr": lr if lr == "auto" else float(lr),
            "wd": float(wd),
            "batch_size": int(batch_size), "momentum": float(momentum), "optimizer": optimizer,
            "schedule": str(schedule), "t_per_step": int(t_per_step), "fixed_ends": bool(fixed_ends),
            "augment": bool(augment), "seed": int(seed), "init": init, "t_sequence": t_sequence,
            "t_density": t_density}


class FlatCurve:
    """A curve over a model's parameters as flat vectors: the endpoints ``flat_a``/``flat_b`` ``[D]`` and the
    trained tensor ``free``.

    With fixed ends, ``free[k-1]`` is interior bend k's offset from the straight line (w_k = line_k +
    free[k-1]; Bernstein and hat bases reproduce the line, so phi(t) = lerp(a, b, t) + sum_interior c_k(t)
    free[k-1]); with free ends, ``free`` holds all bends themselves. Float buffers are carried on the
    straight line, never trained.
    """

    def __init__(self, model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor],
                 kind: str, num_bends: int, fixed_ends: bool, device: torch.device, init: str = "line") -> None:
        a, b = float_state(theta_a), float_state(theta_b)
        check_compatible(a, b)
        self.names = [name for name, _ in model.named_parameters()]
        missing = [k for k in self.names if k not in a]
        if missing:
            raise KeyError(f"the endpoints lack the model's parameters {missing[:5]}: were they saved from this "
                           "model?")
        dtypes = {a[k].dtype for k in self.names}
        if len(dtypes) != 1:
            raise TypeError(f"fit_curve needs parameters of one floating dtype; got {sorted(map(str, dtypes))}")
        (self.dtype,) = dtypes
        self.a, self.b, self.kind, self.n, self.fixed_ends, self.device = a, b, kind, num_bends, fixed_ends, device
        self.shapes = [a[k].shape for k in self.names]
        self.sizes = [a[k].numel() for k in self.names]
        self.home = a[self.names[0]].device
        self.flat_a = torch.cat([a[k].reshape(-1) for k in self.names]).to(device)
        self.flat_b = torch.cat([b[k].reshape(-1) for k in self.names]).to(device)
        self.free_rows = list(range(1, num_bends - 1)) if fixed_ends else list(range(num_bends))
        if fixed_ends:
            self.free = torch.zeros(num_bends - 2, self.flat_a.numel(), dtype=self.dtype, device=device)
        else:
            self.free = torch.stack([self._line(r) for r in self.free_rows])
        if init == "scaled":  # interior bends start at the line's points rescaled to the ends' interpolated norms
            with torch.no_grad():
                for i, r in enumerate(self.free_rows):
                    if 0 < r < num_bends - 1:
                        self.free[i] = self._scaled_line(r) - (self._line(r) if fixed_ends else 0)
        self.free.requires_grad_(True)

    def _line(self, r: int) -> Tensor:
        return torch.lerp(self.flat_a, self.flat_b, r / (self.n - 1))

    def _scaled_line(self, r: int) -> Tensor:
        """Bend r's point on the line with every parameter tensor rescaled to the norm interpolated between
        the endpoints' (averaging two solutions shrinks the weights; this undoes it)."""
        w = r / (self.n - 1)
        pieces = zip(self._line(r).split(self.sizes), self.flat_a.split(self.sizes), self.flat_b.split(self.sizes))
        return torch.cat([p * (torch.lerp(pa.norm(), pb.norm(), w) / p.norm().clamp_min(1e-12)) for p, pa, pb in pieces])

    def endpoints_digest(self) -> str:
        """A sha256 of the endpoints' exact values (identifies the curve a checkpoint belongs to)."""
        h = hashlib.sha256()
        for flat in (self.flat_a, self.flat_b):
            h.update(flat.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat point ``[D]`` as views shaped like the model's parameters."""
        return {k: v.view(s) for k, v, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def bends(self) -> list[State]:
        """Every bend as a state dict over the endpoints' floating keys (on the endpoints' device)."""
        free = self.free.detach()
        rows = {r: free[i] for i, r in enumerate(self.free_rows)}
        extra = [k for k in self.a if k not in set(self.names)]
        out: list[State] = []
        for r in range(self.n):
            if r not in rows:
                out.append(self.a if r == 0 else self.b)
                continue
            row = rows[r] + self._line(r) if self.fixed_ends else rows[r]
            bend = {k: p.view(s).clone() for k, p, s in zip(self.names, row.to(self.home).split(self.sizes),
                                                            self.shapes)}
            bend.update({k: torch.lerp(self.a[k], self.b[k], r / (self.n - 1)) for k in extra})
            out.append({k: bend[k] for k in self.a})  # the endpoints' key order
        return out

    def points(self, t: Sequence[float]) -> Tensor:
        """phi at the times ``t``: ``[D]`` for one t, ``[len(t), D]`` otherwise (cheapest ops for each case)."""
        m, n, dtype, dev, free = len(t), self.n, self.dtype, self.device, self.free
        rows = [coefficient_row(self.kind, n, ti) for ti in t]
        if not self.fixed_ends:
            c = torch.tensor(rows, dtype=dtype).to(dev, non_blocking=True)
            return (c @ free).view(-1) if m == 1 else c @ free
        if m == 1:
            base = torch.lerp(self.flat_a, self.flat_b, t[0])
            if n == 3:
                return base.add_(free.view(-1), alpha=rows[0][1])  # in place: one buffer less
            c = torch.tensor([r[1:-1] for r in rows], dtype=dtype).to(dev, non_blocking=True)
            return torch.addmm(base.unsqueeze(0), c, free).view(-1)
        w = torch.tensor(t, dtype=dtype).to(dev, non_blocking=True).unsqueeze(1)
        c = torch.tensor([r[1:-1] for r in rows], dtype=dtype).to(dev, non_blocking=True)
        return torch.addmm(torch.lerp(self.flat_a.unsqueeze(0), self.flat_b.unsqueeze(0), w), c, free)


class CurveStep:
    """The step of curve training: each batch is split into ``t_per_step`` = m equal parts, part j runs
    through the curve's point at its own t_j from ``times`` (stratified, :class:`CurveTimes`), and the loss
    is the mean over j of w_j times part j's mean cross-entropy plus ``0.5 * wd * ||phi(t_j)||^2`` (w_j: the
    importance weight of t_j, 1 under the uniform density).

    A step does the arithmetic of one forward/backward of the batch whatever m is: the m points run in one
    call, vmapped over points (:func:`torch.func.vmap` of :func:`torch.func.functional_call`; batches that do
    not split evenly run part by part). On a CPU that call costs more than one over the whole batch (a
    vmapped convolution is a grouped one over small sub-batches, and the activations change layout between
    layers): 1.44x for 4 points and 1.68x for 16 per epoch of a small conv net (docs/benchmarks.md), where
    ``t_sequence="golden"`` with ``t_density="bends"`` at m = 1 reaches the same barrier for 1.02x.
    m = 1 with the random sequence and uniform density is the reference scheme (one t ~ U(0, 1) per batch).
    """

    def __init__(self, model: nn.Module, curve: FlatCurve, times: CurveTimes, wd: float) -> None:
        self.model, self.curve, self.times, self.m = model, curve, times, times.m
        self.decay = float(wd) / self.m
        self.buffers = {k: v.detach().clone().to(curve.device) for k, v in model.named_buffers()}
        if self.m > 1:  # buffers get a points axis too: BatchNorm updates its (discarded) statistics per point
            self.points_buffers = {k: v.unsqueeze(0).expand(self.m, *v.shape).clone() for k, v in self.buffers.items()}
            self.vmapped = vmap(lambda p, b, x: functional_call(model, (p, b), (x,)), randomness="different")

    def state(self) -> dict[str, Tensor]:
        return {"free": self.curve.free, "t_offset": torch.tensor(self.times.offset, dtype=torch.float64)}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            self.curve.free.copy_(state["free"])
        self.times.offset = float(state["t_offset"])

    def _forward(self, phi: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.model, (self.curve.params(phi), self.buffers), (x,))

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        m, decay = self.m, self.decay
        t, w = self.times.draw()
        weighted = any(wj != 1.0 for wj in w)
        phi = self.curve.points(t)
        flat = phi.detach()
        if weighted and m > 1:
            w_vec = torch.tensor(w, dtype=flat.dtype).to(flat.device, non_blocking=True)
        # 0.5 * wd * sum_j w_j ||phi_j||^2 / m: its gradient wd * w_j * phi_j / m is added to phi's gradient
        # by a hook (one fused op) instead of differentiating the square; the value is reported.
        with torch.no_grad():
            if m == 1:
                reg = (0.5 * decay * w[0]) * torch.dot(flat, flat)
            else:
                reg = (0.5 * decay) * ((flat * flat).sum(1) * w_vec if weighted else flat * flat).sum()
        if decay and weighted and m > 1:
            phi.register_hook(lambda g: g.addcmul(flat, w_vec.unsqueeze(1), value=decay))
        elif decay:  # one weight for all points (w = 1 unless m = 1)
            phi.register_hook(lambda g: g.add(flat, alpha=decay * w[0]))
        if m == 1:
            ce = F.cross_entropy(self._forward(phi, x), y)
            ce = ce * w[0] if weighted else ce
        elif len(y) % m == 0:
            c = self.curve
            params = {k: v.reshape(m, *s) for k, v, s in zip(c.names, phi.split(c.sizes, dim=1), c.shapes)}
            out = self.vmapped(params, self.points_buffers, x.reshape(m, len(y) // m, *x.shape[1:])).flatten(0, 1)
            if weighted:
                ce = (F.cross_entropy(out, y, reduction="none").view(m, -1).mean(1) * w_vec).mean()
            else:
                ce = F.cross_entropy(out, y)
        else:  # a batch that does not split evenly (the last one): part by part
            parts = zip(phi.unbind(0), x.tensor_split(m), y.tensor_split(m), w)
            ce = sum(wj * F.cross_entropy(self._forward(p, xj), yj, reduction="sum")
                     for p, xj, yj, wj in parts) / len(y)
        return ce, {"ce": ce.detach().double() * len(y), "reg": reg.double()}

    def summary(self, sums: Mapping[str, Tensor], examples: int, steps: int) -> dict[str, float]:
        return {"train_loss": float(sums["ce"]) / examples, "regularizer": float(sums["reg"]) / steps}


@functools.lru_cache(maxsize=16)
def _bend_mass(kind: str, num_bends: int, rows: tuple[int, ...]) -> Tensor:
    """The summed basis coefficients of the bends ``rows`` at the t sampler's grid (computed once)."""
    return coefficients(kind, num_bends, GRID_TIMES)[:, list(rows)].sum(1)


def _auto_lr(model: nn.Module, curve: FlatCurve, s: dict, mass: Tensor | None, data, dev: torch.device,
             min_batch: int) -> tuple[float, dict]:
    """``lr="auto"``: :func:`~modeconn.paths.curve_lr.probe_lr` on the curve's first ``PROBE_STEPS`` batches
    (their own generators, seeded from the curve's seed: the training after it is that of the chosen lr)."""
    g = torch.Generator().manual_seed(s["seed"] + 2)
    batches = iter_batches(data, s["batch_size"], "train", shuffle=True, generator=g, augment=s["augment"], device=dev)
    batches = list(itertools.islice((b for b in batches if len(b[1]) >= min_batch), PROBE_STEPS))
    probe = CurveStep(model, curve, CurveTimes(1, "golden", "uniform", None, torch.Generator()), s["wd"])

    def make_loss():
        times = CurveTimes(s["t_per_step"], s["t_sequence"], s["t_density"], mass,
                           torch.Generator().manual_seed(s["seed"] + 3))
        step = CurveStep(model, curve, times, s["wd"])
        return lambda x, y: step.loss(x, y)[0]

    return probe_lr(curve.free, make_loss, lambda t, x, y: F.cross_entropy(probe._forward(curve.points([t]), x), y),
                    lambda lr: make_optimizer([curve.free], s["optimizer"], lr, s["momentum"]), batches)


def fit_curve(
    model: nn.Module,
    theta_a: Mapping[str, Tensor],
    theta_b: Mapping[str, Tensor],
    data,
    kind: str = "bezier",
    num_bends: int = 3,
    *,
    epochs: int = 30,
    lr: float | str = 0.15,
    wd: float = 1e-4,
    batch_size: int = 128,
    momentum: float = 0.9,
    optimizer: str = "sgd",
    schedule: str = "garipov",
    t_per_step: int = 1,
    fixed_ends: bool = True,
    augment: bool = True,
    seed: int = 0,
    init: str = "scaled",
    t_sequence: str = "golden",
    t_density: str = "bends",
    device: str | torch.device = "auto",
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
) -> CurvePath:
    """Train the interior bends of a ``kind`` curve with ``num_bends`` bends from ``theta_a`` to ``theta_b``.

    ``model`` is any ``nn.Module`` of the endpoints' architecture (it is only called through
    ``functional_call``; its own tensors, device and mode are left as they were). ``data`` is a modeconn
    ``Dataset`` (its train split; CIFAR-style augmentation when ``augment`` and the dataset asks for it),
    an ``(inputs, targets)`` pair or an iterable of batches.

    Interior bends start evenly spaced on the straight line (``init="line"``), or there with every parameter
    tensor rescaled to the norm interpolated between the endpoints' (``init="scaled"``); endpoints stay fixed unless
    ``fixed_ends=False``. Each step splits its batch into ``t_per_step`` = m equal parts and runs part j
    through phi(t_j) at its own stratified t_j (:class:`CurveStep`: one vmapped call, the arithmetic of one
    t). Where the t fall (:class:`~modeconn.paths.curve_times.CurveTimes`): ``t_sequence="random"`` draws
    them afresh at every step, ``"golden"`` moves one random start along the golden-ratio sequence so that
    consecutive steps cover [0, 1] evenly; ``t_density="uniform"`` spreads them evenly in t, ``"bends"``
    draws them in proportion to the trained bends' basis coefficients and weights each point's loss by the
    inverse density, so the objective is unchanged. It minimises the batch's weighted mean cross-entropy plus
    ``0.5 * wd * ||phi(t_j)||^2`` (weighted alike) averaged over the points.

    The defaults (one golden, bends-weighted t per batch, scaled bends, lr 0.15) are chosen by a sweep
    (bench/curve_defaults.py: an MLP, a ConvFC-like net, VGG-11-BN and a small ViT on digits, wd 1e-4 and
    5e-4, 4 curves each, 5/10/20 epochs): below the reference scheme's mean barrier in every cell
    (docs/benchmarks.md). ``lr="auto"`` chooses between 0.15 and 0.05 by a short probe
    (:mod:`modeconn.paths.curve_lr`; ``info["lr_probe"]``); an explicit number is used as given. The reference scheme of Garipov et al. is ``t_sequence="random",
    t_density="uniform", init="line"`` at their learning rate (the paper presets pin it).
    SGD (momentum ``momentum``) or ``optimizer="adam"``; learning rate ``lr`` under ``schedule``
    (``"garipov"``: flat to 50% of the epochs, linear decay to 1% by 90%; any :class:`modeconn.training.loop.Schedule`).
    The training runs on :class:`modeconn.training.loop.Loop` (t from its generator seeded with ``seed``, shuffling
    from one seeded with ``seed + 1``, dropout from the global RNG seeded with ``seed`` inside the loop only).

    ``checkpoint_path``: after every epoch the bends, optimiser state, epoch, history and RNG states are
    saved atomically (weights-only content); calling again with the same path resumes (bit for bit on
    CPU, logging "resumed from epoch N") or, for a finished curve, loads it without training; a checkpoint
    of other settings or endpoints is refused. A non-finite loss raises
    ``modeconn.training.train.NonFiniteLossError`` and keeps the last good checkpoint. ``callback(epoch, record)``
    runs after each epoch (1-based ``epoch``, after saving).

    Returns a :class:`CurvePath` (``name`` = kind) whose ``info`` holds per-epoch ``train_loss`` (mean
    cross-entropy), ``regularizer`` (mean 0.5 wd ||phi(t)||^2), ``lr``, ``seconds`` and ``settings``.
    """
    settings = check_curve_options(kind, num_bends, epochs, lr, wd, batch_size, momentum, optimizer, schedule,
                                   t_per_step, fixed_ends, augment, seed, init, t_sequence, t_density)
    check_endpoints(theta_a, theta_b, model, data)
    dev = resolve_device(device)
    curve = FlatCurve(model, theta_a, theta_b, settings["kind"], settings["num_bends"], settings["fixed_ends"], dev,
                      settings["init"])
    ckpt_file = FilePath(checkpoint_path) if checkpoint_path is not None else None
    resume = None
    if ckpt_file is not None:
        resume = Resume(ckpt_file, CHECKPOINT_FORMAT, {**settings, "endpoints": curve.endpoints_digest()},
                        what="curve checkpoint", extra=lambda: {
                            "settings": settings,
                            "bends": [{k: v.detach().cpu() for k, v in b.items()} for b in curve.bends()]})
    t_gen = torch.Generator().manual_seed(settings["seed"])
    mass = (_bend_mass(settings["kind"], settings["num_bends"], tuple(curve.free_rows))
            if settings["t_density"] == "bends" else None)
    times = CurveTimes(settings["t_per_step"], settings["t_sequence"], settings["t_density"], mass, t_gen)
    step = CurveStep(model, curve, times, settings["wd"])
    min_batch = settings["t_per_step"] * (2 if has_batchnorm(model) else 1)
    was_training = model.training
    model.train()
    try:
        lr, probe = settings["lr"], None
        if lr == "auto":  # deterministic for a seed, so a resumed run chooses the same rate again
            lr, probe = _auto_lr(model, curve, settings, mass, data, dev, min_batch)
        loop = Loop(step, make_optimizer([curve.free], settings["optimizer"], lr, momentum),
                    Schedule(settings["schedule"], lr, settings["epochs"]), data, batch_size, seed, dev,
                    data_seed=settings["seed"] + 1, generators={"t": t_gen}, augment=augment,
                    min_batch=min_batch, resume=resume, progress=progress,
                    label=f"curve {settings['kind']}", callbacks=[callback] if callback else [])
        history = loop.run()
    finally:
        model.train(was_training)
    info = curve_info(settings, history)
    info.update(resumed_from=loop.resumed_from, checkpoint=os.fspath(ckpt_file) if ckpt_file else None,
                lr_probe=probe)
    return CurvePath(curve.bends(), settings["kind"], info=info)
