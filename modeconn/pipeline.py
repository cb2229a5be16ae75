"""One run, end to end: data, two endpoints, every selected path, evaluation, report and figure.

The run directory holds ``endpoints/`` (checkpoints and sidecars), ``paths/`` (one JSON and CSV per path),
``paths.png``, ``report.md`` and ``summary.json``. A finished run (``summary.json`` present) is never
redone or overwritten; an interrupted one resumes: finished endpoints and curves are reused.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path as FilePath

import torch
from omegaconf import DictConfig, OmegaConf

from modeconn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from modeconn.config import ConfigError, to_container, validate
from modeconn.data import Dataset, describe, example_input, load, resolve_device
from modeconn.align.step import align_endpoints, path_variants
from modeconn.align.step import report_lines as alignment_report
from modeconn.evaluate import PathEval, evaluate_path
from modeconn.models import build
from modeconn.paths.base import float_state
from modeconn.paths.registry import BUILDERS, PathContext, build_path
from modeconn.plots import plot_paths
from modeconn.train import TrainConfig, train

log = logging.getLogger("modeconn")
CONV_MODELS = ("convnet", "vgg", "preresnet")


def load_data(cfg: DictConfig, device: torch.device) -> Dataset:
    options = to_container(cfg.data)
    name = options.pop("name")
    root, download = options.pop("root", None), options.pop("download", False)
    if name == "digits":
        if options.get("image") is None:
            options["image"] = cfg.model.name in CONV_MODELS
    elif options.get("image") is None:
        options.pop("image", None)
    if "input_shape" in options:
        options["input_shape"] = tuple(options["input_shape"])
    return load(name, root=root, download=download, device=device, **options)


def build_model(cfg: DictConfig, data: Dataset, seed: int = 0) -> torch.nn.Module:
    options = to_container(cfg.model)
    name = options.pop("name")
    torch.manual_seed(seed)
    return build(name, tuple(data.input_shape), data.num_classes, **options)


def endpoints(cfg: DictConfig, data: Dataset, out_dir: FilePath, device: torch.device) -> list[dict]:
    """Train (or load) the two endpoints; returns [{'state', 'meta', 'seed'}] for A and B."""
    model = build_model(cfg, data)
    if cfg.get("endpoints") is not None:
        out = []
        for file in cfg.endpoints:
            state, meta = load_checkpoint(FilePath(str(file)), model=model)
            out.append({"state": state, "meta": meta, "seed": meta.get("seed"), "file": str(file)})
        return out
    tcfg = TrainConfig(**to_container(cfg.trainer), device=str(device))
    out = []
    for seed in (2 * cfg.seed, 2 * cfg.seed + 1):
        net = build_model(cfg, data, seed)
        file = out_dir / "endpoints" / f"seed{seed}.pt"
        file.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": to_container(cfg.model), "data": to_container(cfg.data)}
        train(net, data, tcfg, seed=seed, checkpoint_path=file, meta=meta, progress=cfg.progress)
        state, meta = load_checkpoint(file, model=net)
        out.append({"state": state, "meta": meta, "seed": seed, "file": str(file)})
    return out


RUN_INDEPENDENT = ("progress", "device", "threads")  # keys that do not change a run's results


def _result_config(cfg: DictConfig) -> dict:
    return {k: v for k, v in to_container(cfg).items() if k not in RUN_INDEPENDENT and k != "hydra"}


def run(cfg: DictConfig, out_dir: str | FilePath, only: list[str] | None = None) -> dict:
    """Run one configured job into ``out_dir``; returns the summary (also written as summary.json).

    ``only`` keeps just these paths of ``cfg.path`` (a command-line ``path=[...]`` over a preset). A
    finished run in ``out_dir`` is returned as it is when its config matches, and refused when it does not.
    """
    out_dir = FilePath(out_dir)
    if only is not None:
        cfg = cfg.copy()
        missing = [name for name in only if name not in cfg.path]
        if missing:
            raise ConfigError(f"path: {missing} are not configured; choose from {', '.join(BUILDERS)}")
        cfg.path = {name: cfg.path[name] for name in only}
    summary_file = out_dir / "summary.json"
    if summary_file.exists():
        stored = OmegaConf.load(out_dir / "config.yaml") if (out_dir / "config.yaml").exists() else None
        if stored is not None and _result_config(stored) != _result_config(cfg):
            raise ConfigError(f"{out_dir} holds a finished run made with another config; choose a new run "
                              "directory (hydra.run.dir / hydra.sweep.dir) instead of overwriting it")
        log.info("%s is a finished run with this config; not redoing it", out_dir)
        return {**json.loads(summary_file.read_text()), "skipped": True}
    validate(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    started = time.time()
    device = resolve_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    data = load_data(cfg, device)
    log.info("data: %s", describe(data))
    ends = endpoints(cfg, data, out_dir, device)
    model = build_model(cfg, data).to(device)
    model(example_input(data).to(device))  # fail early on an input-shape mismatch
    theta_a, theta_b = (float_state({k: v.to(device) for k, v in e["state"].items()}) for e in ends)
    ctx = PathContext(model=model, theta_a=theta_a, theta_b=theta_b, data=data, device=device,
                      work_dir=out_dir / "work", progress=cfg.progress, seed=cfg.seed,
                      max_items=cfg.eval.max_items)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    stability = None
    st = cfg.get("stability") or {}
    if st.get("dropout_keep") or st.get("noise"):
        from modeconn.stability.endpoints import measure_endpoints

        stability = measure_endpoints(model, {f"seed{e['seed']}": th for e, th in zip(ends, (theta_a, theta_b))},
                                      data, out_dir, keeps=list(st.get("dropout_keep") or []),
                                      trials=st.get("trials", 20), noise=bool(st.get("noise")),
                                      noise_items=st.get("noise_items", 256), seed=cfg.seed,
                                      max_items=cfg.eval.max_items, device=device)
    figure2 = None
    if st.get("figure2"):  # Kuditipudi et al. Figure 2 over several trained nets (the endpoints first)
        from modeconn.stability.endpoints import measure_figure2

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
        ev.info["build_seconds"] = built
        ev.save(out_dir / "paths")
        evals.append(ev)
        log.info("%s: max train loss %.4f, epsilon barrier %.4f%s", label, ev.max_train_loss,
                 ev.barriers["train_loss"]["epsilon"], "" if ev.bound is None else f", bound {ev.bound:.4f}")
    plot_paths(evals, out_dir / "paths.png", title=f"{cfg.name}: {cfg.model.name} on {cfg.data.name}")
    summary = {
        "name": cfg.name,
        "finished": True,
        "seconds": time.time() - started,
        "device": str(device),
        "hardware": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "data": describe(data),
        "endpoints": [{k: e[k] for k in ("seed", "file")} | {"metrics": e["meta"].get("metrics", {})} for e in ends],
        "stability": stability,
        "figure2": figure2,
        "alignment": None if alignment is None else alignment.summary(),
        "paths": {ev.name: {"barriers": ev.barriers, "bound": ev.bound, "within_bound": ev.within_bound,
                            "segments": len(ev.knots) - 1, "seconds": ev.seconds} for ev in evals},
    }
    atomic_write_bytes(out_dir / "report.md", render_report(summary, evals).encode())
    atomic_write_json(summary_file, summary)
    return summary


def render_report(summary: dict, evals: list[PathEval]) -> str:
    """A short Markdown report: the endpoints, then one row per path with its barriers and bound."""
    lines = [f"# modeconn run: {summary['name']}", "", f"Data: {summary['data']}. Device: {summary['device']}.", "",
             "## Endpoints", "", "| seed | train loss | train acc | test loss | test acc |", "|---|---|---|---|---|"]
    for e in summary["endpoints"]:
        m = e["metrics"]
        lines.append(f"| {e['seed']} | {m.get('train_loss', float('nan')):.4f} | {m.get('train_acc', float('nan')):.4f} "
                     f"| {m.get('test_loss', float('nan')):.4f} | {m.get('test_acc', float('nan')):.4f} |")
    lines += ["", "## Paths (train loss unless noted)", "",
              "| path | segments | max loss | epsilon barrier | chord | mean | midpoint | argmax t | bound | max <= bound | max test error |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ev in evals:
        b = ev.barriers["train_loss"]
        bound = "—" if ev.bound is None else f"{ev.bound:.4f}"
        ok = "—" if ev.within_bound is None else ("yes" if ev.within_bound else "NO")
        test_err = ev.barriers.get("test_error", {}).get("max", float("nan"))
        lines.append(f"| {ev.name} | {len(ev.knots) - 1} | {b['max']:.4f} | {b['epsilon']:.4f} | {b['chord']:.4f} | "
                     f"{b['mean']:.4f} | {b['midpoint']:.4f} | {b['argmax_t']:.3f} | {bound} | {ok} | {test_err:.4f} |")
    if summary.get("stability"):
        lines += ["", "## Endpoint stability", ""]
        for name, rows in summary["stability"]["dropout"].items():
            if not rows:
                continue
            cells = ", ".join(f"keep {r['keep']:.2f}: {r['loss_all_dropped']:.4f}" for r in rows)
            lines.append(f"- {name}, loss of the best dropout subnetwork (all hidden layers): {cells}")
        for name, ns in summary["stability"]["noise"].items():
            verdict = {True: "holds", False: "fails", None: "reported only"}
            held = ", ".join(f"{k} {verdict[v.get('holds')]}" for k, v in ns["conditions"].items()
                             if isinstance(v, dict) and "holds" in v)
            lines.append(f"- {name}, noise stability: Definition 4 epsilon {ns['epsilon']:.4g} ({held}); "
                         f"histograms in noise_stability_{name}.png")
    lines += alignment_report(summary)
    certificates = [line for ev in evals for line in certificate(ev)]
    if certificates:
        lines += ["", "## Certificates (train loss on the constructors' data)", "", *certificates]
    lines += ["", "![paths](paths.png)", "", f"Wall time: {summary['seconds']:.1f} s.", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return ", ".join(_fmt(v) for v in value) if isinstance(value, (list, tuple)) else f"{value:.4f}"


def certificate(ev: PathEval) -> list[str]:
    """What a constructed path guarantees beside what was measured, as Markdown bullets."""
    info, out = ev.info, []
    measured = ev.barriers["train_loss"]["max"]
    if ev.bound is not None:
        verdict = "holds" if ev.within_bound else "VIOLATED"
        eps = info.get("epsilon_a"), info.get("epsilon_b")
        detail = f" (epsilon_A {eps[0]:.4f}, epsilon_B {eps[1]:.4f})" if None not in eps else ""
        out.append(f"- **{ev.name}**: bound max(L_A, L_B) + epsilon = {ev.bound:.4f}{detail}; "
                   f"measured max {measured:.4f}: {verdict}.")
    elif "lemma2_bound" in info or "lemma2_bounds" in info:
        bounds = info.get("lemma2_bounds", info.get("lemma2_bound"))
        out.append(f"- **{ev.name}**: {info.get('bound_formula', 'no closed-form bound')}. Exact part: the Lemma 2 "
                   f"segments stay below the larger of their ends, {_fmt(bounds)} (measured {_fmt(info.get('lemma2_max'))}); "
                   f"the straight segments to the dropout copies measured {_fmt(info.get('dropout_a_max'))} and "
                   f"{_fmt(info.get('dropout_b_max'))}; whole path measured max {measured:.4f}.")
    return out
