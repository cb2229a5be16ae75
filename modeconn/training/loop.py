"""One training loop for everything modeconn trains: endpoints, curves and the narrow network.

A :class:`Loop` owns what every training run shares: the epochs, the learning-rate :class:`Schedule`, the
shuffled (and, when asked, augmented) batches, the tqdm progress bar, the NaN policy, atomic resume and
per-epoch callbacks. What is trained and what a batch's loss is belongs to a :class:`Step` (endpoints:
:mod:`modeconn.training.train`; curves: :mod:`modeconn.paths.curves`).

Randomness is owned by the loop and never reseeds the caller's RNG: shuffling and augmentation draw from
the loop's ``"data"`` :class:`torch.Generator`, a step's own draws (a curve's t) from generators it hands
the loop (``generators=``, saved and restored with the others), and modules that can only use torch's global RNG (dropout) run
inside :func:`global_rng`, which seeds the global RNG for the loop's duration and restores the caller's
state afterwards. All of these states go into the resume file.

The resume file (written with :func:`~modeconn.io.checkpoint.atomic_torch_save` after every epoch, read with
:func:`~modeconn.io.checkpoint.safe_load`, so weights-only) holds only tensors, plain containers, numbers and
strings: ``format``, ``epoch``, the step's ``state``, the ``optimizer`` state, the ``rng`` states, the
per-epoch ``history``, the run's ``identity`` (plain values that must match to continue) and the step's
``extra`` content. A run resumed from it ends with bitwise the weights of an uninterrupted one on the CPU.

NaN policy: a non-finite batch loss or non-finite trained tensors stop the run with
:class:`NonFiniteLossError` at the end of that epoch (one device sync per epoch, not per batch); the
resume file keeps the last good epoch and the message says so.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from modeconn import data as mdata
from modeconn.io.checkpoint import CheckpointMismatchError, atomic_torch_save, describe_mismatch, safe_load
from modeconn.io.jsonfile import Required, UnreadableFileError, check_shape

__all__ = ["Loop", "Step", "Resume", "Schedule", "NonFiniteLossError", "OPTIMIZERS", "SCHEDULES",
           "make_optimizer", "global_rng"]

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine", "garipov")


class NonFiniteLossError(RuntimeError):
    """A training batch produced a NaN or infinite loss (the run diverged)."""


# --------------------------------------------------------------------------- schedule and optimiser


@dataclass(frozen=True)
class Schedule:
    """A per-epoch learning rate: ``lr`` shaped by ``kind`` over ``epochs`` epochs.

    * ``constant``: ``lr``;
    * ``step``: ``lr * gamma ** floor(epoch / step_size)``;
    * ``cosine``: ``lr * (1 + cos(pi * epoch / epochs)) / 2``;
    * ``garipov`` (Garipov et al. 2018, their ``learning_rate_schedule``): with ``t = (epoch + 1) / epochs``
      (the reference counts epochs from 1, so the last epoch has ``t = 1``), ``lr`` for ``t <= 0.5``, then
      linearly down to ``0.01 * lr`` at ``t = 0.9``, then ``0.01 * lr``.

    The loop sets it at the start of every epoch (``epoch`` = the 0-based index), as the reference does.
    """

    kind: str
    lr: float
    epochs: int
    step_size: int = 30
    gamma: float = 0.5

    def at(self, epoch: float) -> float:
        """The learning rate at (fractional) epoch ``epoch`` (0 = start of training)."""
        epoch = max(float(epoch), 0.0)
        if self.kind == "constant":
            factor = 1.0
        elif self.kind == "step":
            factor = self.gamma ** math.floor(epoch / self.step_size)
        elif self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * min(epoch / self.epochs, 1.0)))
        elif self.kind == "garipov":
            t = (epoch + 1.0) / self.epochs  # the reference's 1-based epoch
            factor = 1.0 if t <= 0.5 else 1.0 - (t - 0.5) / 0.4 * 0.99 if t <= 0.9 else 0.01
        else:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.kind!r}")
        return self.lr * factor


def make_optimizer(params: Sequence[Tensor], name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, key: str = "optimizer") -> torch.optim.Optimizer:
    """SGD with ``momentum`` or Adam over ``params``; ``key`` names the option in the error for another name."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"{key} must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


# --------------------------------------------------------------------------- randomness


@contextlib.contextmanager
def global_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block with torch's global RNG (the CPU one, and ``device``'s when it is a GPU) seeded by
    ``seed``; the caller's RNG state is restored afterwards, so nothing outside the block is reseeded."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda" if cuda else None):
        torch.default_generator.manual_seed(int(seed))
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(int(seed))
        yield


# --------------------------------------------------------------------------- the step and the resume file


class Step(Protocol):
    """What one training run trains, and the loss of one batch."""

    def state(self) -> dict[str, Tensor]:
        """The trained tensors, saved in the resume file after every epoch."""

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state` from a resume file."""

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss to minimise on batch ``(x, y)`` and the batch's contributions to the epoch's sums."""

    def summary(self, sums: Mapping[str, Tensor], examples: int, steps: int) -> dict[str, float]:
        """The epoch's record (e.g. mean loss) from its sums over ``steps`` batches of ``examples`` in all."""


#: what a :class:`Loop`'s resume file must hold (:func:`modeconn.io.jsonfile.check_shape`; tensors by type)
LOOP_SHAPE = {"epoch": Required(int), "state": Required({str: Tensor}), "optimizer": Required(dict),
              "rng": Required({"generators": Required({str: Tensor}), "global": Required(Tensor),
                               "cuda": (Tensor, type(None))}),
              "history": [dict], "identity": Required(dict), "architecture": (dict, type(None))}


@dataclass
class Resume:
    """Where a loop saves its progress and what identifies the run it belongs to.

    ``identity``: plain values (seed, settings) that must be equal to continue from the file;
    ``architecture``: a :func:`~modeconn.io.checkpoint.fingerprint` that must match (``CheckpointMismatchError``
    otherwise); ``extra``: a function giving more plain content written with every epoch (a curve's bends);
    ``shape``: what the file must hold (default :data:`LOOP_SHAPE`), else one error naming the file and entry.
    """

    file: Path
    format: str
    identity: dict
    what: str = "resume file"
    architecture: dict | None = None
    extra: Callable[[], dict] | None = None
    shape: dict | None = None

    def unusable(self, problem: str) -> UnreadableFileError:
        """The error for a file of this run's format that cannot be continued from (``problem`` says why)."""
        return UnreadableFileError(f"{self.what} {self.file} {problem}; delete it to start that step over")

    def read(self) -> dict | None:
        """The saved progress of this run (``None`` without a file); refuses another run's file."""
        if not self.file.exists():
            return None
        saved = safe_load(self.file, what=self.what, restart_hint=True)
        if not isinstance(saved, dict) or saved.get("format") != self.format:
            raise ValueError(f"{self.what} {self.file} is not a {self.format} file (written by another program or "
                             "modeconn version); delete it to start that step over")
        problem = check_shape(saved, LOOP_SHAPE if self.shape is None else self.shape)
        if problem:
            raise self.unusable(f"has the wrong shape ({problem})")
        theirs = saved["identity"]
        diffs = [f"{k} {theirs.get(k)!r} vs {v!r}" for k, v in self.identity.items() if theirs.get(k) != v]
        if diffs:
            raise ValueError(f"{self.what} {self.file} belongs to a different run ({'; '.join(diffs)}; saved vs "
                             "requested). Use another checkpoint path, or delete the file to start over.")
        fp = saved.get("architecture")
        if self.architecture is not None and fp is not None and fp.get("digest") != self.architecture["digest"]:
            raise CheckpointMismatchError(f"{self.what} {self.file} was made for a different architecture than the "
                                          "config's model: " + describe_mismatch(self.architecture, fp))
        return saved


# --------------------------------------------------------------------------- the loop


class Loop:
    """Train ``step`` for ``schedule.epochs`` epochs of shuffled batches of ``data`` with ``optimizer``.

    ``data``: a :class:`~modeconn.data.Dataset` (its train split, augmented when ``augment`` and the dataset
    asks for it), an ``(inputs, targets)`` pair, or a re-iterable of batches (used as given). ``seed`` seeds
    the global RNG the modules see (dropout) and, unless ``data_seed`` is given, the ``"data"`` generator
    (shuffling, augmentation); ``generators`` are the step's own (e.g. ``{"t": ...}``), saved with it.
    ``min_batch`` drops smaller batches (a short last batch that BatchNorm, or a split, cannot use). ``label`` names the
    run in the progress bar, the log and errors; ``lr_option`` is the option a divergence message tells
    the user to lower. ``callbacks`` are called as ``callback(epoch, record)`` after each epoch (1-based,
    after the resume file is written).
    """

    def __init__(self, step: Step, optimizer: torch.optim.Optimizer, schedule: Schedule, data: Any,
                 batch_size: int, seed: int, device: torch.device, *, data_seed: int | None = None,
                 generators: Mapping[str, torch.Generator] | None = None, augment: bool = False,
                 min_batch: int = 1, resume: Resume | None = None,
                 progress: bool = True, label: str = "training", lr_option: str = "the learning rate",
                 callbacks: Sequence[Callable[[int, dict], None]] = ()) -> None:
        self.step, self.optimizer, self.schedule = step, optimizer, schedule
        self.device = torch.device(device)
        self.data = _on_device(data, self.device)
        if not _reiterable(self.data) and schedule.epochs > 1:
            raise TypeError(f"data is a one-shot iterator ({type(data).__name__}) but {schedule.epochs} epochs "
                            "were asked for; pass a Dataset, an (inputs, targets) pair or a re-iterable (e.g. a "
                            "list) of batches")
        self.batch_size, self.seed, self.augment = int(batch_size), int(seed), bool(augment)
        self.min_batch, self.resume, self.progress = int(min_batch), resume, progress
        self.label, self.lr_option, self.callbacks = label, lr_option, list(callbacks)
        self.generators = {"data": torch.Generator().manual_seed(self.seed if data_seed is None else data_seed),
                           **(generators or {})}
        self.history: list[dict] = []
        self.epoch = 0
        self.resumed_from: int | None = None
        self._saved: dict | None = resume.read() if resume is not None else None
        if self._saved is not None:
            self.epoch = int(self._saved["epoch"])
            self.history = list(self._saved.get("history", []))

    @property
    def finished(self) -> bool:
        return self.epoch >= self.schedule.epochs

    def run(self) -> list[dict]:
        """Train the remaining epochs (none for a finished run); returns the per-epoch history."""
        if self._saved is not None:
            try:  # a file of this run's identity whose tensors do not fit (edited, or another layout)
                self.step.load_state(self._saved["state"])
                if not self.finished:
                    self.optimizer.load_state_dict(self._saved["optimizer"])
            except (RuntimeError, KeyError, TypeError, ValueError) as e:
                raise self.resume.unusable(f"does not fit this run ({str(e).splitlines()[0][:200]})") from None
            self.resumed_from = self.epoch
            log.info("%s: %s epoch %d of %d (%s)", self.label, "finished at" if self.finished else "resumed from",
                     self.epoch, self.schedule.epochs, self.resume.file)
        if self.finished:
            return self.history
        bar = tqdm(total=self.schedule.epochs, initial=self.epoch, desc=self.label, unit="epoch", leave=False,
                   disable=not self.progress)
        try:
            with global_rng(self.seed, self.device):
                if self._saved is not None:
                    try:
                        self._set_rng(self._saved["rng"])
                    except (RuntimeError, KeyError, TypeError) as e:
                        raise self.resume.unusable(f"holds unusable random states ({str(e).splitlines()[0][:200]})"
                                                   ) from None
                self._saved = None
                while not self.finished:
                    record = self._epoch()
                    self.history.append(record)
                    self.epoch += 1
                    if self.resume is not None:
                        self._save()
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k not in ("epoch", "seconds")})
                    for callback in self.callbacks:
                        callback(self.epoch, dict(record))
        finally:
            bar.close()
        return self.history

    # ---- one epoch

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = mdata.iter_batches(self.data, self.batch_size, split="train", shuffle=True,
                                     generator=self.generators["data"], augment=self.augment, device=self.device)
        return (b for b in batches if len(b[1]) >= self.min_batch) if self.min_batch > 1 else batches

    def _epoch(self) -> dict:
        started = time.perf_counter()
        lr = self.schedule.at(self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, Tensor] = {}
        examples = steps = 0
        first_bad = bad_loss = None  # the first non-finite batch loss, tracked on the device (no sync)
        for x, y in self._batches():
            loss, batch_sums = self.step.loss(x, y)
            finite = torch.isfinite(loss.detach())
            if first_bad is None:
                first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
                bad_loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
            new = (first_bad < 0) & ~finite
            first_bad = torch.where(new, steps, first_bad)
            bad_loss = torch.where(new, loss.detach(), bad_loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for k, v in batch_sums.items():
                sums[k] = sums[k] + v if k in sums else v
            examples += len(y)
            steps += 1
        if steps == 0:
            raise ValueError(f"{self.label}: the training data yielded no batches in epoch {self.epoch + 1}")
        if int(first_bad) >= 0:
            self._diverged(lr, f"the loss became {float(bad_loss)} at epoch {self.epoch + 1}/{self.schedule.epochs}, "
                               f"batch {int(first_bad) + 1}")
        record = {"epoch": self.epoch + 1, "lr": lr, **self.step.summary(sums, examples, steps)}
        trained_finite = all(bool(torch.isfinite(t).all()) for t in self.step.state().values() if t.is_floating_point())
        if not (trained_finite and all(math.isfinite(v) for v in record.values())):
            self._diverged(lr, f"non-finite values appeared in epoch {self.epoch + 1}/{self.schedule.epochs}")
        record["seconds"] = time.perf_counter() - started
        return record

    def _diverged(self, lr: float, what: str) -> None:
        if self.resume is None:
            kept = ""
        elif self.resume.file.exists():
            kept = f" The {self.resume.what} {self.resume.file} still holds the last finished epoch ({self.epoch})."
        else:
            kept = f" No epoch had finished, so there is no {self.resume.what}."
        raise NonFiniteLossError(
            f"{self.label} diverged: {what} (lr={lr:g}, seed {self.seed}); lower {self.lr_option} "
            f"(e.g. to {self.schedule.lr / 10:g}) or use a gentler schedule.{kept}")

    # ---- resume file

    def _rng(self) -> dict:
        cuda = self.device.type == "cuda"
        return {"generators": {k: g.get_state() for k, g in self.generators.items()},
                "global": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}

    def _set_rng(self, rng: Mapping[str, Any]) -> None:
        for k, state in rng["generators"].items():
            self.generators[k].set_state(state)
        torch.set_rng_state(rng["global"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _save(self) -> None:
        resume = self.resume
        payload = {"format": resume.format, "epoch": self.epoch,
                   "state": {k: v.detach().cpu() for k, v in self.step.state().items()},
                   "optimizer": self.optimizer.state_dict(), "rng": self._rng(), "history": self.history,
                   "identity": resume.identity, "architecture": resume.architecture}
        if resume.extra is not None:
            payload.update(resume.extra())
        atomic_torch_save(payload, resume.file)


def _on_device(data: Any, device: torch.device) -> Any:
    """A Dataset or a pair of tensors moved to ``device`` once (batches of other iterables move one by one)."""
    if isinstance(data, mdata.Dataset):
        return data.to(device)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(v) for v in data):
        return data[0].to(device), data[1].to(device)
    return data


def _reiterable(data: Any) -> bool:
    if isinstance(data, mdata.Dataset):
        return True
    try:
        return iter(data) is not data
    except TypeError:
        return False


def resume_path(checkpoint_path: str | os.PathLike) -> Path:
    """The resume file of ``checkpoint_path``: ``<checkpoint_path>.resume.pt``."""
    return Path(str(os.fspath(checkpoint_path)) + ".resume.pt")
