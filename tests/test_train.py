import dataclasses
import json
import math
import os

import pytest
import torch
from torch import nn

from modeconn import data as mdata
from modeconn import models
from modeconn.io.checkpoint import CheckpointMismatchError, load_checkpoint, read_meta, safe_load
from modeconn.training.loop import Loop
from modeconn.paths import fit_curve, narrow_path
from modeconn.training.train import (
    NonFiniteLossError,
    TrainConfig,
    evaluate_model,
    lr_at,
    resume_path,
    train,
)


class Poison(nn.Module):
    """Identity until ``poisoned`` is set; then the output becomes NaN."""

    def __init__(self):
        super().__init__()
        self.poisoned = False

    def forward(self, x):
        return x * float("nan") if self.poisoned else x


def make_mlp(seed=0, width=16):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 4), Poison()
    )


def make_convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 4)
    )


@pytest.fixture(scope="module")
def synthetic():
    return mdata.load("synthetic", num_train=192, num_test=64)


@pytest.fixture(scope="module")
def images():
    d = mdata.load("synthetic", num_train=96, num_test=32, input_shape=(1, 8, 8))
    return dataclasses.replace(d, augment=True)  # random crop + flip, drawn from the run's generator


def cfg(**kw):
    base = dict(lr=0.05, epochs=4, batch_size=32, device="cpu", schedule="garipov")
    base.update(kw)
    return TrainConfig(**base)


def states_equal(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_weights_different_seed_different(synthetic):
    m1, m2, m3 = make_mlp(0), make_mlp(0), make_mlp(1)
    r1 = train(m1, synthetic, cfg(epochs=2), seed=0, progress=False)
    r2 = train(m2, synthetic, cfg(epochs=2), seed=0, progress=False)
    train(m3, synthetic, cfg(epochs=2), seed=1, progress=False)
    assert states_equal(m1, m2)
    assert r1 == r2
    assert not states_equal(m1, m3)
    # the training seed alone (same init) changes the solution too (shuffling, dropout)
    m4 = make_mlp(0)
    train(m4, synthetic, cfg(epochs=2), seed=1, progress=False)
    assert not states_equal(m1, m4)


def test_metrics_and_learning(synthetic):
    model = make_mlp(0)
    metrics = train(model, synthetic, cfg(epochs=6), seed=0, progress=False)
    assert set(metrics) == {"train_loss", "train_acc", "test_loss", "test_acc", "epochs"}
    assert metrics["epochs"] == 6
    assert metrics["train_acc"] > 0.6
    loss, acc = evaluate_model(model, synthetic, split="test")
    assert math.isclose(loss, metrics["test_loss"]) and math.isclose(acc, metrics["test_acc"])


def test_tensor_pairs_and_batch_lists(synthetic):
    pair = synthetic.split("train")
    test_pair = synthetic.split("test")
    m = make_mlp(0)
    metrics = train(m, pair, cfg(epochs=2), seed=0, progress=False, eval_data=test_pair)
    assert metrics["test_loss"] is not None
    assert metrics["test_loss"] == pytest.approx(evaluate_model(m, test_pair)[0])
    # without test data the test metrics are None
    batches = list(mdata.iter_batches(pair, 64))
    metrics = train(make_mlp(0), batches, cfg(epochs=2), seed=0, progress=False)
    assert metrics["test_loss"] is None and metrics["test_acc"] is None
    with pytest.raises(TypeError, match="one-shot"):
        train(make_mlp(0), iter(batches), cfg(epochs=2), seed=0, progress=False)


def test_evaluate_model_restores_mode_and_matches_manual(synthetic):
    model = make_mlp(0)
    model.train()
    x, y = synthetic.split("test")
    loss, acc = evaluate_model(model, synthetic, split="test", batch_size=10)
    assert model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert loss == pytest.approx(nn.functional.cross_entropy(out, y).item(), rel=1e-5)
    assert acc == pytest.approx((out.argmax(1) == y).float().mean().item())


# --------------------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    "kind,optimizer", [("mlp", "sgd"), ("mlp", "adam"), ("conv", "sgd")], ids=["mlp-sgd", "mlp-adam", "conv-augment"]
)
def test_interrupted_run_resumes_bitwise(tmp_path, synthetic, images, kind, optimizer):
    make, data = (make_mlp, synthetic) if kind == "mlp" else (make_convnet, images)
    c = cfg(epochs=4, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01)

    ref = make(0)
    ref_metrics = train(ref, data, c, seed=0, checkpoint_path=tmp_path / "ref.pt", progress=False)

    path = tmp_path / "run.pt"

    def stop_after_2(epoch, stats):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(make(0), data, c, seed=0, checkpoint_path=path, progress=False, on_epoch_end=stop_after_2)
    assert not path.exists()
    saved = torch.load(resume_path(path), weights_only=True)
    assert saved["epoch"] == 2

    seen = []
    resumed = make(7)  # a different init: everything must come from the resume file
    metrics = train(
        resumed, data, c, seed=0, checkpoint_path=path, progress=False, on_epoch_end=lambda e, s: seen.append(e)
    )
    assert seen == [3, 4]  # really resumed, not retrained from scratch
    assert states_equal(resumed, ref)
    assert metrics == ref_metrics
    assert not resume_path(path).exists()
    assert sorted(os.listdir(tmp_path)) == ["ref.json", "ref.pt", "run.json", "run.pt"]
    state, meta = load_checkpoint(path, model=make(0))
    assert meta["finished"] and meta["seed"] == 0 and meta["metrics"] == ref_metrics
    assert meta["config"]["epochs"] == 4
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4]


def test_resume_file_of_another_run_is_refused(tmp_path, synthetic):
    path = tmp_path / "run.pt"

    def stop(epoch, stats):
        raise Interrupt

    with pytest.raises(Interrupt):
        train(make_mlp(0), synthetic, cfg(), seed=0, checkpoint_path=path, progress=False, on_epoch_end=stop)
    with pytest.raises(ValueError, match="seed 0 vs 1"):
        train(make_mlp(0), synthetic, cfg(), seed=1, checkpoint_path=path, progress=False)
    with pytest.raises(ValueError, match="trainer.lr"):
        train(make_mlp(0), synthetic, cfg(lr=0.01), seed=0, checkpoint_path=path, progress=False)
    with pytest.raises(CheckpointMismatchError, match="different architecture"):
        train(make_mlp(0, width=8), synthetic, cfg(), seed=0, checkpoint_path=path, progress=False)
    # what the file holds: only weights-only content, the run's identity and every RNG state
    saved = safe_load(resume_path(path), what="resume file")
    assert saved["epoch"] == 1 and set(saved["rng"]) == {"generators", "global", "cuda"}
    assert saved["identity"]["seed"] == 0 and saved["identity"]["trainer.lr"] == 0.05
    # a file of another kind at the resume path is refused with the way out
    torch.save({"format": 1, "epoch": 1}, resume_path(path))
    with pytest.raises(ValueError, match=r"is not a modeconn.training.train/2 file .*delete .* to start that step over"):
        train(make_mlp(0), synthetic, cfg(), seed=0, checkpoint_path=path, progress=False)


# --------------------------------------------------------------------------- finished runs


def test_finished_run_is_reused_not_overwritten(tmp_path, synthetic, caplog):
    path = tmp_path / "model.pt"
    first = make_mlp(0)
    metrics = train(first, synthetic, cfg(epochs=2), seed=0, checkpoint_path=path, progress=False,
                    meta={"note": "mine", "seed": 123})
    side = read_meta(path)
    assert side["note"] == "mine" and side["seed"] == 0  # the run's own keys win
    assert side["model_fingerprint"]["digest"] == side["fingerprint"]["digest"]
    stamps = (path.stat().st_mtime_ns, path.with_suffix(".json").stat().st_mtime_ns)

    def fail(epoch, stats):
        raise AssertionError("retrained a finished run")

    other = make_mlp(5)
    with caplog.at_level("INFO", logger="modeconn.training.train"):
        again = train(other, synthetic, cfg(epochs=2), seed=0, checkpoint_path=path, progress=False, on_epoch_end=fail)
    assert again == metrics
    assert "reusing finished run" in caplog.text
    assert (path.stat().st_mtime_ns, path.with_suffix(".json").stat().st_mtime_ns) == stamps
    assert states_equal(other, first)  # the finished weights were loaded into the model
    # a different run aimed at the same file is refused, and the file is left alone
    with pytest.raises(ValueError, match="different run"):
        train(make_mlp(0), synthetic, cfg(epochs=3), seed=0, checkpoint_path=path, progress=False)
    assert (path.stat().st_mtime_ns, path.with_suffix(".json").stat().st_mtime_ns) == stamps


def test_sidecar_is_json_with_config(tmp_path, synthetic):
    path = tmp_path / "m.pt"
    train(make_mlp(0), synthetic, cfg(epochs=1), seed=4, checkpoint_path=path, progress=False)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["config"] == dataclasses.asdict(cfg(epochs=1))
    assert side["seed"] == 4 and side["finished"] is True


# --------------------------------------------------------------------------- divergence


def test_nan_loss_raises_and_keeps_last_resume_file(tmp_path, synthetic):
    path = tmp_path / "run.pt"
    model = make_mlp(0)
    snapshot = {}

    def poison_after_2(epoch, stats):
        if epoch == 2:
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
            snapshot["mtime"] = resume_path(path).stat().st_mtime_ns
            model[-1].poisoned = True

    with pytest.raises(NonFiniteLossError) as err:
        train(model, synthetic, cfg(epochs=4), seed=0, checkpoint_path=path, progress=False, on_epoch_end=poison_after_2)
    msg = str(err.value)
    assert "epoch 3/4" in msg and "batch 1" in msg and "lr=" in msg and "lower trainer.lr" in msg
    assert "still holds the last finished epoch (2)" in msg
    assert not path.exists()
    assert resume_path(path).stat().st_mtime_ns == snapshot.pop("mtime")
    saved = torch.load(resume_path(path), weights_only=True)
    assert saved["epoch"] == 2
    assert all(torch.equal(saved["state"][k], v) for k, v in snapshot.items())
    assert sorted(os.listdir(tmp_path)) == ["run.pt.resume.pt"]  # no temp files


def test_huge_lr_diverges_with_clear_error(synthetic):
    with pytest.raises(NonFiniteLossError, match="lower trainer.lr"):
        train(make_mlp(0), synthetic, cfg(lr=1e10, epochs=3, schedule="constant"), seed=0, progress=False)


# --------------------------------------------------------------------------- schedules and config


@pytest.mark.parametrize("epoch,factor", [(0, 1.0), (9, 1.0), (13, 0.505), (17, 0.01), (19, 0.01)])
def test_garipov_schedule(epoch, factor):
    """``epoch`` is the loop's 0-based index; the reference's t is (epoch + 1) / epochs (tests/test_schedule.py)."""
    c = TrainConfig(lr=0.1, epochs=20, schedule="garipov")
    assert lr_at(c, epoch) / c.lr == pytest.approx(factor)


def test_other_schedules():
    c = TrainConfig(lr=0.2, epochs=10, schedule="constant")
    assert lr_at(c, 0) == lr_at(c, 9.5) == 0.2
    c = TrainConfig(lr=0.2, epochs=100, schedule="step", step_size=30, gamma=0.5)
    assert [lr_at(c, e) for e in (0, 29, 30, 59.9, 60, 90)] == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.05, 0.025])
    c = TrainConfig(lr=0.2, epochs=10, schedule="cosine")
    assert [lr_at(c, e) for e in (0, 5, 10)] == pytest.approx([0.2, 0.1, 0.0])


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(optimizer="foo"), r"trainer\.optimizer must be one of sgd, adam; got 'foo'"),
        (dict(schedule="linear"), r"trainer\.schedule must be one of constant, step, cosine, garipov; got 'linear'"),
        (dict(lr=0.0), r"trainer\.lr must be a finite number > 0; got 0\.0"),
        (dict(lr=float("nan")), r"trainer\.lr"),
        (dict(epochs=0), r"trainer\.epochs must be an integer >= 1; got 0"),
        (dict(epochs=2.5), r"trainer\.epochs"),
        (dict(batch_size=0), r"trainer\.batch_size"),
        (dict(momentum=1.5), r"trainer\.momentum"),
        (dict(weight_decay=-1), r"trainer\.weight_decay"),
        (dict(step_size=0), r"trainer\.step_size"),
        (dict(gamma=0), r"trainer\.gamma"),
        (dict(device="tpu"), r"trainer\.device"),
    ],
)
def test_config_validation_names_key(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kw).validate()


def test_config_defaults_valid_and_from_dict():
    assert TrainConfig().validate() == TrainConfig()
    assert TrainConfig.from_dict({"lr": 0.1, "epochs": 3}).lr == 0.1
    with pytest.raises(ValueError, match="unknown trainer key"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_train_validates_config(synthetic):
    with pytest.raises(ValueError, match="trainer.optimizer"):
        train(make_mlp(0), synthetic, cfg(optimizer="rmsprop"), seed=0, progress=False)


# --------------------------------------------------------------------------- the one loop: all three trainings


def _endpoint_run(data, path):
    model = make_mlp(0)

    def run():
        train(model, data, cfg(epochs=4), seed=0, checkpoint_path=path, progress=False)
        return model.state_dict()
    return run


def _curve_run(data, path):
    a, b, model = make_mlp(0).state_dict(), make_mlp(1).state_dict(), make_mlp(2)

    def run():
        curve = fit_curve(model, a, b, data, "bezier", 4, epochs=4, batch_size=32, t_per_step=2, device="cpu",
                          checkpoint_path=path, progress=False)  # dropout in the model: the global RNG matters
        return {f"{i}.{k}": v for i, bend in enumerate(curve.bends) for k, v in bend.items()}
    return run


def _narrow_run(data, path):
    def build(seed):
        torch.manual_seed(seed)
        return models.build("mlp", (16,), 4, hidden=(16, 16), dropout=0.1)
    model, a, b = build(2), build(0).state_dict(), build(1).state_dict()

    def run():
        made = narrow_path(model, a, b, data, p=0.75, seed=0, trainer={"epochs": 4, "batch_size": 32, "device": "cpu"},
                           checkpoint_path=path, device="cpu", progress=False)
        return made.points(made.knots)
    return run


TRAININGS = {"endpoint": _endpoint_run, "curve": _curve_run, "narrow": _narrow_run}


@pytest.mark.parametrize("kind", list(TRAININGS))
def test_every_training_resumes_bitwise_and_leaves_the_callers_rng_alone(tmp_path, monkeypatch, caplog, synthetic,
                                                                         kind):
    """Endpoint, curve and narrow-network training all run on the one loop: interrupted after epoch 2 and
    resumed, each ends bit for bit where an uninterrupted run does; none touches the caller's RNG."""
    prepare = TRAININGS[kind]
    run = prepare(synthetic, tmp_path / "whole.pt")
    torch.manual_seed(123)
    caller = torch.get_rng_state()
    whole = run()
    assert torch.equal(torch.get_rng_state(), caller)  # nothing reseeded (or drew from) the caller's RNG

    stop_at = {"epoch": 2}
    plain_init = Loop.__init__

    def interrupt(epoch, record):
        if epoch == stop_at["epoch"]:
            raise Interrupt

    def init(self, *args, **kwargs):  # every loop gets a callback that interrupts it after epoch 2
        plain_init(self, *args, **kwargs)
        self.callbacks.append(interrupt)

    monkeypatch.setattr(Loop, "__init__", init)
    with pytest.raises(Interrupt):
        prepare(synthetic, tmp_path / "cut.pt")()
    stop_at["epoch"] = None
    with caplog.at_level("INFO", logger="modeconn.training.loop"):
        resumed = prepare(synthetic, tmp_path / "cut.pt")()
    assert "resumed from epoch 2 of 4" in caplog.text
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_data_without_batches_is_refused():
    with pytest.raises(ValueError, match="yielded no batches in epoch 1"):
        train(make_mlp(0), [], cfg(epochs=2), seed=0, progress=False)
