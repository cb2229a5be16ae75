"""The CLI end to end on tiny configs: a run, its outputs, bad values, foreign checkpoints, sweeps."""
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from modeconn.run.cli import CONF_DIR, selected_paths
from modeconn.run.config import ConfigError
from modeconn.run.pipeline import run

TINY = ["model.hidden=[16,16]", "trainer.epochs=2", "eval.num_points=5", "progress=false", "path=[linear]"]


def config(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def cli(*args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "modeconn.run.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # end to end: about 5 s or more
def test_a_tiny_run_writes_report_plot_tables_and_checkpoints(tmp_path):
    summary = run(config(), tmp_path)
    assert summary["finished"] and set(summary["paths"]) == {"linear"}
    for name in ("report.md", "paths.png", "summary.json", "config.yaml", "paths/linear.json", "paths/linear.csv",
                 "endpoints/seed0.pt", "endpoints/seed0.json", "endpoints/seed1.pt"):
        assert (tmp_path / name).exists(), name
    assert "| linear | 1 |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "endpoints/seed1.json").read_text())["seed"] == 1


def test_a_finished_run_is_not_redone_or_overwritten(tmp_path):
    run(config(), tmp_path)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    again = run(config("progress=true"), tmp_path)
    assert again["finished"] and again["skipped"]
    with pytest.raises(ConfigError, match="another config"):
        run(config("trainer.epochs=3"), tmp_path)
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert oct((tmp_path / "summary.json").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow  # end to end: about 5 s or more
def test_a_path_selection_on_the_command_line_narrows_a_preset(tmp_path):
    assert selected_paths(["seed=1", "path=[linear,bezier]"]) == ["linear", "bezier"]
    assert selected_paths(["path=linear"]) == ["linear"] and selected_paths(["seed=1"]) is None
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=kuditipudi2019_mnist_conv_quick", "path=[linear]", "model.width=4", "trainer.epochs=1",
            "eval.num_points=3", "progress=false"])
    assert "dropout" in cfg.path  # the preset's options add its paths back ...
    summary = run(cfg, tmp_path, only=["linear"])  # ... and the CLI passes only what was selected
    assert list(summary["paths"]) == ["linear"]


@pytest.mark.parametrize("override, words", [
    ("trainer.optimizer=foo", ["trainer.optimizer", "sgd", "adam"]),
    ("eval.num_points=1", ["eval.num_points"]),
    ("data.name=imagenet", ["data.name", "digits"]),
    ("+path.dropout.nonsense=3", ["path.dropout", "nonsense", "keep"]),
    ("seed=-1", ["seed"]),
    ("+path.dropout.keep=0.8", ["path.dropout.keep", "1/2", "0.8"]),
    ("+path.bezier.num_bends=2", ["path.bezier.num_bends", "3"]),
    ("+path.noise.p=0.2", ["path.noise.p", "narrow"]),
    ("threads=0", ["threads"]),
    ("stability.dropout_keep=[0.5,1.5]", ["stability.dropout_keep"]),
])
def test_invalid_values_name_the_key_and_what_is_allowed(tmp_path, override, words):
    with pytest.raises(ConfigError) as err:
        run(config(override), tmp_path)
    assert all(w in str(err.value) for w in words)
    assert not (tmp_path / "summary.json").exists()


def test_existing_checkpoints_as_endpoints_and_foreign_ones_refused(tmp_path):
    run(config(), tmp_path / "a")
    ends = f"endpoints=[{tmp_path}/a/endpoints/seed0.pt,{tmp_path}/a/endpoints/seed1.pt]"
    summary = run(config(ends), tmp_path / "b")
    assert summary["endpoints"][0]["file"].endswith("seed0.pt")
    assert not (tmp_path / "b" / "endpoints").exists()
    from modeconn.io.checkpoint import CheckpointMismatchError
    with pytest.raises(CheckpointMismatchError, match="different architecture"):
        run(config(ends, "model.hidden=[8,16]"), tmp_path / "c")


@pytest.mark.slow  # end to end: about 5 s or more
def test_console_script_errors_cleanly_and_sweeps_skip_finished_jobs(tmp_path):
    bad = cli(*TINY, "trainer.lr=-1", f"hydra.run.dir={tmp_path}/bad", cwd=tmp_path)
    assert bad.returncode == 2 and "trainer.lr" in bad.stderr and "Traceback" not in bad.stderr
    sweep = ["-m", *TINY, "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep"]
    first = cli(*sweep, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    summaries = sorted((tmp_path / "sweep").rglob("summary.json"))
    assert len(summaries) == 2
    stamps = [s.stat().st_mtime_ns for s in summaries]
    assert cli(*sweep, cwd=tmp_path).returncode == 0
    assert [s.stat().st_mtime_ns for s in summaries] == stamps
    seeds = sorted(json.loads(s.read_text())["endpoints"][0]["seed"] for s in summaries)
    assert seeds == [0, 2]
    report = cli("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert report.returncode == 0 and "2 run(s)" in report.stdout and "| linear | 2 |" in report.stdout


@pytest.mark.slow  # end to end: about 5 s or more
def test_endpoint_stability_measurements_for_the_paper_figures(tmp_path):
    summary = run(config("stability.dropout_keep=[0.5,0.9]", "stability.noise=true", "stability.noise_items=16",
                         "stability.trials=3"), tmp_path)
    rows = summary["stability"]["dropout"]["seed0"]
    assert [r["keep"] for r in rows] == [0.5, 0.9]
    endpoint = summary["endpoints"][0]["metrics"]  # the same full training split, the same plain cross-entropy
    assert rows[0]["loss"] == pytest.approx(endpoint["train_loss"], abs=1e-5)
    assert all(r["epsilon"] >= 0 and r["max_nested_loss"] >= r["loss_all_dropped"] for r in rows)
    assert summary["stability"]["noise"]["seed1"]["epsilon"] > 0
    for name in ("stability.json", "dropout_stability.png", "noise_stability_seed0.png", "noise_stability_seed1.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "## Endpoint stability" in (tmp_path / "report.md").read_text()


@pytest.mark.slow  # end to end: about 5 s or more
def test_a_refused_rerun_leaves_the_finished_run_untouched(tmp_path, capsys, monkeypatch):
    from test_errors import invoke, snapshot

    args = [*TINY, f"hydra.run.dir={tmp_path}/run"]
    assert invoke(args, capsys, monkeypatch, tmp_path)[0] == 0
    record = snapshot(tmp_path / "run")
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "cli.log"} <= set(record)
    code, _, err = invoke([*args, "trainer.epochs=3"], capsys, monkeypatch, tmp_path)
    assert code == 2 and "another config" in err
    code, out, _ = invoke(args, capsys, monkeypatch, tmp_path)
    assert code == 0 and "already finished" in out
    assert snapshot(tmp_path / "run") == record  # Hydra's record of the finished run included


@pytest.mark.slow  # end to end: about 5 s or more
def test_changed_endpoint_files_are_refused_instead_of_already_finished(tmp_path):
    import shutil

    import torch

    run(config(), tmp_path / "a")
    for k in (0, 1):
        for ext in ("pt", "json"):
            shutil.copy(tmp_path / f"a/endpoints/seed{k}.{ext}", tmp_path / f"end{k}.{ext}")
    ends = f"endpoints=[{tmp_path}/end0.pt,{tmp_path}/end1.pt]"
    summary = run(config(ends), tmp_path / "b")
    assert all(len(e["sha256"]) == 64 for e in summary["endpoints"])
    assert run(config(ends), tmp_path / "b")["skipped"]
    state = torch.load(tmp_path / "end1.pt", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "end1.pt")
    with pytest.raises(ConfigError, match=r"end1\.pt changed"):
        run(config(ends), tmp_path / "b")
    (tmp_path / "a/endpoints/seed0.pt").write_bytes((tmp_path / "end1.pt").read_bytes())  # a run's own endpoint
    with pytest.raises(ConfigError, match=r"seed0\.pt changed"):
        run(config(), tmp_path / "a")


@pytest.mark.slow  # end to end: about 5 s or more
def test_a_run_records_what_its_numbers_depend_on_and_refuses_other_threads(tmp_path):
    import torch

    threads = torch.get_num_threads()
    summary = run(config(), tmp_path)
    prov = summary["provenance"]
    assert prov["threads"] == threads and prov["torch"] == torch.__version__ and prov["device"] == "cpu"
    assert {"device_name", "deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark"} <= set(prov)
    assert f"{threads} CPU thread(s)" in (tmp_path / "report.md").read_text()
    try:
        with pytest.raises(ConfigError, match=rf"threads {threads} -> {threads + 1}"):
            run(config(f"threads={threads + 1}"), tmp_path)
        assert run(config(f"threads={threads + 1}", "allow_provenance_change=true"), tmp_path)["skipped"]
        # an interrupted run: started under one thread count, resumed under another
        (tmp_path / "summary.json").unlink()
        with pytest.raises(ConfigError, match="interrupted run was started under other settings"):
            run(config(f"threads={threads + 1}"), tmp_path)
    finally:
        torch.set_num_threads(threads)


def test_report_groups_runs_by_config_minus_seed_and_never_pools_configs(tmp_path, capsys):
    from omegaconf import OmegaConf

    from modeconn.reporting import report

    for i, (hidden, seed, value) in enumerate([([64, 64], 0, 1.0), ([64, 64], 1, 2.0), ([64, 64], 2, 3.0),
                                               ([256, 256], 0, 10.0), ([256, 256], 1, 20.0), ([256, 256], 2, 30.0)]):
        cfg = config(f"model.hidden={hidden}".replace(" ", ""), f"seed={seed}", f"progress={i % 2 == 0}")
        (tmp_path / str(i)).mkdir()
        OmegaConf.save(cfg, tmp_path / str(i) / "config.yaml")
        barriers = {col: value for col in report.COLUMNS}
        (tmp_path / str(i) / "summary.json").write_text(json.dumps(
            {"paths": {"linear": {"barriers": {"train_loss": barriers}, "bound": None}}}))
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    narrow, wide = out.split("### model.hidden=[256, 256]")
    assert "### model.hidden=[64, 64]" in narrow and "seed" not in narrow.split("\n")[0]
    assert "| linear | 3 | 2.0000 ± 0.8165" in narrow and "| linear | 3 | 20.0000 ± 8.1650" in wide
    assert "seed(s) 0, 1, 2" in narrow and "progress" not in out  # progress changes no result
    assert "| 6 |" not in out and "11.0000" not in out  # never one row over both widths
