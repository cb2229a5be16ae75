"""The CLI's error contract (docs/cli.md, "Errors"): bad input exits 2 with one line on stderr naming the key
or file and no traceback, an interrupt exits 130, a bug exits 1; nothing in an existing run directory
changes. Most cases fail before any training, through the console entry point in this process."""
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from modeconn.run import cli

TINY = ["model.hidden=[8]", "trainer.epochs=1", "eval.num_points=3", "progress=false", "path=[linear]"]


def invoke(args, capsys, monkeypatch, cwd, env=None):
    """``modeconn ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["modeconn", *args])
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        for h in root.handlers:  # Hydra's handlers write to this test's captured stdout and cli.log
            if h not in handlers:
                h.close()
        root.handlers[:], root.level = handlers, level
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder):
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run made through the CLI, and the bad files the table points at."""
    root = tmp_path_factory.mktemp("errors")
    mp = pytest.MonkeyPatch()
    capsys = _Capture()
    try:
        code, _, err = invoke([*TINY, f"hydra.run.dir={root}/done"], capsys, mp, root)
    finally:
        mp.undo()
    assert code == 0, err
    good = root / "done" / "endpoints" / "seed0.pt"
    (root / "empty.pt").write_bytes(b"")
    (root / "random.pt").write_bytes(os.urandom(4096))
    (root / "truncated.pt").write_bytes(good.read_bytes()[:300])
    for name in ("empty", "random", "truncated"):
        (root / f"{name}.json").write_text("{}")
    (root / "badside.pt").write_bytes(good.read_bytes())
    (root / "badside.json").write_text("{not json")
    (root / "a_file").write_text("")
    return root


class _Capture:
    """capsys for the module fixture (pytest's capsys is function-scoped): captured by pytest anyway."""

    def readouterr(self):
        return "", ""


def ends(root, a, b="done/endpoints/seed1.pt"):
    return f"endpoints=[{root}/{a},{root}/{b}]"


# (id, overrides after TINY ({root} is the fixture's folder), words the line must hold, run directory)
CASES = [
    ("unknown key", ["model.hiden=3"], ["model.hiden"], "done"),
    ("unknown path", ["path=[nosuch]"], ["nosuch", "linear", "dropout", "bezier", "polychain"], "done"),
    ("unknown preset", ["experiment=nosuch"], ["experiment/nosuch", "kuditipudi2019_mnist_conv_quick"], "done"),
    ("unknown group option", ["trainer=nosuch"], ["trainer/nosuch", "default"], "done"),
    ("unparsable override", ["model.hidden=[1,"], ["model.hidden"], "done"),
    ("added unknown model key", ["+model.hiden=3"], ["model", "hiden", "hidden"], "done"),
    ("wrong type", ["model.hidden=abc"], ["model.hidden", "abc"], "done"),
    ("invalid sizes", ["model.hidden=[0,-3]"], ["model.hidden"], "done"),
    ("wrong type, float option", ["model.dropout=abc"], ["model.dropout"], "done"),
    ("wrong type, bool option", ["model.bias=3"], ["model.bias", "true or false"], "done"),
    ("bad seed", ["seed=abc"], ["seed"], "done"),
    ("negative seed", ["seed=-1"], ["seed"], "done"),
    ("broken interpolation", ["name=${{nosuch}}"], ["name", "nosuch"], "done"),
    ("unknown optimizer", ["trainer.optimizer=foo"], ["trainer.optimizer", "sgd", "adam"], "done"),
    ("wrong type, trainer", ["trainer.epochs=abc"], ["trainer.epochs"], "done"),
    ("negative learning rate", ["trainer.lr=-1"], ["trainer.lr"], "done"),
    ("added unknown trainer key", ["+trainer.foo=1"], ["trainer", "foo"], "done"),
    ("too few points", ["eval.num_points=1"], ["eval.num_points"], "done"),
    ("unknown dataset", ["data.name=imagenet"], ["data.name", "digits"], "done"),
    ("added unknown data key", ["+data.foo=1"], ["data", "foo"], "done"),
    ("unknown device", ["device=tpu"], ["device"], "done"),
    ("no threads", ["threads=0"], ["threads"], "done"),
    ("curve with two bends", ["path=[bezier]", "path.bezier.num_bends=2"], ["path.bezier.num_bends"], "done"),
    ("curve lr", ["path=[polychain]", "path.polychain.lr=-0.1"], ["path.polychain.lr"], "done"),
    ("dropout keep above 1/2", ["path=[dropout]", "path.dropout.keep=0.8"], ["path.dropout.keep", "1/2"], "done"),
    ("dropout trials", ["path=[dropout]", "path.dropout.trials=0"], ["path.dropout.trials"], "done"),
    ("noise p below 1/2", ["path=[noise]", "path.noise.p=0.2"], ["path.noise.p", "narrow"], "done"),
    ("unknown path option", ["+path.linear.foo=1"], ["path.linear", "foo"], "done"),
    ("no path", ["path=[]"], ["path"], "done"),
    ("stability keep", ["stability.dropout_keep=[0.5,1.5]"], ["stability.dropout_keep"], "done"),
    ("one endpoint", ["endpoints=[{root}/done/endpoints/seed0.pt]"], ["endpoints"], "done"),
    ("missing endpoint", [ends("{root}", "missing.pt")], ["missing.pt"], "done"),
    ("another config", ["trainer.epochs=2"], ["another config"], "done"),
    ("empty checkpoint", [ends("{root}", "empty.pt")], ["empty.pt"], "fresh"),
    ("random-bytes checkpoint", [ends("{root}", "random.pt")], ["random.pt"], "fresh"),
    ("truncated checkpoint", [ends("{root}", "truncated.pt")], ["truncated.pt"], "fresh"),
    ("corrupt sidecar", [ends("{root}", "badside.pt")], ["badside.json"], "fresh"),
    ("output under a file", [], ["a_file"], "{root}/a_file/run"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow  # the CLI end to end (the finished run, or a process)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(case, finished, capsys, monkeypatch):
    _, overrides, words, run_dir = case
    root = finished
    run_dir = {"done": root / "done", "fresh": root / "fresh"}.get(run_dir, run_dir.format(root=root))
    before = snapshot(root)
    args = [*TINY, *(o.format(root=root) for o in overrides), f"hydra.run.dir={run_dir}"]
    code, _, err = invoke(args, capsys, monkeypatch, root)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("modeconn: error: "), err
    assert "Traceback" not in err
    assert all(w.format(root=root) in lines[0] for w in words), lines[0]
    assert snapshot(root) == before  # the finished run, the bad files: untouched; no fresh directory left
    assert not (root / "fresh").exists()


def test_more_than_25_bad_inputs():
    assert len(CASES) >= 25


@pytest.mark.slow  # the CLI end to end (the finished run, or a process)
def test_a_corrupt_resume_or_curve_file_names_the_file_and_how_to_start_over(finished, capsys, monkeypatch):
    root = finished
    resume = root / "interrupted" / "endpoints" / "seed0.pt.resume.pt"
    resume.parent.mkdir(parents=True)
    resume.write_bytes(os.urandom(1000))
    code, _, err = invoke([*TINY, f"hydra.run.dir={root}/interrupted"], capsys, monkeypatch, root)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(resume) in err and "delete" in err
    curve = root / "curve" / "work" / "bezier.pt"
    curve.parent.mkdir(parents=True)
    curve.write_bytes(b"")
    args = [*TINY, "path=[bezier]", ends(root, "done/endpoints/seed0.pt"), f"hydra.run.dir={root}/curve"]
    code, _, err = invoke(args, capsys, monkeypatch, root)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(curve) in err and "delete" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.slow  # the CLI end to end (the finished run, or a process)
def test_a_read_only_output_directory(finished, capsys, monkeypatch, tmp_path):
    tmp_path.chmod(0o555)
    try:
        code, _, err = invoke([*TINY, f"hydra.run.dir={tmp_path}/run"], capsys, monkeypatch, finished)
    finally:
        tmp_path.chmod(0o755)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path) in err, err


@pytest.mark.slow  # the CLI end to end (the finished run, or a process)
def test_debug_keeps_the_traceback_and_a_bug_exits_1(finished, capsys, monkeypatch):
    args = [*TINY, "model.hidden=abc", f"hydra.run.dir={finished}/fresh"]
    code, _, err = invoke(args, capsys, monkeypatch, finished, env={"MODECONN_DEBUG": "1"})
    assert code == 2 and "Traceback" in err and "model.hidden" in err
    monkeypatch.delenv("MODECONN_DEBUG")

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("modeconn.run.pipeline.run", broken)
    code, _, err = invoke([*TINY, f"hydra.run.dir={finished}/fresh"], capsys, monkeypatch, finished)
    assert code == 1 and "Traceback" in err and "internal error" in err


def test_tilde_in_a_path_value_means_the_home_folder(monkeypatch, tmp_path):
    assert cli.quote_tilde("data.root=~/data") == "data.root='~/data'"
    assert cli.quote_tilde("+data.root=~/x/~y") == "+data.root='~/x/~y'"
    for unchanged in ("~path.bezier", "seed=1", "data.root='~/data'", "data.root=~/a,~/b", "x=[~/a]"):
        assert cli.quote_tilde(unchanged) == unchanged
    from hydra import compose, initialize_config_dir

    from modeconn.run.pipeline import load_data

    with initialize_config_dir(config_dir=cli.CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=mnist", cli.quote_tilde("data.root=~/nodata")])
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(Exception, match=str(tmp_path / "nodata")):  # the expanded folder is where it looked
        load_data(cfg, torch.device("cpu"))


def _as_from_a_terminal() -> None:
    """In the child: SIGINT unblocked and at its default, as a shell gives it (a test worker's own signal
    mask or disposition, inherited through fork and exec, would otherwise make the child ignore Ctrl-C)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # the CLI end to end (the finished run, or a process)
def test_ctrl_c_exits_130_with_one_line_and_the_rerun_resumes(tmp_path):
    """Interrupt during endpoint training: exit 130, one line; the same command resumes from the last epoch."""
    args = [sys.executable, "-m", "modeconn.run.cli", "model.hidden=[8]", "trainer.epochs=4000", "eval.num_points=3",
            "progress=false", "path=[linear]", "threads=1", f"hydra.run.dir={tmp_path}/run"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MODECONN_DEBUG", None)
    popen = dict(cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 preexec_fn=_as_from_a_terminal)
    proc = subprocess.Popen(args, **popen)
    resume = tmp_path / "run" / "endpoints" / "seed0.pt.resume.pt"
    deadline = time.time() + 120
    while not resume.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["modeconn: interrupted; rerun the same command to resume"]
    log = tmp_path / "run" / "cli.log"
    again = subprocess.Popen(args, **popen)
    deadline = time.time() + 120
    while again.poll() is None and time.time() < deadline and "from epoch" not in log.read_text():
        time.sleep(0.1)
    again.send_signal(signal.SIGINT)
    again.communicate(timeout=60)
    assert re.search(r"resumed from epoch \d+", log.read_text()), log.read_text()[-2000:]
