"""``modeconn landscape [overrides]``: train (or take ``endpoints=[...]``) N minima, connect them pair by pair
as the suggestion engines propose, and report the minimax barriers, the MST and the disconnectivity graph.

Each proposed round of pairs runs as one Hydra multirun of ordinary runs (:mod:`modeconn.run.landscape_job`)
through the configured launcher: the basic launcher runs the pairs in sequence, ``hydra/launcher=local``
(joblib) on local cores, ``hydra/launcher=slurm`` on SLURM. Each pair is the ordinary, resumable run in
``<run dir>/pairs/<a>__<b>/``; the exploration (:mod:`modeconn.landscape.explore`) continues after Ctrl-C
or a killed job: rerun the same command with the same ``hydra.run.dir``.

Options (a ``landscape:`` node, also settable bare): ``minima`` (how many to train), ``engines``,
``max_pairs``, ``threshold`` (the barrier under which minima count as one basin in the report).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path as FilePath

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from modeconn.io import runrecord
from modeconn.io.checkpoint import atomic_write_json, load_checkpoint
from modeconn.evaluation.evaluate import PathEval
from modeconn.io.jsonfile import UnreadableFileError
from modeconn.landscape.edges import PAIRS, check_names, pair_name, read_pair
from modeconn.landscape.engines import check_engines
from modeconn.landscape.explore import MINIMA, check_settings, exploration_loop, minimum_losses, read_minima
from modeconn.landscape.report import write_report
from modeconn.params.state import float_state
from modeconn.run import memory
from modeconn.run.config import ConfigError, require, to_container, validate
from modeconn.run.lock import run_lock
from modeconn.run.preflight import check_paths_apply, check_trained_files
from modeconn.run.schema import check_values, conf_dir

log = logging.getLogger("modeconn")

FINISHED = "finished.json"  # written last: the exploration, its landscapes and report are complete


def _defaults() -> dict:
    """The options' defaults: ``conf/landscape/default.yaml``."""
    return OmegaConf.to_container(OmegaConf.load(FilePath(conf_dir()) / "landscape" / "default.yaml"))


DEFAULTS = _defaults()
# overrides the driver keeps to itself (never handed to a pair's run)
_DRIVER_KEYS = ("landscape", "endpoints", "hydra.run.dir")
USAGE = ("usage: modeconn landscape [minima=N] [endpoints=[a.pt,b.pt,...]] [engines=[unfinished,disconnected,mst]] "
         "[max_pairs=N] [threshold=0.05] [hydra.run.dir=DIR] [hydra/launcher=local] [any run override]")


def driver_overrides(args: list[str]) -> list[str]:
    """``minima=10`` / ``landscape.minima=10`` -> ``++landscape.minima=10`` (the node is optional in a preset)."""
    out = []
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" in arg and key in DEFAULTS:
            arg = f"++landscape.{arg.lstrip('+')}"
        elif "=" in arg and key.startswith("landscape."):
            arg = f"++{arg.lstrip('+')}"
        out.append(arg)
    return out


def job_overrides(overrides: list[str]) -> list[str]:
    """The overrides a pair's run gets: everything but the landscape's own keys, the minima and the run dir."""
    return [o for o in overrides if not any(o.split("=", 1)[0].lstrip("+~") == k
                                            or o.split("=", 1)[0].lstrip("+~").startswith(k + ".")
                                            for k in _DRIVER_KEYS)]


def compose_config(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def landscape_options(cfg: DictConfig) -> dict:
    """The ``landscape`` node over :data:`DEFAULTS`, checked by the value table (:mod:`modeconn.run.schema`) and
    the engines' own check (ConfigError naming the key)."""
    given = to_container(cfg.get("landscape") or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"landscape: unknown option(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **given}
    check_values({"landscape": opts})
    try:
        opts["engines"] = check_engines(opts["engines"], "landscape.engines")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return opts


def pair_config(cfg: DictConfig) -> DictConfig:
    """The config every pair's run shares: no hydra node, no landscape node, endpoints set per pair."""
    out = cfg.copy()
    with open_dict(out):
        for key in ("hydra", "landscape"):
            out.pop(key, None)
        out.endpoints = None
    return out


def given_minima(cfg: DictConfig) -> dict[str, str] | None:
    """``endpoints=[a.pt, b.pt, ...]``: name (file stem) -> absolute file, checked."""
    if cfg.get("endpoints") is None:
        return None
    check_values({"endpoints": OmegaConf.to_container(cfg.endpoints) if OmegaConf.is_config(cfg.endpoints)
                  else cfg.endpoints})
    files = [str(f) for f in cfg.endpoints]
    require(len(files) >= 2, "endpoints", "a list of at least two checkpoint files", files)
    for f in files:
        if not FilePath(f).is_file():
            raise ConfigError(f"endpoints: checkpoint file {f!r} does not exist")
    names = [FilePath(f).stem for f in files]
    try:
        check_names(names, "endpoints (file names)")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {n: str(FilePath(f).resolve()) for n, f in zip(names, files)}


def trained_minima(cfg: DictConfig, out_dir: FilePath, count: int) -> dict[str, str]:
    """The files of the ``count`` minima to train: seeds ``count * seed + i``, ``minima/seed<k>.pt``."""
    return {f"seed{k}": str(out_dir / "minima" / f"seed{k}.pt") for k in range(count * cfg.seed, count * (cfg.seed + 1))}


def _seeds(files: dict[str, str]) -> dict[int, str]:
    return {int(name.removeprefix("seed")): file for name, file in files.items()}


def train_minima(cfg: DictConfig, data, files: dict[str, str], device: torch.device, identity: dict) -> dict:
    """Train the minima of :func:`trained_minima` (each resumable from its epoch checkpoints, and reused only
    under the same ``identity``, :func:`modeconn.run.preflight.endpoint_identity`); returns name -> state."""
    from modeconn.run.pipeline import build_model
    from modeconn.training.train import TrainConfig, train

    tcfg = TrainConfig(**to_container(cfg.trainer), device=str(device))
    states = {}
    for (k, file), name in zip(_seeds(files).items(), files):
        FilePath(file).parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": to_container(cfg.model), "data": to_container(cfg.data)}
        net = build_model(cfg, data, k)
        train(net, data, tcfg, seed=k, checkpoint_path=file, meta=meta, progress=cfg.progress, identity=identity)
        states[name] = load_checkpoint(file, model=net)[0]
    return states


class LauncherRunner:
    """Runs a round of pairs as one Hydra multirun of :mod:`modeconn.run.landscape_job` in a subprocess."""

    def __init__(self, overrides: list[str], out_dir: FilePath) -> None:
        if "'" in str(out_dir):
            raise ConfigError(f"hydra.run.dir: a landscape directory cannot contain a quote; got {out_dir}")
        self.overrides, self.out_dir = overrides, out_dir

    def command(self, pairs: list[tuple[str, str]]) -> list[str]:
        return [sys.executable, "-m", "modeconn.run.landscape_job", "-m", *self.overrides,
                f"+pair={','.join(pair_name(a, b) for a, b in pairs)}", f"+landscape_dir='{self.out_dir}'",
                f"hydra.sweep.dir='{self.out_dir / 'pairs'}'", "hydra.sweep.subdir=${pair}"]

    def __call__(self, pairs: list[tuple[str, str]]) -> None:
        proc = subprocess.Popen(self.command(pairs), env={**os.environ, "HYDRA_FULL_ERROR": "0"})
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # the jobs got the same Ctrl-C: let them stop cleanly, then stop too
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if rc == 130:
            raise KeyboardInterrupt
        if rc == 2:
            raise ConfigError(f"the pair runs refused their input (exit 2, above); pairs: {pairs}")
        if rc != 0:
            raise RuntimeError(f"the pair runs failed (exit {rc}, above); pairs: {pairs}")


def _minima_record(out_dir: FilePath, files: dict[str, str], states: dict, cfg: DictConfig, model, data,
                   device) -> dict[str, float]:
    """Each minimum's loss, measured once and kept in ``minima.json`` with its file (relative to the run
    directory when inside it) and sha256 (:func:`_check_existing` vouches for a recorded one)."""
    old = read_minima(out_dir)
    if old is not None:
        return old["losses"]
    losses = minimum_losses(model, {n: float_state(st) for n, st in states.items()}, data,
                            max_items=cfg.eval.max_items, bn_items=cfg.eval.bn_items, device=device)
    atomic_write_json(out_dir / MINIMA, {"names": list(files), "files": _recorded(out_dir, files), "losses": losses,
                                         "sha256": {n: runrecord.sha256(f) for n, f in files.items()}})
    return losses


def _recorded(out_dir: FilePath, files: dict[str, str]) -> dict[str, str]:
    """The minima's files as recorded: relative to the run directory when inside it (a copied or moved
    landscape checks and uses its own copies), else absolute."""
    return {n: runrecord.relative_file(out_dir, f) for n, f in files.items()}


def _check_existing(out_dir: FilePath, settings: dict, files: dict[str, str]) -> None:
    """Before anything is written: the plan on file has these settings, ``minima.json`` names these minima
    with unchanged contents, and every finished pair's summary reads (else ConfigError or a file error)."""
    try:
        check_settings(out_dir, settings)  # a landscape made with another config is refused before any write
    except UnreadableFileError:
        raise
    except ValueError as e:
        raise ConfigError(str(e).replace("out_dir", "hydra.run.dir")) from None
    old = read_minima(out_dir)
    if old is not None:
        if old.get("files", _recorded(out_dir, files)) != _recorded(out_dir, files) or old["names"] != list(files):
            raise ConfigError(f"{out_dir} holds a landscape of other minima ({', '.join(old['names'])}); "
                              "choose a new hydra.run.dir")
        changed = [n for n, digest in old.get("sha256", {}).items()
                   if n in files and runrecord.sha256(files[n]) != digest]
        if changed:
            raise ConfigError(f"{out_dir}: minimum {changed[0]} ({files[changed[0]]}) changed since the landscape was "
                              "measured (sha256); its results are stale: choose a new hydra.run.dir")
    for summary in sorted((out_dir / PAIRS).glob("*/summary.json")):  # finished pairs: read back as they are
        for label in read_pair(summary.parent)["paths"]:
            PathEval.load(summary.parent / "paths" / f"{label}.json")


def _provenance(cfg: DictConfig, device: torch.device) -> dict:
    """What the minima and pairs depend on besides the config (unless ``allow_provenance_change``)."""
    if cfg.get("allow_provenance_change", False):
        return {}
    return {"threads": torch.get_num_threads(), "device": device.type, "torch": str(torch.__version__)}


def _checked(cfg: DictConfig, full: DictConfig, opts: dict, out_dir: FilePath, device: torch.device):
    """Every check that needs no training, before anything is written: data, model, memory, paths, given or
    trained minima, the files already in ``out_dir``. Returns (data, model, files, settings, states, identity)."""
    from modeconn.params.checks import check_finite_endpoints
    from modeconn.run.pipeline import build_model, checked_model, given_endpoints, load_data

    memory.check_data(cfg)
    data = load_data(cfg, device)
    memory.check_model(cfg, lambda: build_model(cfg, data), device)
    model = checked_model(cfg, data, device)
    memory.check_run(cfg, model, device)  # each pair's run
    check_paths_apply(cfg, model, data, device)
    given = given_minima(full)
    count = len(given) if given is not None else opts["minima"]
    memory.check_copies("landscape.minima", count, count + memory.MODEL_COPIES,
                        sum(p.numel() for p in model.parameters()), device)  # every minimum's weights at once
    files = given if given is not None else trained_minima(cfg, out_dir, opts["minima"])
    settings = {"names": list(files), "files": _recorded(out_dir, files), "run": runrecord.result_config(cfg),
                "provenance": _provenance(cfg, device)}
    _check_existing(out_dir, settings, files)
    states, identity = None, None
    if given is not None:
        ends = given_endpoints(full, model)  # readable, of the model's architecture (dtypes converted)
        check_finite_endpoints(ends, model, data)
        states = {n: e["state"] for n, e in zip(files, ends)}
    else:
        identity = check_trained_files(cfg, data, _seeds(files), device,
                                       lambda k: build_model(cfg, data, k).to(device))
    return data, model, files, settings, states, identity


def explore_cli(args: list[str]) -> FilePath:
    """The whole command: compose, check, train or load the minima, explore, report; returns the run dir."""
    from modeconn.data import resolve_device

    started = time.time()
    overrides = driver_overrides(args)
    full = compose_config(overrides)
    out_dir = FilePath(str(full.hydra.run.dir)).resolve()
    opts = landscape_options(full)
    cfg = pair_config(full)
    validate(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    with run_lock(out_dir):  # one driver per landscape directory (the pairs lock their own)
        data, model, files, settings, states, identity = _checked(cfg, full, opts, out_dir, device)
        if (out_dir / FINISHED).exists():  # same settings (checked): no engine can propose another pair
            print(f"modeconn: landscape {out_dir} already finished; report: {out_dir / 'report.md'}")
            return out_dir
        _setup_log(out_dir)
        log.info("landscape in %s", out_dir)
        if states is None:
            states = train_minima(cfg, data, files, device, identity)
        trained = time.time() - started
        losses = _minima_record(out_dir, files, states, cfg, model, data, device)
        ls = exploration_loop(out_dir, list(files), losses, LauncherRunner(job_overrides(overrides), out_dir),
                              engines=opts["engines"], max_pairs=opts["max_pairs"], settings=settings)
        seconds = time.time() - started
        header = [f"# Landscape: {cfg.name} ({cfg.model.get('name') or cfg.model.get('_target_')} on {cfg.data.name})",
                  "", f"{len(files)} minima, {ls.graph.number_of_edges()} pairs connected (engines "
                  f"{', '.join(opts['engines'])}, max_pairs {opts['max_pairs']}); this invocation {seconds:.1f} s "
                  f"({trained:.1f} s training minima); {runrecord.describe(runrecord.provenance(device))}.", "",
                  "Command: `modeconn landscape " + " ".join(args) + "`"]
        report = write_report(out_dir, header, float(opts["threshold"]))
        atomic_write_json(out_dir / FINISHED, {"pairs": ls.graph.number_of_edges(), "seconds": seconds})
    print(f"modeconn: landscape of {len(files)} minima in {seconds:.1f} s; report: {report}")
    return out_dir


def _setup_log(out_dir: FilePath) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    file_handler = logging.FileHandler(out_dir / "landscape.log")
    file_handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
    log.addHandler(file_handler)


def main(args: list[str]) -> int:
    """``modeconn landscape ...`` (dispatched by :func:`modeconn.run.cli.main`, which turns bad input into
    exit 2 and one line, Ctrl-C into 130); returns 0 when done."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    if any(a in ("-m", "--multirun") for a in args):
        raise ConfigError("landscape runs its pairs as a multirun itself; drop -m (choose the launcher with "
                          "hydra/launcher=...)")
    try:
        explore_cli(args)
    except KeyboardInterrupt:
        log.warning("landscape interrupted: rerun the same command with the same hydra.run.dir to resume")
        raise
    return 0
