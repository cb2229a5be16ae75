"""A run directory's record: what its numbers depend on, and the checks that keep a finished run's results
true and an interrupted run from mixing settings.

* :func:`provenance`: torch version, device and its name, CPU thread count, deterministic-algorithm
  settings. The same config gives other numbers when any of these changes (one thread vs two trains
  different endpoints), so a resume or a finished-run check under other settings is refused unless the
  config says ``allow_provenance_change: true``.
* :func:`check_existing`: before a run starts, a finished run (``summary.json``) is returned as it is
  only when its config, its endpoint files (sha256) and its provenance are unchanged; anything else is
  refused with :class:`~modeconn.io.options.ConfigError`, and nothing in the directory is touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig

from modeconn.io.jsonfile import read_json, read_yaml
from modeconn.io.options import ConfigError, dotted_keys, to_container

PROVENANCE_FILE = "provenance.json"
# Top-level keys not compared as config: progress and the override flag change no number; device and
# threads do, but are compared through the recorded provenance (the device and thread count in effect).
NOT_COMPARED = ("progress", "allow_provenance_change", "device", "threads", "hydra")


def provenance(device: torch.device) -> dict:
    """What a run's numbers depend on besides its config."""
    return {
        "torch": torch.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(prov: Mapping) -> str:
    """One sentence for a report: ``torch 2.4.0 on cpu (AMD EPYC ...), 2 CPU threads, deterministic off``."""
    det = "on" if prov.get("deterministic_algorithms") else "off"
    return (f"torch {prov.get('torch')} on {prov.get('device')} ({prov.get('device_name')}), "
            f"{prov.get('threads')} CPU thread(s), deterministic algorithms {det}, "
            f"cudnn deterministic {prov.get('cudnn_deterministic')}, benchmark {prov.get('cudnn_benchmark')}")


def sha256(file: str | Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def result_config(cfg) -> dict:
    """The config keys a run's results depend on (compared when a run directory is reused)."""
    return {k: v for k, v in to_container(cfg).items() if k not in NOT_COMPARED}


# what modeconn reads from a run's JSON files must have these shapes (modeconn.io.jsonfile.check_shape)
NUMBER_OR_NULL = (int, float, type(None))
PROVENANCE_SHAPE = {"torch": str, "device": str, "threads": int}
SUMMARY_SHAPE = {
    "name": (str, type(None)), "finished": bool, "seconds": NUMBER_OR_NULL, "provenance": dict,
    "endpoints": [{"file": (str, type(None)), "sha256": (str, type(None)), "seed": (int, type(None)),
                   "metrics": {str: NUMBER_OR_NULL}}],
    "paths": {str: {"barriers": {str: {str: NUMBER_OR_NULL}}, "bound": NUMBER_OR_NULL}},
}


def _read_json(file: Path, what: str, shape=dict) -> dict:
    return read_json(file, what, shape, hint=f"delete the run directory {file.parent} to start the run over")


def read_provenance(file: Path) -> dict:
    """A run's ``provenance.json`` (:data:`PROVENANCE_SHAPE`; else one error naming the file)."""
    return _read_json(file, "provenance file", PROVENANCE_SHAPE)


class _Held(logging.Filter):
    """Keeps the records a handler would write (see :func:`held_file_logs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextlib.contextmanager
def held_file_logs() -> Iterator[Callable[[], None]]:
    """Hold back what would be written to log files (a run's ``cli.log``) while a run is checked; the caller
    calls the yielded ``release()`` once the run starts writing, which writes the held records in order. A
    run refused or found finished before that drops them, so its directory's log is not touched (the
    console handlers are not held)."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    handlers = {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers
                if isinstance(h, logging.FileHandler)}
    holds = [(h, _Held()) for h in handlers]
    for h, f in holds:
        h.addFilter(f)

    def release() -> None:
        for h, f in holds:
            h.removeFilter(f)
            for record in f.records:
                h.handle(record)
        holds.clear()

    try:
        yield release
    finally:
        for h, f in holds:
            h.removeFilter(f)


def endpoint_file(out_dir: Path, recorded: str) -> Path:
    """An endpoint file as a summary records it: relative to the run directory (its own files, so a copied
    or moved run checks its own copies), or absolute (``endpoints=[...]`` given from elsewhere)."""
    path = Path(recorded)
    return path if path.is_absolute() else out_dir / path


def relative_file(out_dir: Path, file: str | Path) -> str:
    """``file`` relative to ``out_dir`` when it lies inside it, else as given (for summary.json)."""
    try:
        return str(Path(file).resolve().relative_to(out_dir.resolve()))
    except ValueError:
        return str(file)


def _provenance_change(old: Mapping, new: Mapping) -> list[str]:
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in new if k in old and old.get(k) != new.get(k)]


def check_provenance(out_dir: Path, old: Mapping | None, new: Mapping, allow: bool, finished: bool) -> None:
    """Refuse to reuse ``out_dir`` under other settings than it was made with (unless ``allow``)."""
    changes = _provenance_change(old or {}, new)
    if changes and not allow:
        what = "finished run was made" if finished else "interrupted run was started"
        raise ConfigError(f"{out_dir}: this {what} under other settings ({'; '.join(changes)}); its numbers "
                          "depend on them. Rerun with the same settings (e.g. threads=N), choose a new run "
                          "directory, or pass allow_provenance_change=true to accept the mix")


def check_existing(cfg: DictConfig, out_dir: Path, prov: Mapping) -> dict | None:
    """The finished run in ``out_dir`` if its config, endpoint files and provenance still match (else
    :class:`ConfigError`); None when the directory holds no finished run (an interrupted one is checked
    for its provenance)."""
    allow = bool(cfg.get("allow_provenance_change", False))
    summary_file = out_dir / "summary.json"
    if not summary_file.exists():
        started = out_dir / PROVENANCE_FILE
        if started.exists():
            check_provenance(out_dir, read_provenance(started), prov, allow, finished=False)
        return None
    summary = _read_json(summary_file, "summary", SUMMARY_SHAPE)
    config_file = out_dir / "config.yaml"
    if config_file.exists():
        stored = read_yaml(config_file, "run config", hint="choose a new run directory")
        old, new = dotted_keys(result_config(stored)), dotted_keys(result_config(cfg))
        diffs = [f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in {**new, **old} if old.get(k) != new.get(k)]
        if diffs:
            raise ConfigError(f"{out_dir} holds a finished run made with another config (first difference: "
                              f"{diffs[0].split(':')[0]}; {'; '.join(diffs[:3])}; saved vs requested); choose a new "
                              "run directory (hydra.run.dir / hydra.sweep.dir) instead of overwriting it")
    for end in summary.get("endpoints", []):
        file, digest = end.get("file"), end.get("sha256")
        if file is None or digest is None:
            continue
        file = endpoint_file(out_dir, file)
        if not Path(file).is_file():
            raise ConfigError(f"{out_dir} is finished, but its endpoint file {file} is gone; its results cannot "
                              "be vouched for: choose a new run directory")
        if sha256(file) != digest:
            raise ConfigError(f"{out_dir} is finished, but its endpoint file {file} changed since (sha256 "
                              f"{digest[:12]}... then); its results are stale: choose a new run directory")
    check_provenance(out_dir, summary.get("provenance"), prov, allow, finished=True)
    return summary
