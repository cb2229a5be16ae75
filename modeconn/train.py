"""One solution per seed: resumable, NaN-safe training of a plain ``nn.Module``.

``train(model, data, cfg, seed, checkpoint_path=...)`` trains with SGD or Adam and a per-epoch learning
rate schedule (:func:`lr_at`), writes ``<checkpoint_path>.resume.pt`` after every epoch (model,
optimizer, epoch, shuffling/augmentation generator and torch RNG state) so that an interrupted run
continues where it stopped and ends with bitwise the same weights on the CPU, and finally saves the
checkpoint with :func:`modeconn.checkpoint.save_checkpoint`. A finished checkpoint is never
overwritten: calling ``train`` again loads it and returns its metrics.

The model is *not* re-initialised here: build it under ``torch.manual_seed(seed)`` for a
seed-determined initialisation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modeconn import data as mdata
from modeconn.batchnorm import has_batchnorm, recompute_statistics
from modeconn.checkpoint import (
    CheckpointMismatchError,
    atomic_torch_save,
    describe_mismatch,
    fingerprint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)

__all__ = [
    "TrainConfig",
    "NonFiniteLossError",
    "lr_at",
    "train",
    "evaluate_model",
    "resume_path",
    "OPTIMIZERS",
    "SCHEDULES",
]

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine", "garipov")
_RESUME_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """A training batch produced a NaN or infinite loss (the run diverged)."""


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
    """The learning rate at (fractional) epoch ``epoch`` (0 = start of training).

    * ``constant``: ``lr``;
    * ``step``: ``lr * gamma ** floor(epoch / step_size)``;
    * ``cosine``: ``lr * (1 + cos(pi * epoch / epochs)) / 2``;
    * ``garipov`` (Garipov et al. 2018): with ``t = epoch / epochs``, ``lr`` for ``t <= 0.5``, then
      linearly down to ``0.01 * lr`` at ``t = 0.9``, then ``0.01 * lr``.

    ``train`` sets it at the start of every epoch (``epoch`` = the 0-based epoch index), as the
    reference implementation does.
    """
    epoch = max(float(epoch), 0.0)
    if cfg.schedule == "constant":
        factor = 1.0
    elif cfg.schedule == "step":
        factor = cfg.gamma ** math.floor(epoch / cfg.step_size)
    elif cfg.schedule == "cosine":
        t = min(epoch / cfg.epochs, 1.0)
        factor = 0.5 * (1.0 + math.cos(math.pi * t))
    elif cfg.schedule == "garipov":
        t = epoch / cfg.epochs
        if t <= 0.5:
            factor = 1.0
        elif t <= 0.9:
            factor = 1.0 - (t - 0.5) / 0.4 * 0.99
        else:
            factor = 0.01
    else:
        raise ValueError(f"trainer.schedule must be one of {', '.join(SCHEDULES)}; got {cfg.schedule!r}")
    return cfg.lr * factor


def resume_path(checkpoint_path: str | os.PathLike) -> Path:
    """The resume file of ``checkpoint_path``: ``<checkpoint_path>.resume.pt``."""
    return Path(str(os.fspath(checkpoint_path)) + ".resume.pt")


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


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _comparable_config(d: Mapping[str, Any]) -> dict:
    """Config entries that change the result (``device`` does not)."""
    return {k: v for k, v in d.items() if k != "device"}


def _check_same_run(what: str, path: Path, saved_cfg: Any, saved_seed: Any, cfg: TrainConfig, seed: int) -> None:
    ours = _comparable_config(cfg.to_dict())
    theirs = _comparable_config(saved_cfg) if isinstance(saved_cfg, Mapping) else None
    diffs = []
    if saved_seed is not None and saved_seed != seed:
        diffs.append(f"seed {saved_seed} vs {seed}")
    if theirs is not None:
        for k in ours:
            if k in theirs and theirs[k] != ours[k]:
                diffs.append(f"trainer.{k} {theirs[k]!r} vs {ours[k]!r}")
    if diffs:
        raise ValueError(
            f"{what} {path} belongs to a different run ({'; '.join(diffs)}; saved vs requested). "
            "Use another checkpoint path, or delete the file to start over."
        )


def _is_reiterable(data: Any) -> bool:
    if isinstance(data, mdata.Dataset) or mdata._is_pair(data):
        return True
    try:
        return iter(data) is not data
    except TypeError:
        return False


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
) -> dict:
    """Train ``model`` in place on ``data`` and return ``{train_loss, train_acc, test_loss, test_acc,
    epochs}`` (final values in eval mode; the ``test_*`` ones are ``None`` without test data).

    ``data``: a ``modeconn.data.Dataset`` (its train split is shuffled with a ``torch.Generator``
    seeded by ``seed`` and augmented when the dataset asks for it; its test split gives the test
    metrics), an ``(inputs, targets)`` pair (shuffled, not augmented) or a re-iterable of batches
    (used as given). ``eval_data`` (a Dataset, whose test split is used, a pair or batches) gives the
    test metrics instead.

    With ``checkpoint_path``: ``<checkpoint_path>.resume.pt`` is written after every epoch and picked
    up by a later call (bitwise-identical final weights on the CPU); at the end the checkpoint and its
    JSON sidecar are written (``meta`` plus config, seed, metrics, fingerprint, history) and the resume
    file removed. If the checkpoint already holds a finished run, it is loaded into ``model`` and its
    metrics returned without training. ``on_epoch_end(epoch, stats)`` is called after each epoch
    (1-based, after the resume file is written). Raises ``NonFiniteLossError`` on a NaN/inf batch loss,
    leaving the last resume file untouched.
    """
    cfg.validate()
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    resume = resume_path(ckpt) if ckpt is not None else None
    device = mdata.resolve_device(cfg.device)

    # ---- a finished run is never retrained nor overwritten
    if ckpt is not None:
        saved = read_meta(ckpt)
        if saved is not None and saved.get("finished"):
            _check_same_run("finished checkpoint", ckpt, saved.get("config"), saved.get("seed"), cfg, seed)
            state, saved = load_checkpoint(ckpt, model)
            model.load_state_dict(state)
            model.to(device)
            log.info("reusing finished run %s (seed %s); not retraining", ckpt, seed)
            if resume.exists():
                resume.unlink()
            return dict(saved["metrics"])

    if not _is_reiterable(data) and cfg.epochs > 1:
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}) but trainer.epochs={cfg.epochs}; "
            "pass a Dataset, an (inputs, targets) pair or a re-iterable (e.g. a list) of batches"
        )

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # shuffling and augmentation
    model.to(device)
    optimizer = _make_optimizer(model, cfg)
    start_epoch, history = 0, []

    if resume is not None and resume.exists():
        state = torch.load(resume, map_location="cpu", weights_only=True)
        if state.get("format") != _RESUME_FORMAT:
            raise ValueError(f"resume file {resume} has an unknown format; delete it to start over")
        _check_same_run("resume file", resume, state.get("config"), state.get("seed"), cfg, seed)
        saved_fp, fp = state.get("fingerprint"), fingerprint(model)
        if saved_fp is not None and saved_fp.get("digest") != fp["digest"]:
            raise CheckpointMismatchError(
                f"resume file {resume} was made for a different architecture than the config's model: "
                + describe_mismatch(fp, saved_fp)
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(list(state["cuda_rng"]))
        start_epoch = int(state["epoch"])
        history = list(state.get("history", []))
        log.info("resuming %s from epoch %d/%d", ckpt, start_epoch, cfg.epochs)

    is_dataset = isinstance(data, mdata.Dataset)
    bar = _progress(range(start_epoch, cfg.epochs), start_epoch, cfg.epochs, seed, progress)
    try:
        for epoch in bar:
            lr = lr_at(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            n = 0
            batches = mdata.iter_batches(
                data, cfg.batch_size, split="train", shuffle=True, generator=gen, augment=is_dataset, device=device
            )
            for i, (x, y) in enumerate(batches):
                out = model(x)
                loss = F.cross_entropy(out, y)
                if not torch.isfinite(loss):
                    if resume is None:
                        kept = ""
                    elif epoch > 0:
                        kept = f" The resume file {resume} still holds the last finished epoch ({epoch})."
                    else:
                        kept = " No epoch had finished, so there is no resume file."
                    raise NonFiniteLossError(
                        f"training loss became {loss.item()} at epoch {epoch + 1}/{cfg.epochs}, batch {i + 1} "
                        f"(lr={lr:g}, seed {seed}): the run diverged; lower trainer.lr (e.g. to {cfg.lr / 10:g}) "
                        f"or use a gentler schedule.{kept}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach().double() * len(y)
                correct += (out.detach().argmax(1) == y).sum()
                n += len(y)
            if n == 0:
                raise ValueError(f"training data yielded no batches in epoch {epoch + 1}")
            stats = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum.item() / n, "acc": correct.item() / n}
            history.append(stats)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['acc']:.3f}", lr=f"{lr:.3g}")
            if resume is not None:
                atomic_torch_save(
                    {
                        "format": _RESUME_FORMAT,
                        "epoch": epoch + 1,
                        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "generator": gen.get_state(),
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                        "config": cfg.to_dict(),
                        "seed": seed,
                        "fingerprint": fingerprint(model),
                        "history": history,
                    },
                    resume,
                )
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, dict(stats))
    finally:
        if hasattr(bar, "close"):
            bar.close()

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


def _progress(it: Iterable, initial: int, total: int, seed: int, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, initial=initial, total=total, desc=f"train seed {seed}", unit="epoch", leave=False)
