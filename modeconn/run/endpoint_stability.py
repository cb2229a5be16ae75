"""Stability of a run's endpoints, for the paper figures that are about endpoints rather than paths.

Kuditipudi et al.'s Figure 2 (left) plots, against the kept fraction, the loss of the best dropout
subnetwork of each trained net; Figure 3 (left) histograms the noise-stability quantities of one layer.
:func:`measure_endpoints` computes both for each endpoint of a run and writes a JSON file and figures;
:func:`measure_figure2` draws all of Figure 2 over several trained nets (the endpoints and more).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path as FilePath

from torch import Tensor, nn

from modeconn.io.checkpoint import atomic_write_json
from modeconn.reporting.plots_stability import plot_dropout_stability, plot_figure2, plot_noise_stability
from modeconn.stability.figure2 import Figure2Options, figure2, train_trial_net
from modeconn.training.train import TrainConfig
from modeconn.kuditipudi.dropout_stability import dropout_stability
from modeconn.kuditipudi.noise_stability import noise_stability


def measure_endpoints(model: nn.Module, thetas: Mapping[str, Mapping[str, Tensor]], data, out_dir: str | FilePath,
                      keeps: Sequence[float] = (), trials: int = 20, noise: bool = False, noise_items: int = 256,
                      seed: int = 0, max_items: int | None = None, device=None) -> dict:
    """Dropout stability at every kept fraction in ``keeps`` and (if ``noise``) the noise-stability
    quantities, for each endpoint in ``thetas`` (name -> state dict). Writes ``stability.json``,
    ``dropout_stability.png`` and ``noise_stability_<name>.png`` into ``out_dir``; returns the JSON."""
    out = FilePath(out_dir)
    result: dict = {"dropout": {}, "noise": {}}
    for name, theta in thetas.items():
        rows = []
        for keep in keeps:
            s = dropout_stability(model, theta, data, keep=float(keep), trials=trials, seed=seed,
                                  max_items=max_items, device=device)
            rows.append({"keep": float(keep), "loss": s.loss, "loss_all_dropped": s.losses[0],
                         "max_nested_loss": max(s.losses), "epsilon": s.epsilon, "kept_sizes": s.kept_sizes})
        result["dropout"][name] = rows
        if noise:
            ns = noise_stability(model, theta, data, max_items=noise_items, seed=seed, device=device)
            plot_noise_stability(ns, out / f"noise_stability_{name}.png")
            result["noise"][name] = {"epsilon": ns.epsilon, "conditions": ns.conditions, "summaries": ns.summaries()}
    if keeps:
        plot_dropout_stability(result["dropout"], out / "dropout_stability.png")
    atomic_write_json(out / "stability.json", result)
    return result


def measure_figure2(model: nn.Module, endpoints: Mapping[int, Mapping[str, Tensor]], data, out_dir: str | FilePath,
                    options: Mapping, model_options: Mapping, trainer: TrainConfig, device=None,
                    progress: bool = False) -> dict:
    """Figure 2 over ``options["trials"]`` trained nets: the endpoints (seed -> state dict) and as many more
    as needed (seeds after theirs), all trained with ``trainer``, plus the narrow nets. Checkpoints go to
    ``<out_dir>/figure2/`` (reused when the run resumes); writes ``figure2.json`` and ``figure2.png``;
    returns the per-point means and standard deviations and the seconds per step."""
    opts = Figure2Options.from_dict(options)
    out = FilePath(out_dir)

    def train_net(seed: int, width: int | None):
        name = f"seed{seed}.pt" if width is None else f"width{width}_seed{seed}.pt"
        return train_trial_net(model_options, trainer, data, out / "figure2" / name, seed, width, progress)

    started = time.perf_counter()
    nets = {int(seed): (model, dict(theta)) for seed, theta in endpoints.items()}
    seed = max(nets) + 1
    while len(nets) < opts.trials:
        nets[seed] = train_net(seed, None)
        seed += 1
    trained = time.perf_counter() - started
    result = figure2(nets, data, opts, train_net, device=device, progress=progress)
    result["seconds"]["training"] = trained
    atomic_write_json(out / "figure2.json", result)
    plot_figure2(result, out / "figure2.png")
    centre = result["centre"]["mean_std"]
    return {"seeds": result["seeds"], "num_items": result["num_items"], "seconds": result["seconds"],
            "left": result["left"]["mean_std"], "right": result["right"]["mean_std"],
            "centre": {"start": centre[0], "end": centre[-1], "max_loss_mean": max(r["loss_mean"] for r in centre),
                       "min_accuracy_mean": min(r["accuracy_mean"] for r in centre)}}
