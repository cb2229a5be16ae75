"""One run, end to end: data, two endpoints, every selected path, evaluation, report and figure.

The run directory holds ``endpoints/`` (checkpoints and sidecars), ``paths/`` (one JSON and CSV per path),
``paths.png``, ``report.md`` and ``summary.json``. A finished run (``summary.json`` present) is never
redone or overwritten; an interrupted one resumes: finished endpoints and curves are reused.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path as FilePath

import torch
from omegaconf import DictConfig, OmegaConf

from modeconn.io.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from modeconn.params.checks import check_finite_endpoints, check_model_data, check_path_losses
from modeconn.io import runrecord
from modeconn.run import memory
from modeconn.run.config import ConfigError, to_container, validate
from modeconn.run.lock import run_lock
from modeconn.run.preflight import (IDENTITY_FILE, check_endpoint_files, check_paths_apply, check_run_identity,
                                    check_work_files, endpoint_identity, run_identity)
from modeconn.data import Dataset, describe, load, resolve_device
from modeconn.align.step import align_endpoints, path_variants
from modeconn.evaluation.evaluate import PathEval, evaluate_path
from modeconn.training.loop import global_rng
from modeconn.models import from_options, takes_images
from modeconn.models.custom import is_target, label as model_label, locate, target_kwargs
from modeconn.params.state import float_state
from modeconn.paths.registry import BUILDERS, PathContext, build_path
from modeconn.reporting.plots import plot_paths
from modeconn.reporting.report_md import render_report
from modeconn.training.train import TrainConfig, train

log = logging.getLogger("modeconn")


def load_data(cfg: DictConfig, device: torch.device) -> Dataset:
    options = to_container(cfg.data)
    name = options.pop("name")
    root, download = options.pop("root", None), options.pop("download", False)
    root = None if root is None else os.path.expanduser(str(root))  # data.root=~/data
    if name == "digits":
        if options.get("image") is None:
            options["image"] = takes_images(model_label(to_container(cfg.model)))
    elif options.get("image") is None:
        options.pop("image", None)
    if "input_shape" in options:
        options["input_shape"] = tuple(options["input_shape"])
    try:
        data = load(name, root=root, download=download, device=device, **options)
    except TypeError as e:  # an option the loader does not take (a '+data.KEY=...' override)
        raise ConfigError(f"data ({name}): {e}") from None
    if data.num_classes < 2:  # data.num_classes is checked in the config; the files' own classes here
        where = f"data.path {options.get('path')}" if name == "tensors" else f"data.root {root}" if root else name
        raise ConfigError(f"{where}: {data.num_classes} class; a classifier needs at least 2 ({describe(data)})")
    return data


def build_model(cfg: DictConfig, data: Dataset, seed: int = 0) -> torch.nn.Module:
    """The config's model (a zoo ``name`` or a ``_target_``) for ``data``, its initialisation seeded by ``seed``."""
    with global_rng(seed):  # the initialisation is seeded; the caller's RNG is left as it was
        return from_options(to_container(cfg.model), tuple(data.input_shape), data.num_classes)


def model_record(cfg: DictConfig, data: Dataset) -> dict:
    """The model node for an endpoint's sidecar; a ``_target_`` node also records the keyword arguments it
    was called with (the data's ``num_classes`` / ``input_shape`` included where they were filled in)."""
    node = to_container(cfg.model)
    if is_target(node):
        node["kwargs"] = target_kwargs(locate(node["_target_"]), node, tuple(data.input_shape), data.num_classes)
    return node


def checked_model(cfg: DictConfig, data: Dataset, device: torch.device) -> torch.nn.Module:
    """The config's model for ``data``, built and called once, so a bad model option fails before any work."""
    node = to_container(cfg.model)
    name, options = model_label(node), {k: v for k, v in node.items() if k not in ("name", "_target_")}
    try:
        model = build_model(cfg, data).to(device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"model {name} with options {options} does not build for {describe(data)}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:  # one forward pass: the data's input shape and class count fit the model
        check_model_data(model, data, what=f"model {name}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model


def given_endpoints(cfg: DictConfig, model: torch.nn.Module) -> list[dict] | None:
    """The ``endpoints=[A.pt, B.pt]`` checkpoints, read and checked against the model (None: train them)."""
    if cfg.get("endpoints") is None:
        return None
    out = []
    for file in cfg.endpoints:
        state, meta = load_checkpoint(FilePath(str(file)), model=model)
        out.append({"state": state, "meta": meta, "seed": meta.get("seed"), "file": str(file)})
    return out


def endpoints(cfg: DictConfig, data: Dataset, out_dir: FilePath, device: torch.device,
              identity: dict | None = None) -> list[dict]:
    """Train (or load) the two endpoints; returns [{'state', 'meta', 'seed', 'file'}] for A and B.
    ``identity``: what determines them (:func:`modeconn.run.preflight.endpoint_identity`, computed when None)."""
    given = given_endpoints(cfg, build_model(cfg, data))
    if given is not None:
        return given
    identity = endpoint_identity(cfg, data, device) if identity is None else identity
    tcfg = TrainConfig(**to_container(cfg.trainer), device=str(device))
    out = []
    for seed in (2 * cfg.seed, 2 * cfg.seed + 1):
        net = build_model(cfg, data, seed)
        file = out_dir / "endpoints" / f"seed{seed}.pt"
        file.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": model_record(cfg, data), "data": to_container(cfg.data)}
        train(net, data, tcfg, seed=seed, checkpoint_path=file, meta=meta, progress=cfg.progress, identity=identity)
        state, meta = load_checkpoint(file, model=net)
        out.append({"state": state, "meta": meta, "seed": seed, "file": str(file)})
    return out


def run(cfg: DictConfig, out_dir: str | FilePath, only: list[str] | None = None,
        record: Callable[[], None] | None = None) -> dict:
    """Run one configured job into ``out_dir``; returns the summary (also written as summary.json).

    ``only`` keeps just these paths of ``cfg.path`` (a command-line ``path=[...]`` over a preset). A
    finished run in ``out_dir`` is returned as it is when its config, endpoint files and provenance match,
    and refused when they do not (:mod:`modeconn.io.runrecord`). Every check that needs no training (the
    config, the data, the model, given endpoint files) runs before anything is written; ``record`` is
    called just before the first write (the CLI writes Hydra's record there).
    """
    out_dir = FilePath(out_dir)
    if only is not None:
        cfg = cfg.copy()
        missing = [name for name in only if name not in cfg.path]
        if missing:
            raise ConfigError(f"path: {missing} are not configured; choose from {', '.join(BUILDERS)}")
        cfg.path = {name: cfg.path[name] for name in only}
    validate(cfg)
    with run_lock(out_dir):  # one writer per run directory: a second run exits 2 naming this process
        return _locked_run(cfg, out_dir, record)


def _locked_run(cfg: DictConfig, out_dir: FilePath, record: Callable[[], None] | None) -> dict:
    """:func:`run` after the config is validated, holding the run directory's lock."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    started = time.time()
    with runrecord.held_file_logs() as release:  # a refused or finished run leaves its cli.log as it was
        memory.check_data(cfg)  # data.num_train=1e9 is refused before it is made
        data = load_data(cfg, device)
        memory.check_model(cfg, lambda: build_model(cfg, data), device)  # model.hidden=[1e9], before it is built
        model = checked_model(cfg, data, device)
        memory.check_run(cfg, model, device)  # eval.num_points, path.<name>.num_bends / cycles, figure2 trials
        check_paths_apply(cfg, model, data, device)  # e.g. the dropout path on a residual net, before training
        given = given_endpoints(cfg, model)  # unreadable or foreign checkpoint files stop the run here
        prov = runrecord.provenance(device)
        finished = runrecord.check_existing(cfg, out_dir, prov)
        if finished is not None:  # not logged: its cli.log stays as the run left it
            return {**finished, "skipped": True}
        check_finite_endpoints(given, model, data)  # so do NaN or infinite ones
        identity = None if given is not None else check_endpoint_files(  # another config's endpoints or resume files
            cfg, data, out_dir, device, lambda seed: build_model(cfg, data, seed).to(device))
        check_work_files(out_dir, model)  # curves, chains, narrow and Figure 2 nets: readable, of their format's shape
        made_under = check_run_identity(cfg, out_dir, run_identity(  # ... and were made under this config
            cfg, identity if identity is not None else endpoint_identity(cfg, data, device), given))
        earlier = out_dir / runrecord.PROVENANCE_FILE
        mixed = runrecord.read_provenance(earlier) if earlier.exists() else None
        if record is not None:  # everything is checked: from here on the run writes
            record()
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode())
        atomic_write_json(out_dir / IDENTITY_FILE, made_under)
        atomic_write_json(earlier, prov)
        release()
    log.info("data: %s", describe(data))
    log.info("settings: %s", runrecord.describe(prov))
    ends = given if given is not None else endpoints(cfg, data, out_dir, device, identity)
    check_finite_endpoints(ends, model, data)
    model = checked_model(cfg, data, device)  # again: the random state after it is what the paths start from
    theta_a, theta_b = (float_state({k: v.to(device) for k, v in e["state"].items()}) for e in ends)
    ctx = PathContext(model=model, theta_a=theta_a, theta_b=theta_b, data=data, device=device,
                      work_dir=out_dir / "work", progress=cfg.progress, seed=cfg.seed,
                      max_items=cfg.eval.max_items)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    stability = None
    st = cfg.get("stability") or {}
    if st.get("dropout_keep") or st.get("noise"):
        from modeconn.run.endpoint_stability import measure_endpoints

        stability = measure_endpoints(model, {f"seed{e['seed']}": th for e, th in zip(ends, (theta_a, theta_b))},
                                      data, out_dir, keeps=list(st.get("dropout_keep") or []),
                                      trials=st.get("trials", 20), noise=bool(st.get("noise")),
                                      noise_items=st.get("noise_items", 256), seed=cfg.seed,
                                      max_items=cfg.eval.max_items, device=device)
    figure2 = None
    if st.get("figure2"):  # Kuditipudi et al. Figure 2 over several trained nets (the endpoints first)
        from modeconn.run.endpoint_stability import measure_figure2

        figure2 = measure_figure2(model, {e["seed"]: th for e, th in zip(ends, (theta_a, theta_b)) if e["seed"] is not None},
                                  data, out_dir, to_container(st.figure2), to_container(cfg.model),
                                  TrainConfig(**to_container(cfg.trainer), device=str(device)), device, cfg.progress)
    alignment = align_endpoints(cfg.get("align"), ctx)  # None for align=none
    evals: list[PathEval] = []
    for name, options, label, path_ctx, finish in path_variants(cfg.path.items(), ctx, cfg.get("align"), alignment):
        t0 = time.time()
        path = finish(build_path(name, path_ctx, to_container(options or {})))
        built = time.time() - t0
        ev = evaluate_path(model, path, data, num_points=cfg.eval.num_points, batch_size=cfg.eval.batch_size,
                           max_items=cfg.eval.max_items, bn_items=cfg.eval.bn_items, batched=cfg.eval.batched,
                           device=device, name=label, progress=cfg.progress)
        check_path_losses(ev)  # a non-finite loss fails the run; nothing of this path is recorded
        ev.info["build_seconds"] = built
        ev.save(out_dir / "paths")
        evals.append(ev)
        log.info("%s: max train loss %.4f, epsilon barrier %.4f%s", label, ev.max_train_loss,
                 ev.barriers["train_loss"]["epsilon"], "" if ev.bound is None else f", bound {ev.bound:.4f}")
    plot_paths(evals, out_dir / "paths.png", title=f"{cfg.name}: {model_label(to_container(cfg.model))} on {cfg.data.name}")
    summary = {
        "name": cfg.name,
        "finished": True,
        "seconds": time.time() - started,
        "device": str(device),
        "hardware": prov["device_name"],
        "torch": torch.__version__,
        "provenance": prov | ({"changed_from": mixed} if mixed not in (None, prov) else {}),
        "data": describe(data),
        "endpoints": [{"seed": e["seed"], "file": runrecord.relative_file(out_dir, e["file"]),  # relative: a copied
                       "sha256": runrecord.sha256(e["file"]), "metrics": e["meta"].get("metrics", {})}  # run checks
                      for e in ends],                                                               # its own files
        "stability": stability,
        "figure2": figure2,
        "alignment": None if alignment is None else alignment.summary(),
        "paths": {ev.name: {"barriers": ev.barriers, "bound": ev.bound, "within_bound": ev.within_bound,
                            "segments": len(ev.knots) - 1, "seconds": ev.seconds} for ev in evals},
    }
    atomic_write_bytes(out_dir / "report.md", render_report(summary, evals).encode())
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
