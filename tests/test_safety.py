"""No file modeconn reads can run code: a pickle payload at every place a file is read is refused, through
the API and the CLI, and the payload's side effect (a marker file) never happens."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from modeconn import data as D
from modeconn.checkpoint import UnreadableFileError, save_checkpoint
from modeconn.models import build
from modeconn.paths import fit_curve, load_curve, narrow_path
from modeconn.paths.noise import narrow_widths
from modeconn.train import TrainConfig, resume_path, train

HIDDEN = [16, 16]


class Payload:
    """Unpickling this object opens (creates) ``marker``: the proof that a file ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def plant(tmp_path):
    """``plant(path)`` writes a payload file that looks like a modeconn file; yields it, and after the test
    asserts that no payload ran."""
    marker = tmp_path / "MARKER"

    def write(path, legacy: bool = False) -> str:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        obj = {"format": "modeconn.curve/1", "epoch": 1, "model": Payload(os.fspath(marker))}
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        return path

    yield write
    assert not marker.exists(), "a payload ran while loading a file"


def refused(call, path):
    """``call()`` is refused with a ValueError (UnreadableFileError or another) that names ``path``."""
    with pytest.raises(ValueError) as err:
        call()
    assert os.path.basename(path) in str(err.value)
    assert "weights_only" not in str(err.value)
    return err.value


def tiny():
    torch.manual_seed(0)
    return build("mlp", (64,), 10, hidden=HIDDEN)


@pytest.fixture(scope="module")
def digits():
    ds = D.load("digits")
    return ds.x_train[:128], ds.y_train[:128]


ONE_EPOCH = TrainConfig(epochs=1, batch_size=64, device="cpu")


# --------------------------------------------------------------------------------------- API


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_the_trainer_refuses_a_payload_as_finished_checkpoint(tmp_path, plant, digits, legacy):
    ckpt = plant(tmp_path / "a.pt", legacy=legacy)
    (tmp_path / "a.json").write_text(json.dumps({"finished": True}))
    err = refused(lambda: train(tiny(), digits, ONE_EPOCH, seed=0, checkpoint_path=ckpt, progress=False), ckpt)
    assert isinstance(err, UnreadableFileError)


def test_the_trainer_refuses_a_payload_as_resume_file(tmp_path, plant, digits):
    ckpt = tmp_path / "a.pt"
    resume = plant(resume_path(ckpt))
    refused(lambda: train(tiny(), digits, ONE_EPOCH, seed=0, checkpoint_path=ckpt, progress=False), resume)


def test_curve_checkpoints_refuse_a_payload(tmp_path, plant, digits):
    a, b = tiny().state_dict(), build("mlp", (64,), 10, hidden=HIDDEN).state_dict()
    ckpt = plant(tmp_path / "bezier.pt")
    refused(lambda: load_curve(ckpt), ckpt)
    refused(lambda: fit_curve(tiny(), a, b, digits, epochs=1, checkpoint_path=ckpt, progress=False,
                              device="cpu"), ckpt)


@pytest.mark.parametrize("where", ["checkpoint", "resume"])
def test_the_narrow_network_checkpoint_refuses_a_payload(tmp_path, plant, digits, where):
    a, b = tiny().state_dict(), build("mlp", (64,), 10, hidden=HIDDEN).state_dict()
    ckpt = tmp_path / "narrow.pt"
    if where == "checkpoint":
        bad = plant(ckpt)
        widths = narrow_widths(HIDDEN, 0.75)
        (tmp_path / "narrow.json").write_text(json.dumps(
            {"finished": True, "narrow": {"widths": widths, "mode": "masked"}}))
    else:
        bad = plant(resume_path(ckpt))
    refused(lambda: narrow_path(tiny(), a, b, digits, p=0.75, checkpoint_path=ckpt, progress=False,
                                device="cpu", trainer={"epochs": 1}), bad)


# --------------------------------------------------------------------------------------- CLI

TINY = ["data=digits", f"model.hidden=[{HIDDEN[0]},{HIDDEN[1]}]", "trainer.epochs=1", "eval.num_points=3",
        "progress=false", "device=cpu"]


def cli(run_dir, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "MODECONN_DEBUG"}
    return subprocess.run([sys.executable, "-m", "modeconn.cli", *TINY, f"hydra.run.dir={run_dir}", *overrides],
                          cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)


def good_endpoints(folder):
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        file = folder / f"good{seed}.pt"
        save_checkpoint(file, build("mlp", (64,), 10, hidden=HIDDEN, dropout=0.5).state_dict(), {"seed": seed})
        out.append(os.fspath(file))
    return out


def assert_refused(result, path):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert os.path.basename(path) in lines[0] and "Traceback" not in result.stderr
    assert "weights_only" not in result.stderr + result.stdout


# where: (files to plant relative to the run directory, sidecar to add, paths to run, use good endpoints)
CLI_CASES = {
    "endpoint": (None, None, "linear", False),
    "trainer-resume": ("endpoints/seed0.pt.resume.pt", None, "linear", False),
    "trainer-finished": ("endpoints/seed0.pt", {"finished": True}, "linear", False),
    "bezier": ("work/bezier.pt", None, "bezier", True),
    "polychain": ("work/polychain.pt", None, "polychain", True),
    "narrow-resume": ("work/narrow.pt.resume.pt", None, "narrow", True),
    "narrow-finished": ("work/narrow.pt", {"finished": True,
                                           "narrow": {"widths": narrow_widths(HIDDEN, 0.75), "mode": "masked"}},
                        "narrow", True),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_the_cli_refuses_a_payload_wherever_it_reads_a_file(tmp_path, plant, case):
    where, sidecar, path, use_good = CLI_CASES[case]
    run_dir = tmp_path / "run"
    overrides = [f"path=[{path}]"]
    if where is None:
        bad = plant(tmp_path / "evil.pt")
        good = good_endpoints(tmp_path)
        overrides.append(f"endpoints=[{bad},{good[1]}]")
    else:
        bad = plant(run_dir / where)
        if sidecar is not None:
            (run_dir / where).with_suffix(".json").write_text(json.dumps(sidecar))
        if use_good:
            overrides.append("endpoints=[{},{}]".format(*good_endpoints(tmp_path)))
    assert_refused(cli(run_dir, *overrides), bad)
    assert not (run_dir / "summary.json").exists()
