"""The experiment presets (conf/experiment/*.yaml) and the sweep launchers.

Every preset composes and passes ``modeconn.run.config.validate``; every ``_quick`` preset runs end to end on the
digits data; the joblib and submitit launchers run a two-job sweep that writes one run directory per job
and, relaunched, skips the finished jobs. Every path a preset names has an importable constructor: an import
regression fails here, it is never skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import requires
from modeconn.run.cli import CONF_DIR
from modeconn.run.config import validate
from modeconn.paths.registry import BUILDERS
from modeconn.run.pipeline import run

PRESET_DIR = Path(CONF_DIR) / "experiment"
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
QUICK = [p for p in PRESETS if p.endswith("_quick")]
PAPERS = [p for p in PRESETS if f"{p}_quick" in QUICK]
EXPECTED = {
    "kuditipudi2019_mnist_conv", "kuditipudi2019_cifar10_vgg11",
    "garipov2018_cifar10_vgg16", "garipov2018_cifar10_preresnet164", "gpu_check",
}
QUICK_SECONDS = 60  # each quick preset should take about this long on 2 CPU cores (reported, not asserted)
CURVE_EPOCHS = 2  # the end-to-end test trains curves this long: it asserts no curve's quality, only that it runs


def preset(name: str, *overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}", *overrides],
                       return_hydra_config=hydra)


@pytest.fixture
def one_thread():
    """The quick presets' models are tiny: one intra-op thread is as fast and does not oversubscribe a
    shared CI machine (with 2 threads on a busy 2-core box a step took 10x longer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ composition, validation

def test_every_paper_preset_and_its_quick_variant_exist():
    assert EXPECTED <= set(PRESETS)
    for name in EXPECTED - {"gpu_check"}:
        assert f"{name}_quick" in QUICK, name


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_names_its_run(name):
    cfg = preset(name)
    assert cfg.name == name
    assert "linear" in cfg.path
    # a preset compares paths: several constructions, or one path naive against aligned
    assert len(cfg.path) >= 2 or cfg.align.method != "none", "a preset compares at least two paths"
    for path_name, options in cfg.path.items():  # every selected path has its full option set
        assert options is not None, path_name
    with open(PRESET_DIR / f"{name}.yaml") as f:
        assert f.readline().strip() == "# @package _global_"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(name):
    cfg = preset(name)
    for path_name in cfg.path:  # the constructor imports (an ImportError fails the test)
        assert callable(BUILDERS[path_name].function), path_name
    validate(cfg)


@pytest.mark.parametrize("name", PAPERS)
def test_a_quick_variant_has_its_papers_structure(name):
    full, quick = preset(name), preset(f"{name}_quick")
    assert quick.data.name == "digits"
    assert list(quick.path) == list(full.path)
    assert quick.model.name == full.model.name
    for key in ("optimizer", "batch_size", "schedule", "momentum"):
        assert quick.trainer[key] == full.trainer[key], key
    for path_name in ("bezier", "polychain"):
        if path_name in full.path:
            for key in ("kind", "num_bends", "lr", "wd", "batch_size"):
                assert quick.path[path_name][key] == full.path[path_name][key], (path_name, key)


def test_the_papers_hyperparameters():
    mnist = preset("kuditipudi2019_mnist_conv")
    assert (mnist.data.name, mnist.model.name, mnist.model.width, mnist.model.depth, mnist.model.bias) == \
        ("mnist", "convnet", 32, 3, False)
    t = mnist.trainer
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size, t.schedule) == \
        ("sgd", 0.1, 0.0, 0.0, 64, "constant")
    assert 4500 <= t.epochs * 60000 / t.batch_size <= 6000  # ~5000 iterations
    assert list(mnist.path) == ["linear", "dropout", "noise", "narrow"]
    assert mnist.path.dropout.keep == 0.5 and mnist.path.dropout.trials == 20 and mnist.path.narrow.p == 0.2

    vgg11 = preset("kuditipudi2019_cifar10_vgg11")
    assert (vgg11.data.name, vgg11.model.name, vgg11.model.depth, vgg11.model.fc_dropout) == ("cifar10", "vgg", 11, 0.5)
    assert list(vgg11.model.channel_dropout) == [0.25] * 3 + [0.5] * 5
    t = vgg11.trainer
    assert (t.lr, t.momentum, t.weight_decay, t.epochs, t.batch_size, t.schedule, t.step_size, t.gamma) == \
        (0.05, 0.9, 5e-4, 300, 128, "step", 30, 0.5)
    assert list(vgg11.path) == ["linear", "noise", "narrow"]

    for name, model, depth, (lr, wd, epochs), (curve_lr, curve_epochs) in [
        ("garipov2018_cifar10_vgg16", "vgg", 16, (0.05, 5e-4, 200), (0.015, 600)),
        ("garipov2018_cifar10_preresnet164", "preresnet", 164, (0.1, 3e-4, 150), (0.03, 200)),
    ]:
        cfg = preset(name)
        assert (cfg.data.name, cfg.model.name, cfg.model.depth) == ("cifar10", model, depth)
        t = cfg.trainer
        assert (t.lr, t.weight_decay, t.epochs, t.batch_size, t.momentum, t.schedule) == \
            (lr, wd, epochs, 128, 0.9, "garipov")
        assert list(cfg.path) == ["linear", "bezier", "polychain"]
        for kind in ("bezier", "polychain"):
            c = cfg.path[kind]
            assert (c.kind, c.num_bends, c.epochs, c.lr, c.wd, c.batch_size) == \
                (kind, 3, curve_epochs, curve_lr, wd, 128)


def test_removing_a_presets_path_from_the_command_line():
    cfg = preset("garipov2018_cifar10_vgg16", "~path.polychain")
    assert list(cfg.path) == ["linear", "bezier"]


# --------------------------------------------------------------------------------- quick presets run

@pytest.mark.slow
@pytest.mark.parametrize("name", QUICK)
def test_a_quick_preset_runs_end_to_end(name, tmp_path, one_thread):
    cfg = preset(name, "progress=false")
    for options in cfg.path.values():  # curve training was over half of each run's time
        if options.get("kind") in ("bezier", "polychain"):
            options.epochs = min(options.epochs, CURVE_EPOCHS)
    started = time.time()
    summary = run(cfg, tmp_path)
    seconds = time.time() - started
    assert summary["finished"]
    expected = []
    for path_name in cfg.path:  # every path, then its aligned and REPAIR variants where the preset asks
        expected.append(path_name)
        if cfg.align.method != "none":
            expected.append(f"{path_name} (aligned)")
        if cfg.align.repair:
            expected.append(f"{path_name} ({'aligned+' if cfg.align.method != 'none' else ''}REPAIR)")
    assert list(summary["paths"]) == expected
    for file in ("report.md", "paths.png", "summary.json", "endpoints/seed0.pt", "endpoints/seed1.pt"):
        assert (tmp_path / file).exists(), file
    for end in summary["endpoints"]:
        assert end["metrics"]["train_acc"] > 0.9, (name, end)  # the endpoints really learned
    for path_name, p in summary["paths"].items():
        if p["within_bound"] is not None:
            assert p["within_bound"], (path_name, p["barriers"]["train_loss"]["max"], p["bound"])
    print(f"\n{name}: {seconds:.1f} s with {CURVE_EPOCHS}-epoch curves (the preset: about {QUICK_SECONDS} s)")


@pytest.mark.slow
def test_the_gpu_check_preset_runs_at_toy_size_on_the_cpu(tmp_path, one_thread):
    # the preset meant for a GPU machine, shrunk: a broken preset is caught before device time is spent
    cfg = preset("gpu_check", "device=cpu", "data.num_train=256", "data.num_test=64", "eval.num_points=3",
                 "eval.bn_items=256", "trainer.epochs=1", "path.bezier.epochs=1")
    summary = run(cfg, tmp_path)
    assert summary["finished"] and list(summary["paths"]) == ["linear", "bezier"]
    assert "(3, 32, 32)" in summary["data"]


# ------------------------------------------------------------------------------------------- launchers

SWEEP = ["experiment=kuditipudi2019_mnist_conv_quick", "~path.dropout", "~path.noise", "~path.narrow", "stability.dropout_keep=[]",
         "trainer.epochs=2", "eval.num_points=5", "progress=false", "seed=0,1"]


def cli(*args, cwd, **env_vars):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **env_vars}
    return subprocess.run([sys.executable, "-m", "modeconn.run.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def check_sweep_and_relaunch(launcher: list[str], sweep_dir: Path, cwd: Path, extra_entries: set[str] = frozenset(),
                             **env_vars):
    args = ["-m", *launcher, *SWEEP, f"hydra.sweep.dir={sweep_dir}"]
    first = cli(*args, cwd=cwd, **env_vars)
    assert first.returncode == 0, first.stderr[-3000:]
    # one run directory per job, nothing else but Hydra's multirun.yaml (and the launcher's own folder)
    assert {p.name for p in sweep_dir.iterdir()} == {"0", "1", "multirun.yaml", *extra_entries}
    summaries = [sweep_dir / job / "summary.json" for job in ("0", "1")]
    seeds = [json.loads(s.read_text())["endpoints"][1]["seed"] for s in summaries]
    assert seeds == [1, 3]  # seed=k trains endpoints 2k and 2k+1
    stamps = {f: f.stat().st_mtime_ns for f in sweep_dir.rglob("*") if f.is_file() and ".submitit" not in f.parts
              and f.parent.name != ".hydra" and f.name != "multirun.yaml" and not f.name.endswith(".log")}
    second = cli(*args, cwd=cwd, **env_vars)
    assert second.returncode == 0, second.stderr[-3000:]
    for f, stamp in stamps.items():  # finished jobs were skipped: no result file rewritten
        assert f.stat().st_mtime_ns == stamp, f
    assert not list(cwd.glob("multirun")) and not list(cwd.glob("outputs"))


@requires("hydra_plugins.hydra_joblib_launcher", extra="launchers")
@pytest.mark.slow
def test_a_joblib_sweep_runs_jobs_in_parallel_and_skips_finished_ones(tmp_path):
    check_sweep_and_relaunch(["hydra/launcher=local", "hydra.launcher.n_jobs=2"], tmp_path / "sweep", tmp_path)


@requires("hydra_plugins.hydra_submitit_launcher", extra="launchers")
@pytest.mark.slow
def test_a_submitit_sweep_runs_and_skips_finished_ones(tmp_path):
    # submitit's local executor: the SLURM launcher's code path without sbatch. It does not limit the jobs'
    # threads as joblib does (on SLURM the slurm launcher config sets OMP_NUM_THREADS per job).
    check_sweep_and_relaunch(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
                             tmp_path / "sweep", tmp_path, {".submitit"}, OMP_NUM_THREADS="1")


@requires("hydra_plugins.hydra_submitit_launcher", extra="launchers")
def test_the_slurm_launcher_configs_compose():
    cfg = preset("garipov2018_cifar10_vgg16", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.max_num_timeout) == ("gpu", 1, 5)
    assert ".submitit" in launcher.submitit_folder
    assert any("OMP_NUM_THREADS" in line for line in launcher.setup)
    cpu = preset("kuditipudi2019_mnist_conv_quick", "hydra/launcher=slurm_cpu", hydra=True).hydra.launcher
    assert cpu._target_.endswith("SlurmLauncher") and cpu.gpus_per_node is None
