"""Issue 10, items 1, 2 and 5. No file modeconn reads can run code: a pickle payload at every place a file
is read is refused, through the API and the CLI, and its side effect (a marker file) never happens. NaN
never finishes a run. Bad input at the API's boundaries is refused before any work, saying what is wrong."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from modeconn import data as D
from modeconn.io.checkpoint import UnreadableFileError, save_checkpoint
from modeconn.params.checks import NonFiniteError, check_finite_endpoints, check_path_losses
from modeconn.evaluation.evaluate import evaluate_path
from modeconn.models import build
from modeconn.paths import dropout_path, fit_curve, linear, load_curve, narrow_path, noise_path
from modeconn.params.path import Path
from modeconn.training.train import TrainConfig, resume_path, train

HIDDEN = [16, 16]
NARROW = [int(0.75 * h / 1.5) for h in HIDDEN]  # narrow_path(p=0.75)'s default widths h*: floor(p h / 1.5)


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
        (tmp_path / "narrow.json").write_text(json.dumps(
            {"finished": True, "narrow": {"widths": NARROW, "mode": "masked"}}))
    else:
        bad = plant(resume_path(ckpt))
    refused(lambda: narrow_path(tiny(), a, b, digits, p=0.75, checkpoint_path=ckpt, progress=False,
                                device="cpu", trainer={"epochs": 1}), bad)


@pytest.mark.slow
def test_a_payload_in_the_data_cache_is_never_run(tmp_path, plant):
    """mnist_subset keeps its split as a torch file; a payload there is refused (and the cache rebuilt)."""
    from modeconn.data.mnist_subset import cache_file, load_mnist_subset

    file = plant(cache_file(tmp_path, 0, 1000))
    data = load_mnist_subset(tmp_path, split_seed=0, num_test=1000)
    assert data.num_test == 1000 and os.path.getsize(file) > 1000


# --------------------------------------------------------------------------------------- CLI

TINY = ["data=digits", f"model.hidden=[{HIDDEN[0]},{HIDDEN[1]}]", "trainer.epochs=1", "eval.num_points=3",
        "progress=false", "device=cpu"]


def cli(run_dir, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "MODECONN_DEBUG"}
    return subprocess.run([sys.executable, "-m", "modeconn.run.cli", *TINY, f"hydra.run.dir={run_dir}", *overrides],
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
                                           "narrow": {"widths": NARROW, "mode": "masked"}},
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


# =========================================================================== non-finite values (issue 10.2)


SCALE = 1e25  # A and B compute the same function, but their midpoint overflows float32


def rescaled_pair(model: nn.Module) -> tuple[dict, dict]:
    """Two rescalings of one ReLU network (first layer times c, second times 1/c, and the reverse): both
    finite with the network's own loss, while the straight line between them overflows at t = 1/2."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    first, second = linears[0], linears[1]
    out = []
    for c in (SCALE, 1 / SCALE):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[f"{first}.weight"] *= c
        state[f"{first}.bias"] *= c
        state[f"{second}.weight"] /= c
        out.append(state)
    return out[0], out[1]


def test_nan_endpoints_are_refused_naming_the_file_and_tensor(digits):
    model = tiny()
    good = model.state_dict()
    bad = {k: v.clone() for k, v in good.items()}
    key = list(bad)[2]
    bad[key].view(-1)[0] = float("nan")
    ends = [{"state": good, "meta": {}, "file": "good.pt"}, {"state": bad, "meta": {}, "file": "allnan.pt"}]
    with pytest.raises(NonFiniteError, match=f"endpoint allnan.pt holds non-finite values: '{key}' has 1 NaN"):
        check_finite_endpoints(ends, model, digits)
    recorded = [{"state": good, "meta": {"metrics": {"train_loss": float("inf")}}, "file": "diverged.pt"}]
    with pytest.raises(NonFiniteError, match="diverged.pt records non-finite losses"):
        check_finite_endpoints(recorded, model, digits)
    a = {k: v * 1e20 if k.endswith("weight") else v for k, v in good.items()}  # finite weights, infinite outputs
    with pytest.raises(NonFiniteError, match="overflow.pt: its loss on the first 128 training examples is"):
        check_finite_endpoints([{"state": a, "meta": {}, "file": "overflow.pt"}], model, digits)
    check_finite_endpoints([{"state": s, "meta": {}, "file": "ok.pt"} for s in rescaled_pair(model)], model, digits)


def test_constructors_refuse_non_finite_endpoints(digits):
    model = tiny()
    a = model.state_dict()
    b = {k: v.clone() for k, v in a.items()}
    b[list(b)[0]][0, 0] = float("inf")
    for build in (lambda: linear(a, b), lambda: dropout_path(model, a, b, digits),
                  lambda: noise_path(model, a, b, digits)):
        with pytest.raises(NonFiniteError, match=f"the second of the endpoints holds non-finite values: '{list(b)[0]}'"):
            build()


def test_path_json_is_strict_when_the_loss_is_not_finite(tmp_path, digits):
    model = tiny()
    ev = evaluate_path(model, linear(*rescaled_pair(model)), digits, num_points=3, device="cpu", progress=False)
    assert any(v != v for v in ev.metrics["train_loss"])  # NaN at t = 1/2
    text = ev.save(tmp_path).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    with pytest.raises(NonFiniteError, match=r"path linear: the train loss is (nan|None) at t = 0.5; the run failed"):
        check_path_losses(ev)


def _cli_endpoints(folder, states):
    files = []
    for i, state in enumerate(states):
        files.append(os.fspath(save_checkpoint(folder / f"end{i}.pt", state, {"seed": i})))
    return files


def _cli_model():
    torch.manual_seed(0)
    return build("mlp", (64,), 10, hidden=HIDDEN, dropout=0.5)


@pytest.mark.slow
def test_the_cli_refuses_nan_endpoints_and_fails_a_nan_path(tmp_path):
    model = _cli_model()
    good = model.state_dict()
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in good.items()}
    files = _cli_endpoints(tmp_path, [nan, good])
    run_dir = tmp_path / "nan_endpoint"
    result = cli(run_dir, "path=[linear]", f"endpoints=[{files[0]},{files[1]}]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "end0.pt holds non-finite values: '1.weight'" in result.stderr, result.stderr[-2000:]
    assert not (run_dir / "summary.json").exists()

    files = _cli_endpoints(tmp_path, rescaled_pair(model))
    run_dir = tmp_path / "nan_path"
    result = cli(run_dir, "path=[linear]", f"endpoints=[{files[0]},{files[1]}]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "path linear: the train loss is" in result.stderr and "at t = 0.5" in result.stderr, result.stderr[-2000:]
    assert not (run_dir / "summary.json").exists() and not (run_dir / "paths" / "linear.json").exists()


# =========================================================================== API boundaries (issue 10.5)



class CountingPath(Path):
    """A straight line that counts how often it was asked for points (0: nothing was evaluated)."""

    def __init__(self, a, b):
        super().__init__()
        self.line, self.calls = linear(a, b), 0

    def points(self, ts):
        self.calls += 1
        return self.line.points(ts)


def _ends():
    a = tiny().state_dict()
    torch.manual_seed(1)
    return a, build("mlp", (64,), 10, hidden=HIDDEN).state_dict()


@pytest.fixture(scope="module")
def bad_labels(digits):
    x, y = digits
    y = y.clone()
    y[5] = 12
    return x, y


def test_labels_outside_the_classes_are_refused_before_any_work(tmp_path, bad_labels):
    a, b = _ends()
    ckpt = tmp_path / "m.pt"
    message = r"labels must lie in \[0, 10\); got labels in \[0, 12\]"
    epochs = []
    with pytest.raises(ValueError, match=message):
        train(tiny(), bad_labels, ONE_EPOCH, seed=0, checkpoint_path=ckpt, progress=False,
              on_epoch_end=lambda e, s: epochs.append(e))
    assert epochs == [] and not ckpt.exists() and not resume_path(ckpt).exists()
    path = CountingPath(a, b)
    with pytest.raises(ValueError, match=message):
        evaluate_path(tiny(), path, bad_labels, num_points=3, device="cpu", progress=False)
    assert path.calls == 0
    with pytest.raises(ValueError, match=message):
        dropout_path(tiny(), a, b, bad_labels)
    with pytest.raises(ValueError, match=message):
        fit_curve(tiny(), a, b, bad_labels, epochs=1, checkpoint_path=ckpt, progress=False, device="cpu")
    assert not ckpt.exists()
    x, y = bad_labels
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\); got labels in \[-1, 9\]"):
        train(tiny(), (x, torch.where(y == 12, -1, y)), ONE_EPOCH, seed=0, progress=False)
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        train(tiny(), (x, y.float()), ONE_EPOCH, seed=0, progress=False)


def test_a_dataset_must_agree_with_its_labels_and_shape(digits):
    x, y = digits
    with pytest.raises(ValueError, match=r"dataset 'toy': train labels \(num_classes=5\) must lie in \[0, 5\); got labels in \[0, 9\]"):
        D.Dataset("toy", x, y, x[:10], y[:10] % 5, 5, (64,))
    with pytest.raises(ValueError, match=r"dataset 'toy': test inputs have shape \(8, 8\) per example, not input_shape \(64,\)"):
        D.Dataset("toy", x, y, x[:10].reshape(10, 8, 8), y[:10], 10, (64,))
    with pytest.raises(ValueError, match="train inputs and labels differ in length: 128 vs 127"):
        D.Dataset("toy", x, y[:-1], x, y, 10, (64,))
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        D.Dataset("toy", x, y, x, y, 0, (64,))
    ds = D.Dataset("toy", x, y, x, y, 10, [64])
    assert ds.input_shape == (64,) and ds.to("cpu").num_classes == 10


def test_inputs_of_the_wrong_shape_name_the_shape_the_model_expects(digits):
    x, y = digits
    wrong = (x.reshape(-1, 8, 8)[:, :, :5].contiguous(), y)
    a, b = _ends()
    expects = r"inputs of shape \(N, 8, 5\) do not fit the model, which expects \(N, 64\)"
    with pytest.raises(ValueError, match=expects):
        train(tiny(), wrong, ONE_EPOCH, seed=0, progress=False)
    path = CountingPath(a, b)
    with pytest.raises(ValueError, match=expects):
        evaluate_path(tiny(), path, wrong, num_points=3, device="cpu", progress=False)
    assert path.calls == 0
    conv = build("convnet", (1, 8, 8), 10, width=4, depth=1)
    with pytest.raises(ValueError, match=r"inputs of shape \(N, 3, 8, 8\) do not fit the model, which expects \(N, 1, H, W\)"):
        train(conv, (torch.randn(16, 3, 8, 8), y[:16]), ONE_EPOCH, seed=0, progress=False)


def test_endpoint_dtypes_are_named():
    a, b = _ends()
    with pytest.raises(ValueError, match=r"different dtypes \(.*weight: float32 vs float64"):
        linear(a, {k: v.double() for k, v in b.items()})
    with pytest.raises(ValueError, match="holds no floating-point tensors .*int64.*convert them with .float()"):
        linear({k: v.long() for k, v in a.items()}, b)
    with pytest.raises(ValueError, match=r"different dtypes \(.*weight: float32 vs int32"):
        linear(a, {k: v.int() if k.endswith("bias") else v for k, v in b.items()} | {"1.weight": b["1.weight"].int()})
    with pytest.raises(ValueError, match="other dtypes than the model"):
        dropout_path(tiny(), *({k: v.double() for k, v in s.items()} for s in (a, b)), D.load("digits"))


@pytest.mark.parametrize("construct", ["dropout", "noise", "narrow", "bezier"])
def test_every_constructor_refuses_mismatched_keys_and_shapes_as_linear_does(construct, digits):
    a, b = _ends()
    call = {"dropout": lambda a, b: dropout_path(tiny(), a, b, digits),
            "noise": lambda a, b: noise_path(tiny(), a, b, digits),
            "narrow": lambda a, b: narrow_path(tiny(), a, b, digits, p=0.75, progress=False),
            "bezier": lambda a, b: fit_curve(tiny(), a, b, digits, epochs=1, progress=False)}[construct]
    extra = dict(b, **{"extra.weight": torch.zeros(3)})
    for other, message in ((extra, r"only in the second: \['extra.weight'\]"),
                           (dict(b, **{"1.weight": torch.zeros(16, 63)}), r"shapes differ: \['1.weight: \(16, 64\) vs \(16, 63\)'\]")):
        with pytest.raises(ValueError, match=message):
            linear(a, other)
        with pytest.raises(ValueError, match=message):
            call(a, other)
    both = {k: dict(s, **{"extra.weight": torch.zeros(3)}) for k, s in (("a", a), ("b", b))}
    with pytest.raises(ValueError, match=r"do not fit the model \(keys the model does not have: \['extra.weight'\]\)"):
        call(both["a"], both["b"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_points=1), "num_points must be an integer >= 2; got 1"),
    (dict(num_points=2.5), "num_points must be an integer >= 2; got 2.5"),
    (dict(num_points="5"), "num_points must be an integer >= 2; got '5'"),
    (dict(num_points=True), "num_points must be an integer >= 2; got True"),
    (dict(ts=[]), "ts must hold at least one time"),
    (dict(ts=[0.0, 1.5]), r"ts must lie in \[0, 1\]; got \[1.5\]"),
    (dict(ts=[0.0, float("nan")]), r"ts must lie in \[0, 1\]; got \[nan\]"),
    (dict(ts="0.5"), "ts must be a sequence of times"),
    (dict(ts=[0.0, "x"]), "ts must be a sequence of numbers"),
])
def test_evaluate_path_checks_its_grid_before_evaluating(digits, kwargs, message):
    path = CountingPath(*_ends())
    with pytest.raises(ValueError, match=message):
        evaluate_path(tiny(), path, digits, device="cpu", progress=False, **kwargs)
    assert path.calls == 0
