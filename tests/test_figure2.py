"""Kuditipudi et al.'s Figure 2 step (modeconn.stability.figure2), its preset, and the figures.

The step runs here on tiny conv nets on the digits images (two trials, a few iterations); the preset
``kuditipudi2019_mnist_subset`` is only composed and checked (its run takes CPU-minutes).
"""
from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from modeconn import data as D
from modeconn.run.cli import CONF_DIR
from modeconn.run.config import to_container, validate
from modeconn.evaluation.evaluate import PathEval
from modeconn.models import build
from modeconn.reporting.plots import plot_paths, spans_decades
from modeconn.reporting.report import main as report_main
from modeconn.run.endpoint_stability import measure_figure2
from modeconn.stability.figure2 import Figure2Options
from modeconn.training.train import TrainConfig, evaluate_model

MODEL = {"name": "convnet", "width": 4, "depth": 2, "bias": False, "channel_dropout": 0.0}
TRAINER = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, epochs=1, batch_size=64,
                      schedule="constant", device="cpu")
TINY = {"trials": 2, "samples": 3, "keeps": [0.5, 1.0], "segment_points": 5, "segment_tries": 2,
        "widths": [1, 2], "max_items": 96}


def test_preset_composes_with_the_papers_settings():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=kuditipudi2019_mnist_subset"])
    validate(cfg)
    assert cfg.data.name == "mnist_subset" and cfg.data.num_test == 1000
    assert (cfg.model.name, cfg.model.width, cfg.model.depth, cfg.model.bias) == ("convnet", 32, 3, False)
    t = cfg.trainer
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size) == ("sgd", 0.1, 0.0, 0.0, 64)
    assert set(cfg.path) == {"linear", "dropout", "narrow", "bezier"} and cfg.path.narrow.p == 0.2
    opts = Figure2Options.from_dict(to_container(cfg.stability.figure2))
    assert (opts.trials, opts.samples, opts.segment_points, opts.segment_p) == (5, 20, 101, 0.2)
    assert opts.keeps == pytest.approx([0.5 + 0.05 * i for i in range(10)]) and opts.widths == [1, 2, 4, 6, 8, 10]


def test_figure2_options_name_the_bad_key():
    with pytest.raises(ValueError, match="unknown stability.figure2 key.*'sample'"):
        Figure2Options.from_dict({"sample": 3})
    with pytest.raises(ValueError, match="stability.figure2.segment_p"):
        Figure2Options.from_dict({"segment_p": 1.0})


@pytest.fixture(scope="module")
def figure2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig2")
    data = D.load("digits", image=True)
    torch.manual_seed(0)
    net = build("convnet", (1, 8, 8), 10, **{k: v for k, v in MODEL.items() if k != "name"})
    from modeconn.training.train import train

    train(net, data, TRAINER, seed=0, progress=False)
    theta = {k: v.detach().clone() for k, v in net.state_dict().items()}
    summary = measure_figure2(net, {0: theta}, data, out, TINY, MODEL, TRAINER)
    return out, data, net, theta, summary


@pytest.mark.slow  # needs the module's end-to-end Figure 2 run (about 10 s)
def test_figure2_panels_over_trials(figure2_run):
    out, data, net, theta, summary = figure2_run
    result = json.loads((out / "figure2.json").read_text())
    assert result["seeds"] == [0, 1] and (out / "figure2" / "seed1.pt").is_file()  # one more net trained
    assert (out / "figure2" / "width2_seed1.pt").is_file() and result["num_items"] == 96
    xy = D.materialize(data, "train", 96)
    full_loss, full_acc = evaluate_model(net, xy)
    # left: the best of the samples, and keep 1.0 drops nothing: every sample is the full net
    first = result["left"]["per_trial"][0]
    assert [sorted(r["kept"].values()) for r in first] == [[2, 2], [4, 4]]  # floor(keep * 4) per layer
    for row in first:
        assert row["loss"] == min(row["sample_losses"]) and len(row["sample_losses"]) == 3
    assert first[1]["sample_losses"] == pytest.approx([full_loss] * 3, rel=1e-5)
    assert first[1]["accuracy"] == pytest.approx(full_acc)
    # centre: the segment starts at the net and ends at its dropout copy
    seg = result["centre"]["per_trial"][0]
    assert seg["ts"] == pytest.approx([0, 0.25, 0.5, 0.75, 1]) and 1 <= seg["tries"] <= 2
    assert seg["loss"][0] == pytest.approx(full_loss, rel=1e-5)
    assert seg["loss"][-1] == pytest.approx(seg["copy_loss"], rel=1e-5)
    # mean and std over the two trials, as the error bars
    for panel, key in (("left", "keep"), ("right", "width")):
        for i, row in enumerate(result[panel]["mean_std"]):
            vals = [t[i]["loss"] for t in result[panel]["per_trial"]]
            assert row["loss_mean"] == pytest.approx(np.mean(vals)) and row["loss_std"] == pytest.approx(np.std(vals))
    assert [r["width"] for r in summary["right"]] == [1, 2]
    assert set(summary["seconds"]) == {"training", "left", "centre", "right"}
    assert mpimg.imread(out / "figure2.png").shape[1] > 1000


@pytest.mark.slow  # needs the module's end-to-end Figure 2 run (about 10 s)
def test_report_redraws_figure2_from_several_runs(figure2_run, tmp_path):
    out = figure2_run[0]
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        (run / "figure2.json").write_text((out / "figure2.json").read_text())
        (run / "summary.json").write_text(json.dumps({"name": name, "paths": {}}))
        runs.append(str(run))
    assert report_main([*runs, "--figures", str(tmp_path / "figs")]) == 0
    pooled = json.loads((tmp_path / "figs" / "figure2.json").read_text())
    assert len(pooled["seeds"]) == 4 and (tmp_path / "figs" / "figure2.png").is_file()


def _eval(name: str, losses, bound=None) -> PathEval:
    ts = list(np.linspace(0, 1, len(losses)))
    return PathEval(name=name, ts=ts, metrics={"train_loss": list(losses), "test_error": [0.1] * len(losses)},
                    steps=[0.0] * len(ts), knots=[0.0, 1.0], labels=None, segments=[0] * len(ts), bound=bound,
                    barriers={}, sizes={}, seconds=0.0, info={})


def test_paths_figure_adds_a_log_panel_when_losses_span_decades(tmp_path):
    small = _eval("dropout", [0.002, 0.004, 0.002], bound=0.0056)
    line = _eval("linear", [0.002, 0.43, 0.002])
    assert spans_decades([0.002, 0.43]) and not spans_decades([0.3, 0.43])
    wide = mpimg.imread(plot_paths([line, small], tmp_path / "wide.png")).shape[1]
    narrow = mpimg.imread(plot_paths([_eval("a", [0.3, 0.4, 0.3])], tmp_path / "narrow.png")).shape[1]
    assert wide > 1.4 * narrow  # three panels (train loss, log train loss, test error) against two
    forced = mpimg.imread(plot_paths([_eval("a", [0.3, 0.4, 0.3])], tmp_path / "f.png", log_panel="always")).shape[1]
    assert forced == wide
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, no leftovers
    with pytest.raises(ValueError, match="log_panel"):
        plot_paths([line], tmp_path / "x.png", log_panel="yes")
