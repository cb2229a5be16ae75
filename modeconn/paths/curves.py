"""Trained curves between two solutions (Garipov et al. 2018): Bezier curves and polygonal chains.

A curve is phi(t) = sum_k c_k(t) w_k over control points ("bends") w_0 = theta_a, ..., w_{n-1} = theta_b.
``kind="bezier"`` uses the Bernstein basis of degree n - 1; ``kind="polychain"`` uses hat functions on the
uniform knots k / (n - 1) (straight segments through the bends). :class:`CurvePath` is a plain
:class:`~modeconn.paths.base.Path`, so the evaluator measures it like any other path and every point
exports as a plain state dict.

:func:`fit_curve` trains the interior bends of a curve for *any* ``nn.Module``: no curve twin of the model
class is written. The bends are kept as one flat ``[bends, parameters]`` matrix; at every step the point
phi(t) is one small matmul, split into views shaped like the model's parameters, and the model runs on it
through ``torch.func.functional_call``. As in the reference, t ~ U(0, 1) is drawn at each step, weight decay
is ``0.5 * wd * ||phi(t)||^2`` on the sampled point (reported apart from the loss), the optimiser is SGD
with momentum 0.9 and the learning rate is flat for the first half of the epochs, then decays linearly to
1% by 90%. BatchNorm layers use the batch's statistics during training (as in the reference); their running
statistics are recomputed at every evaluated t by :func:`modeconn.evaluate.evaluate_path`.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path as FilePath

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from modeconn.batchnorm import has_batchnorm
from modeconn.checkpoint import atomic_torch_save
from modeconn.data import Dataset, iter_batches, resolve_device
from modeconn.paths.base import Path, State, as_times, check_compatible, float_state
from modeconn.train import SCHEDULES, NonFiniteLossError, TrainConfig, lr_at

KINDS = ("bezier", "polychain")
CHECKPOINT_FORMAT = "modeconn.curve/1"

# Settings that must match for a checkpoint to be resumed (they change the trained curve).
_RESUME_KEYS = ("kind", "num_bends", "epochs", "lr", "wd", "batch_size", "momentum", "optimizer", "schedule",
                "t_per_step", "fixed_ends", "augment", "seed")


# ------------------------------------------------------------------------------------------- basis

def _check_kind(kind: str, num_bends: int) -> str:
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"curve kind must be one of {KINDS}; got {kind!r}")
    if int(num_bends) < 2:
        raise ValueError(f"a curve needs at least 2 bends (its endpoints); got num_bends={num_bends}")
    return kind


def coefficient_row(kind: str, num_bends: int, t: float) -> list[float]:
    """The n = ``num_bends`` basis coefficients c_k(t) at one t (Python floats).

    Exact one-hot rows at t = 0 and t = 1 (and, for a polychain, at every knot k / (n - 1)).
    """
    n = int(num_bends)
    t = float(t)
    if kind == "bezier":
        d = n - 1
        return [math.comb(d, k) * t**k * (1.0 - t) ** (d - k) for k in range(n)]  # 0.0 ** 0 == 1.0
    s = t * (n - 1)
    r = round(s)
    if abs(s - r) < 1e-9:  # a knot: exactly one bend
        s = float(r)
    return [max(0.0, 1.0 - abs(s - k)) for k in range(n)]


def coefficients(kind: str, num_bends: int, ts: Sequence[float] | Tensor | float) -> Tensor:
    """Basis coefficients ``[len(ts), num_bends]`` (float64) of a ``kind`` curve at times ``ts``."""
    kind = _check_kind(kind, num_bends)
    t = as_times(ts)
    return torch.tensor([coefficient_row(kind, num_bends, ti) for ti in t.tolist()], dtype=torch.float64).reshape(
        len(t), int(num_bends))


# ------------------------------------------------------------------------------------------- path

class CurvePath(Path):
    """phi(t) = sum_k c_k(t) bends[k]; ``bends[0]`` / ``bends[-1]`` are the endpoints.

    ``bends`` are state dicts over the same floating-point keys (parameters and float buffers; BatchNorm
    running statistics carried by a curve are never used: the evaluator recomputes them at every t). A
    polychain's ``knots`` are its bends' times k / (n - 1), so evaluation grids include every bend.
    ``points`` returns the bends themselves (copies, bit for bit) wherever the basis is one-hot: at t = 0
    and t = 1, and at a polychain's knots.
    """

    def __init__(self, bends: Sequence[Mapping[str, Tensor]], kind: str = "bezier", info: dict | None = None) -> None:
        super().__init__()
        self.kind = _check_kind(kind, len(bends))
        self.name = self.kind
        self.bends: list[State] = [float_state(b) for b in bends]
        for i, bend in enumerate(self.bends[1:], 1):
            check_compatible(self.bends[0], bend, what=f"bends 0 and {i}")
        n = len(self.bends)
        self.knots = [k / (n - 1) for k in range(n - 1)] + [1.0] if self.kind == "polychain" else [0.0, 1.0]
        self.info = dict(info or {})

    @classmethod
    def straight(cls, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], kind: str = "bezier",
                 num_bends: int = 3) -> "CurvePath":
        """An untrained curve: interior bends evenly spaced on the straight line (the line itself)."""
        a, b = float_state(theta_a), float_state(theta_b)
        check_compatible(a, b)
        n = int(num_bends)
        _check_kind(kind, n)
        interior = [{k: torch.lerp(a[k], b[k], i / (n - 1)) for k in a} for i in range(1, n - 1)]
        return cls([a, *interior, b], kind)

    @property
    def num_bends(self) -> int:
        return len(self.bends)

    @property
    def theta_a(self) -> State:
        return self.bends[0]

    @property
    def theta_b(self) -> State:
        return self.bends[-1]

    def coefficients(self, ts: Sequence[float] | Tensor | float) -> Tensor:
        """Basis coefficients ``[len(ts), num_bends]`` (float64)."""
        return coefficients(self.kind, self.num_bends, ts)

    def points(self, ts: Sequence[float] | Tensor) -> State:
        c = self.coefficients(ts)
        exact = [int(row.argmax()) if (row == 1).sum() == 1 and (row == 0).sum() == len(row) - 1 else None
                 for row in c]
        out: State = {}
        for key, ref in self.bends[0].items():
            w = c.to(device=ref.device, dtype=ref.dtype)
            used = [k for k in range(self.num_bends) if bool((c[:, k] != 0).any())]
            view = (-1,) + (1,) * ref.dim()
            acc = torch.zeros((len(c), *ref.shape), dtype=ref.dtype, device=ref.device)
            for k in used:
                acc.add_(w[:, k].reshape(view) * self.bends[k][key].unsqueeze(0))
            for i, k in enumerate(exact):
                if k is not None:
                    acc[i].copy_(self.bends[k][key])
            out[key] = acc
        return out

    def __repr__(self) -> str:
        return f"CurvePath(kind={self.kind!r}, bends={self.num_bends})"


def load_curve(checkpoint_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CurvePath:
    """The curve stored in a :func:`fit_curve` checkpoint (finished or not; ``info`` says how far)."""
    ckpt = torch.load(os.fspath(checkpoint_path), map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{checkpoint_path} is not a modeconn curve checkpoint")
    info = _info(ckpt["settings"], ckpt["history"], ckpt["epoch"])
    return CurvePath(ckpt["bends"], ckpt["settings"]["kind"], info=info)


# ------------------------------------------------------------------------------------------- training

def _lr(schedule: str, lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (0-based) of ``epochs`` under ``schedule`` (the trainer's schedules)."""
    return float(lr_at(TrainConfig(lr=lr, epochs=epochs, schedule=schedule), epoch))


def _info(settings: dict, history: dict, epoch: int) -> dict:
    return {"settings": dict(settings), "epochs_done": int(epoch), **{k: list(v) for k, v in history.items()}}


def _digest(flat: Tensor) -> list[float]:
    f = flat.detach().double()
    return [float(f.sum()), float(f.abs().sum()), float(torch.linalg.vector_norm(f))]


def _same_digest(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b))


def fit_curve(
    model: nn.Module,
    theta_a: Mapping[str, Tensor],
    theta_b: Mapping[str, Tensor],
    data,
    kind: str = "bezier",
    num_bends: int = 3,
    *,
    epochs: int = 30,
    lr: float = 0.05,
    wd: float = 1e-4,
    batch_size: int = 128,
    momentum: float = 0.9,
    optimizer: str = "sgd",
    schedule: str = "garipov",
    t_per_step: int = 1,
    fixed_ends: bool = True,
    augment: bool = True,
    seed: int = 0,
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

    Interior bends start evenly spaced on the straight line; endpoints stay fixed unless
    ``fixed_ends=False``. Each step draws ``t_per_step`` stratified t, t_j = (j + u_j) / m with u_j ~ U(0, 1)
    (m = 1: t ~ U(0, 1) as in the reference), and minimises the mean over them of cross-entropy +
    ``0.5 * wd * ||phi(t)||^2`` (the regulariser over the parameters; each t costs one forward/backward).
    SGD (momentum ``momentum``) or ``optimizer="adam"``; learning rate ``lr`` under ``schedule``
    (``"garipov"``: flat to 50% of the epochs, linear decay to 1% by 90%; any schedule of
    :func:`modeconn.train.lr_at`).

    ``checkpoint_path``: after every epoch the bends, optimiser state, epoch, history and RNG states are
    saved atomically; calling again with the same path resumes (bit for bit on CPU) or, for a finished
    curve, loads it without training. A non-finite epoch loss raises ``modeconn.train.NonFiniteLossError``
    and keeps the last good checkpoint. ``callback(epoch, record)`` runs after each epoch (1-based
    ``epoch``, after saving).

    Returns a :class:`CurvePath` (``name`` = kind) whose ``info`` holds per-epoch ``train_loss`` (mean
    cross-entropy), ``regularizer`` (mean 0.5 wd ||phi(t)||^2), ``lr``, ``seconds`` and ``settings``.
    """
    kind = _check_kind(kind, num_bends)
    n = int(num_bends)
    m = int(t_per_step)
    if fixed_ends and n < 3:
        raise ValueError("with fixed endpoints a curve needs num_bends >= 3 to have anything to train")
    if m < 1:
        raise ValueError(f"t_per_step must be at least 1; got {t_per_step}")
    if int(epochs) < 0 or int(batch_size) < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1; got {epochs}, {batch_size}")
    optimizer = str(optimizer).lower()
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam'; got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    settings = {"kind": kind, "num_bends": n, "epochs": int(epochs), "lr": float(lr), "wd": float(wd),
                "batch_size": int(batch_size), "momentum": float(momentum), "optimizer": optimizer,
                "schedule": str(schedule), "t_per_step": m, "fixed_ends": bool(fixed_ends),
                "augment": bool(augment), "seed": int(seed)}

    # ---- endpoints as flat vectors over the model's parameters
    a, b = float_state(theta_a), float_state(theta_b)
    check_compatible(a, b)
    names = [name for name, _ in model.named_parameters()]
    missing = [k for k in names if k not in a]
    if missing:
        raise KeyError(f"the endpoints lack the model's parameters {missing[:5]}: were they saved from this model?")
    dtypes = {a[k].dtype for k in names}
    if len(dtypes) != 1:
        raise TypeError(f"fit_curve needs parameters of one floating dtype; got {sorted(map(str, dtypes))}")
    (dtype,) = dtypes
    shapes = [a[k].shape for k in names]
    sizes = [a[k].numel() for k in names]
    home = a[names[0]].device
    dev = resolve_device(device)
    flat_a = torch.cat([a[k].reshape(-1) for k in names]).to(dev)
    flat_b = torch.cat([b[k].reshape(-1) for k in names]).to(dev)
    digest = {"a": _digest(flat_a), "b": _digest(flat_b)}
    # Trained tensor ``free``: with fixed ends, the interior bends' offsets from the straight line
    # (w_k = line_k + free[k-1]; Bernstein and hat bases reproduce the line, so phi(t) = lerp(a, b, t) +
    # sum_interior c_k(t) free[k-1]); with free ends, all bends themselves.
    free_rows = list(range(1, n - 1)) if fixed_ends else list(range(n))
    extra = [k for k in a if k not in set(names)]  # float buffers: carried on the straight line, never trained

    def bends_from(free: Tensor) -> list[State]:
        rows = {r: free[i].detach() for i, r in enumerate(free_rows)}
        out: list[State] = []
        for r in range(n):
            if r not in rows:
                out.append(a if r == 0 else b)
                continue
            row = rows[r] + torch.lerp(flat_a, flat_b, r / (n - 1)) if fixed_ends else rows[r]
            pieces = row.to(home).split(sizes)
            bend = {k: p.view(s).clone() for k, p, s in zip(names, pieces, shapes)}
            bend.update({k: torch.lerp(a[k], b[k], r / (n - 1)) for k in extra})
            out.append({k: bend[k] for k in a})  # the endpoints' key order
        return out

    # ---- resume or start
    ckpt_file = FilePath(checkpoint_path) if checkpoint_path is not None else None
    ckpt = None
    if ckpt_file is not None and ckpt_file.exists():
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_file} exists but is not a modeconn curve checkpoint")
        diff = [f"{k}: {ckpt['settings'].get(k)!r} (checkpoint) vs {settings[k]!r}" for k in _RESUME_KEYS
                if ckpt["settings"].get(k) != settings[k]]
        if diff:
            raise ValueError(f"{ckpt_file} was written with other settings ({'; '.join(diff)}); "
                             "delete it or pass another checkpoint_path")
        if not (_same_digest(ckpt["digest"]["a"], digest["a"]) and _same_digest(ckpt["digest"]["b"], digest["b"])):
            raise ValueError(f"{ckpt_file} was written for other endpoints; delete it or pass another checkpoint_path")
    history: dict[str, list[float]] = {"train_loss": [], "regularizer": [], "lr": [], "seconds": []}
    start = 0
    if ckpt is not None:
        history = {k: list(v) for k, v in ckpt["history"].items()}
        start = int(ckpt["epoch"])
        free = ckpt["free"].to(dev)
    elif fixed_ends:
        free = torch.zeros(n - 2, flat_a.numel(), dtype=dtype, device=dev)
    else:
        free = torch.stack([torch.lerp(flat_a, flat_b, r / (n - 1)) for r in free_rows])
    free.requires_grad_(True)
    resumed_from = start if ckpt is not None else None

    def finish(free: Tensor, epoch: int) -> CurvePath:
        info = _info(settings, history, epoch)
        info.update(resumed_from=resumed_from, checkpoint=os.fspath(ckpt_file) if ckpt_file else None)
        return CurvePath(bends_from(free), kind, info=info)

    if start >= settings["epochs"]:
        return finish(free, start)

    buffers = {k: v.detach().clone().to(dev) for k, v in model.named_buffers()}
    if optimizer == "sgd":
        opt = torch.optim.SGD([free], lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam([free], lr=lr)
    t_gen = torch.Generator().manual_seed(int(seed))
    data_gen = torch.Generator().manual_seed(int(seed) + 1)
    if isinstance(data, Dataset):
        data = data.to(dev)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(v) for v in data):
        data = (data[0].to(dev), data[1].to(dev))
    skip_singletons = has_batchnorm(model)
    cuda = dev.type == "cuda"
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    decay = float(wd) / m

    def point(t: list[float]) -> Tensor:
        """phi at the m times ``t``: ``[D]`` for one t, ``[m, D]`` otherwise (cheapest ops for each case)."""
        rows = [coefficient_row(kind, n, ti) for ti in t]
        if not fixed_ends:
            c = torch.tensor(rows, dtype=dtype).to(dev, non_blocking=True)
            return (c @ free).view(-1) if m == 1 else c @ free
        if m == 1:
            base = torch.lerp(flat_a, flat_b, t[0])
            if n == 3:
                return base.add_(free.view(-1), alpha=rows[0][1])  # in place: one buffer less
            c = torch.tensor([r[1:-1] for r in rows], dtype=dtype).to(dev, non_blocking=True)
            return torch.addmm(base.unsqueeze(0), c, free).view(-1)
        w = torch.tensor(t, dtype=dtype).to(dev, non_blocking=True).unsqueeze(1)
        c = torch.tensor([r[1:-1] for r in rows], dtype=dtype).to(dev, non_blocking=True)
        return torch.addmm(torch.lerp(flat_a.unsqueeze(0), flat_b.unsqueeze(0), w), c, free)

    def step_loss(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over m stratified t (with the regulariser's gradient attached) and the
        regulariser's value."""
        u = torch.rand(m, generator=t_gen, dtype=torch.float64).tolist()
        phi = point([(j + uj) / m for j, uj in enumerate(u)])
        flat = phi.detach()
        # 0.5 * wd * ||phi||^2 (mean over the m points): its gradient wd * phi / m is added to phi's
        # gradient by a hook (one fused op) instead of differentiating the square; the value is reported.
        with torch.no_grad():
            reg = (0.5 * decay) * (torch.dot(flat, flat) if m == 1 else (flat * flat).sum())
        if decay:
            phi.register_hook(lambda g: g.add(flat, alpha=decay))
        ce = 0.0
        for p in (phi,) if m == 1 else phi.unbind(0):
            params = {k: v.view(s) for k, v, s in zip(names, p.split(sizes), shapes)}
            ce = ce + F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)
        return ce / m, reg

    was_training = model.training
    bar = tqdm(total=settings["epochs"], initial=start, desc=f"curve {kind}", disable=not progress)
    fork_devices = [dev] if cuda else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.default_generator.manual_seed(int(seed))  # dropout; the caller's RNG is restored after
            if cuda:
                with torch.cuda.device(dev):
                    torch.cuda.manual_seed(int(seed))
            if ckpt is not None:
                rng = ckpt["rng"]
                t_gen.set_state(rng["t"])
                data_gen.set_state(rng["data"])
                torch.set_rng_state(rng["torch"])
                if cuda and rng.get("cuda") is not None:
                    torch.cuda.set_rng_state(rng["cuda"], dev)
            model.train()
            for epoch in range(start, settings["epochs"]):
                started = time.perf_counter()
                lr_now = _lr(schedule, lr, epoch, settings["epochs"])
                for group in opt.param_groups:
                    group["lr"] = lr_now
                ce_sum = torch.zeros((), dtype=torch.float64, device=dev)
                reg_sum = torch.zeros((), dtype=torch.float64, device=dev)
                count = steps = 0
                for x, y in iter_batches(data, batch_size, shuffle=True, generator=data_gen, augment=augment,
                                         device=dev):
                    if skip_singletons and len(y) < 2:
                        continue
                    ce, reg = step_loss(x, y)
                    opt.zero_grad(set_to_none=True)
                    ce.backward()
                    opt.step()
                    ce_sum += ce.detach().double() * len(y)
                    reg_sum += reg.double()
                    count += len(y)
                    steps += 1
                if steps == 0:
                    raise ValueError("fit_curve: the data yielded no training batches")
                mean_ce, mean_reg = float(ce_sum) / count, float(reg_sum) / steps
                if not (math.isfinite(mean_ce) and math.isfinite(mean_reg) and bool(torch.isfinite(free).all())):
                    kept = f"the last good checkpoint (epoch {_saved_epoch(ckpt_file)}) is kept at {ckpt_file}" \
                        if ckpt_file is not None and ckpt_file.exists() else "no checkpoint was written"
                    raise NonFiniteLossError(
                        f"curve training diverged: non-finite loss in epoch {epoch + 1} of {settings['epochs']} "
                        f"(lr {lr_now:g}); {kept}. Lower the learning rate.")
                history["train_loss"].append(mean_ce)
                history["regularizer"].append(mean_reg)
                history["lr"].append(lr_now)
                history["seconds"].append(time.perf_counter() - started)
                if ckpt_file is not None:
                    rng = {"t": t_gen.get_state(), "data": data_gen.get_state(), "torch": torch.get_rng_state(),
                           "cuda": torch.cuda.get_rng_state(dev) if cuda else None}
                    ckpt_file.parent.mkdir(parents=True, exist_ok=True)
                    atomic_torch_save({
                        "format": CHECKPOINT_FORMAT, "settings": settings, "digest": digest, "epoch": epoch + 1,
                        "free": free.detach().cpu().clone(),
                        "bends": [{k: v.detach().cpu() for k, v in bend.items()} for bend in bends_from(free)],
                        "optimizer": opt.state_dict(), "rng": rng, "history": history}, ckpt_file)
                bar.update(1)
                bar.set_postfix(loss=f"{mean_ce:.4f}", reg=f"{mean_reg:.4f}", lr=f"{lr_now:.3g}")
                if callback is not None:
                    callback(epoch + 1, {k: v[-1] for k, v in history.items()})
    finally:
        bar.close()
        model.train(was_training)
    return finish(free, settings["epochs"])


def _saved_epoch(ckpt_file: FilePath | None) -> int | None:
    """The number of finished epochs recorded in a curve checkpoint (None without one)."""
    if ckpt_file is None or not FilePath(ckpt_file).exists():
        return None
    return int(torch.load(ckpt_file, map_location="cpu", weights_only=False)["epoch"])
