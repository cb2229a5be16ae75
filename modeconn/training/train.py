"""One solution per seed: resumable, NaN-safe training of a plain ``nn.Module``.

``train(model, data, cfg, seed, checkpoint_path=...)`` runs :class:`EndpointStep` (cross-entropy of the
model on a batch) on the one training loop, :class:`modeconn.training.loop.Loop`: SGD or Adam, a per-epoch learning
rate schedule (:func:`lr_at`), ``<checkpoint_path>.resume.pt`` after every epoch (model, optimizer, epoch
and RNG states) so that an interrupted run continues where it stopped and ends with bitwise the same
weights on the CPU. At the end the checkpoint is saved with :func:`modeconn.io.checkpoint.save_checkpoint`.
A finished checkpoint is never overwritten: calling ``train`` again loads it and returns its metrics.

The model is *not* re-initialised here: build it under ``torch.manual_seed(seed)`` for a
seed-determined initialisation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modeconn import data as mdata
from modeconn.params.batchnorm import has_batchnorm, recompute_statistics
from modeconn.io.checkpoint import fingerprint, load_checkpoint, read_meta, save_checkpoint
from modeconn.params.checks import check_model_data
from modeconn.training.loop import OPTIMIZERS, SCHEDULES, Loop, NonFiniteLossError, Resume, Schedule, make_optimizer, resume_path

__all__ = [
    "TrainConfig",
    "NonFiniteLossError",
    "lr_at",
    "train",
    "evaluate_model",
    "resume_path",
    "check_reusable",
    "OPTIMIZERS",
    "SCHEDULES",
]

log = logging.getLogger(__name__)

_RESUME_FORMAT = "modeconn.training.train/2"

BN_ITEMS = 2048  # training inputs for BatchNorm statistics; the evaluator's default bn_items


@dataclass
class TrainConfig:
    """Training hyper-parameters (the ``trainer`` config group)."""

    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    epochs: int = 30
    batch_size: int = 128
    schedule: str = "garipov"  # constant | step | cosine | garipov
    step_size: int = 30  # step: multiply the lr by gamma every step_size epochs
    gamma: float = 0.5
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the bad key and the allowed values; return ``self``."""

        def bad(key: str, allowed: str, got: Any) -> ValueError:
            return ValueError(f"trainer.{key} must be {allowed}; got {got!r}")

        def number(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", "one of " + ", ".join(OPTIMIZERS), self.optimizer)
        if self.schedule not in SCHEDULES:
            raise bad("schedule", "one of " + ", ".join(SCHEDULES), self.schedule)
        if not (number(self.lr) and self.lr > 0):
            raise bad("lr", "a finite number > 0", self.lr)
        if not (number(self.momentum) and 0 <= self.momentum < 1):
            raise bad("momentum", "a number in [0, 1)", self.momentum)
        if not (number(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "a number >= 0", self.weight_decay)
        if not (integer(self.epochs) and self.epochs >= 1):
            raise bad("epochs", "an integer >= 1", self.epochs)
        if not (integer(self.batch_size) and self.batch_size >= 1):
            raise bad("batch_size", "an integer >= 1", self.batch_size)
        if not (integer(self.step_size) and self.step_size >= 1):
            raise bad("step_size", "an integer >= 1", self.step_size)
        if not (number(self.gamma) and 0 < self.gamma <= 1):
            raise bad("gamma", "a number in (0, 1]", self.gamma)
        dev = str(self.device)
        if not (isinstance(self.device, (str, torch.device)) and (dev == "auto" or dev.split(":")[0] in ("cpu", "cuda", "mps"))):
            raise bad("device", "auto, cpu, cuda or cuda:N", self.device)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lr_schedule(self) -> Schedule:
        """The per-epoch learning rate these settings ask for."""
        return Schedule(self.schedule, self.lr, self.epochs, self.step_size, self.gamma)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. an OmegaConf node); unknown keys raise ``ValueError``."""
        d = dict(d)
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown trainer key(s) {unknown}; allowed: {', '.join(allowed)}")
        return cls(**d)


def lr_at(cfg: TrainConfig, epoch: float) -> float:
    """The learning rate of ``cfg`` at (fractional) epoch ``epoch`` (see :class:`modeconn.training.loop.Schedule`)."""
    return cfg.lr_schedule().at(epoch)


# --------------------------------------------------------------------------- evaluation


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    data: Any,
    split: str = "train",
    batch_size: int = 1024,
    device: Any = None,
) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on ``data`` (a ``Dataset``'s ``split``, an
    ``(inputs, targets)`` pair or an iterable of batches), in eval mode, without gradients and without
    augmentation. ``device`` defaults to the model's. The model's train/eval mode is restored."""
    device = _model_device(model) if device is None else mdata.resolve_device(device)
    was_training = model.training
    model.eval()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        n = 0
        for x, y in mdata.iter_batches(data, batch_size, split=split, shuffle=False, augment=False, device=device):
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError(f"evaluate_model: no examples in {mdata.describe(data)} (split {split!r})")
    return loss_sum.item() / n, correct.item() / n


# --------------------------------------------------------------------------- training


class EndpointStep:
    """The step of endpoint (and narrow-network) training: cross-entropy of ``model`` on a batch, in place."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        return loss, {"loss": loss.detach().double() * len(y), "correct": (out.detach().argmax(1) == y).sum()}

    def summary(self, sums: Mapping[str, torch.Tensor], examples: int, steps: int) -> dict[str, float]:
        return {"loss": sums["loss"].item() / examples, "acc": sums["correct"].item() / examples}


def _identity(cfg: TrainConfig, seed: int, extra: Mapping[str, Any] | None = None) -> dict:
    """What makes a training run this run: the seed, every trainer setting but the device, and the caller's
    ``extra`` plain values (the model's and data's options, threads, device type, torch version)."""
    return {"seed": seed, **{f"trainer.{k}": v for k, v in cfg.to_dict().items() if k != "device"}, **(extra or {})}


def _differences(theirs: Mapping[str, Any], ours: Mapping[str, Any], legacy: bool) -> list[str]:
    return [f"{k} {theirs.get(k)!r} vs {v!r}" for k, v in ours.items()
            if theirs.get(k) != v and not (legacy and theirs.get(k) is None)]


def _check_same_run(path: Path, saved: Mapping[str, Any], cfg: TrainConfig, seed: int,
                    extra: Mapping[str, Any] | None = None) -> None:
    ours = _identity(cfg, seed, extra)
    if isinstance(saved.get("identity"), Mapping):
        diffs = _differences(saved["identity"], ours, legacy=False)
    else:  # written before identities were recorded: the seed and trainer settings it has
        theirs = {"seed": saved.get("seed"), **{f"trainer.{k}": v for k, v in (saved.get("config") or {}).items()}}
        diffs = _differences(theirs, _identity(cfg, seed), legacy=True)
    if diffs:
        raise ValueError(
            f"finished checkpoint {path} belongs to a different run (first difference: {diffs[0].split(' ')[0]}; "
            f"{'; '.join(diffs)}; saved vs requested). Use another checkpoint path, or delete the file to start over."
        )


def check_reusable(model: nn.Module, cfg: TrainConfig, seed: int, checkpoint_path: str | os.PathLike,
                   identity: Mapping[str, Any] | None = None) -> str | None:
    """What :func:`train` would find at ``checkpoint_path`` for this run, checked without training: ``"finished"``,
    ``"resume"`` (an interrupted run of the same settings), or None (nothing yet). A finished checkpoint or
    resume file of another run, or of another architecture, raises as :func:`train` would, so a caller
    can refuse a run before writing anything."""
    ckpt = Path(checkpoint_path)
    saved = read_meta(ckpt)
    if saved is not None and saved.get("finished"):
        _check_same_run(ckpt, saved, cfg, seed, identity)
        load_checkpoint(ckpt, model)  # readable, of this architecture
        return "finished"
    resume = Resume(resume_path(ckpt), _RESUME_FORMAT, _identity(cfg, seed, identity), architecture=fingerprint(model))
    return "resume" if resume.read() is not None else None


def train(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig,
    seed: int,
    checkpoint_path: str | os.PathLike | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
    eval_data: Any = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> dict:
    """Train ``model`` in place on ``data`` and return ``{train_loss, train_acc, test_loss, test_acc,
    epochs}`` (final values in eval mode; the ``test_*`` ones are ``None`` without test data).

    ``data``: a ``modeconn.data.Dataset`` (its train split is shuffled by the loop's generator seeded
    with ``seed`` and augmented when the dataset asks for it; its test split gives the test metrics), an
    ``(inputs, targets)`` pair (shuffled, not augmented) or a re-iterable of batches (used as given).
    ``eval_data`` (a Dataset, whose test split is used, a pair or batches) gives the test metrics
    instead. Dropout draws from torch's global RNG seeded with ``seed`` for the run only
    (:func:`modeconn.training.loop.global_rng`): the caller's RNG state is left as it was.

    With ``checkpoint_path``: ``<checkpoint_path>.resume.pt`` is written after every epoch and picked
    up by a later call (bitwise-identical final weights on the CPU); at the end the checkpoint and its
    JSON sidecar are written (``meta`` plus config, seed, metrics, fingerprint, history) and the resume
    file removed. If the checkpoint already holds a finished run, it is loaded into ``model`` and its
    metrics returned without training. ``on_epoch_end(epoch, stats)`` is called after each epoch
    (1-based, after the resume file is written). ``identity``: more plain values that determine the result
    (``{"model.dropout": 0.5, "threads": 1, ...}``), recorded and compared with the seed and trainer settings
    before a finished checkpoint or a resume file is reused (a difference raises ``ValueError`` naming the
    first differing key). Raises ``NonFiniteLossError`` on a NaN/inf batch loss,
    leaving the last resume file untouched.
    """
    cfg.validate()
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    check_model_data(model, data)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    resume = resume_path(ckpt) if ckpt is not None else None
    device = mdata.resolve_device(cfg.device)

    # ---- a finished run is never retrained nor overwritten
    if ckpt is not None:
        saved = read_meta(ckpt)
        if saved is not None and saved.get("finished"):
            _check_same_run(ckpt, saved, cfg, seed, identity)
            state, saved = load_checkpoint(ckpt, model)
            model.load_state_dict(state)
            model.to(device)
            log.info("reusing finished run %s (seed %s); not retraining", ckpt, seed)
            if resume.exists():
                resume.unlink()
            return dict(saved["metrics"])

    model.to(device)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, cfg.lr,
                               cfg.momentum, cfg.weight_decay, key="trainer.optimizer")
    loop = Loop(EndpointStep(model), optimizer, cfg.lr_schedule(), data, cfg.batch_size, seed, device,
                augment=True, progress=progress, label=f"train seed {seed}", lr_option="trainer.lr",
                callbacks=[on_epoch_end] if on_epoch_end is not None else [],
                resume=None if resume is None else Resume(resume, _RESUME_FORMAT, _identity(cfg, seed, identity),
                                                          architecture=fingerprint(model)))
    model.train()
    history = loop.run()
    is_dataset = isinstance(data, mdata.Dataset)

    # ---- BatchNorm statistics recomputed exactly as the path evaluator does at t = 0 and 1, so an
    # endpoint's recorded metrics are the ones its path reproduces; then final metrics in eval mode
    if has_batchnorm(model):
        bn_inputs, _ = mdata.materialize(data, "train", max_items=BN_ITEMS, device=device)
        recompute_statistics(model, bn_inputs)
    train_loss, train_acc = evaluate_model(model, data, split="train", device=device)
    test_source = eval_data if eval_data is not None else (data if is_dataset else None)
    test_loss = test_acc = None
    if test_source is not None:
        split = "test" if isinstance(test_source, mdata.Dataset) else "train"
        test_loss, test_acc = evaluate_model(model, test_source, split=split, device=device)
    metrics = {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "epochs": cfg.epochs,
    }
    if not all(math.isfinite(v) for v in (train_loss, test_loss) if v is not None):
        raise NonFiniteLossError(
            f"final evaluation loss is not finite (train {train_loss}, test {test_loss}, seed {seed}); "
            f"lower trainer.lr (e.g. to {cfg.lr / 10:g})"
        )

    if ckpt is not None:
        full_meta = dict(meta or {})
        full_meta.update(
            {
                "finished": True,
                "config": cfg.to_dict(),
                "seed": seed,
                "metrics": metrics,
                "model_fingerprint": fingerprint(model),
                "history": history,
                "torch_version": torch.__version__,
                "identity": _identity(cfg, seed, identity),
            }
        )
        save_checkpoint(ckpt, model.state_dict(), full_meta)
        if resume.exists():
            resume.unlink()
        log.info(
            "saved %s: train loss %.4f acc %.4f%s",
            ckpt,
            train_loss,
            train_acc,
            f", test loss {test_loss:.4f} acc {test_acc:.4f}" if test_loss is not None else "",
        )
    return metrics
