"""Issue 29's classes, through the CLI in this process (tiny synthetic runs, seconds each): a run never
mixes two configurations (1), a refused command changes no byte of the run directory (2), every malformed
file or value is one exit-2 line (3, 4), what cannot work is refused before training or allocating (5),
and one run directory has one writer (6)."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from modeconn.run.lock import holder, run_lock
from test_errors import invoke

TINY = ["data=synthetic", "model.hidden=[8]", "trainer.epochs=1", "eval.num_points=3", "progress=false",
        "path=[linear]", "threads=1"]
DIGITS_LIKE = ["data.input_shape=[64]", "data.num_classes=10"]  # synthetic data of the digits' shapes


def tree(folder):
    """Every file and folder below ``folder`` with its bytes' sha256 and mtime (folders: None)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.is_file() else None for p in sorted(folder.rglob("*"))}


def one_line(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("modeconn: error: ") and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def refused_unchanged(args, run_dir, capsys, monkeypatch, *words):
    """``args`` in ``run_dir`` exits 2 with one line holding ``words`` and leaves the directory as it was."""
    before = tree(run_dir)
    code, _, err = invoke([*args, f"hydra.run.dir={run_dir}"], capsys, monkeypatch, run_dir.parent)
    line = one_line(code, err, *words)
    assert tree(run_dir) == before
    return line


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (its files copied by the tests that change them)."""
    root = tmp_path_factory.mktemp("reliability")
    mp = pytest.MonkeyPatch()
    try:
        code, _, err = invoke([*TINY, *DIGITS_LIKE, f"hydra.run.dir={root}/done"], _NoCapture(), mp, root)
    finally:
        mp.undo()
    assert code == 0, err
    return root / "done"


class _NoCapture:
    def readouterr(self):
        return "", ""


def copy_run(finished, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(finished, out)
    return out


# ----------------------------------------------------------------- 1 and 2: no mixing, refused = unchanged


def interrupted(finished, tmp_path):
    """The finished run as if interrupted after its endpoints (no summary): endpoint reuse is what's tested."""
    run = copy_run(finished, tmp_path)
    (run / "summary.json").unlink()
    return run


@pytest.mark.parametrize("override, key", [
    ("model.dropout=0.3", "model.dropout"), ("model.bias=false", "model.bias"), ("trainer.lr=0.1", "trainer.lr"),
    ("data.seed=1", "data.seed"), ("data=digits", "data.name"),
])
@pytest.mark.slow  # the CLI end to end, seconds per case
def test_finished_endpoints_of_another_config_are_refused_and_nothing_changes(override, key, finished, tmp_path,
                                                                              capsys, monkeypatch):
    run = interrupted(finished, tmp_path)
    args = [*TINY, *DIGITS_LIKE, override] if override != "data=digits" else [*TINY, override]
    line = refused_unchanged(args, run, capsys, monkeypatch, key, "seed0.pt")
    assert line.index(key) < line.index(";")  # the first differing key is named first


@pytest.mark.slow  # the CLI end to end, seconds per case
def test_an_interrupted_training_resumes_only_with_its_own_config(tmp_path, capsys, monkeypatch):
    """Interrupted after one epoch of two: another lr or dropout is refused (every byte kept); the same
    command resumes and finishes."""
    import modeconn.run.pipeline as pipeline

    real = pipeline.train

    def interrupt_after_one_epoch(*args, **kwargs):
        def stop(epoch, record):
            raise KeyboardInterrupt

        return real(*args, **kwargs, on_epoch_end=stop)

    run = tmp_path / "run"
    args = [*TINY, "trainer.epochs=2"]
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(pipeline, "train", interrupt_after_one_epoch)
    try:
        code, _, err = invoke([*args, f"hydra.run.dir={run}"], capsys, monkeypatch, tmp_path)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert code == 130, err
    monkeypatch.setattr(pipeline, "train", real)
    assert (run / "endpoints" / "seed0.pt.resume.pt").is_file() and (run / "config.yaml").is_file()
    refused_unchanged([*args, "trainer.lr=0.1"], run, capsys, monkeypatch, "trainer.lr", "resume")
    refused_unchanged([*args, "model.dropout=0.3"], run, capsys, monkeypatch, "model.dropout", "resume")
    refused_unchanged([*args, "seed=100000000000000000000"], run, capsys, monkeypatch, "seed")
    code, _, err = invoke([*args, f"hydra.run.dir={run}"], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    assert "resumed from epoch 1" in (run / "cli.log").read_text()


def test_a_refused_fresh_run_leaves_no_directory(tmp_path, capsys, monkeypatch):
    code, _, err = invoke([*TINY, "seed=100000000000000000000", f"hydra.run.dir={tmp_path}/new"], capsys, monkeypatch,
                          tmp_path)
    one_line(code, err, "seed")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow  # the CLI end to end, seconds per case
def test_the_summary_names_its_endpoints_relative_to_the_run(finished, tmp_path, capsys, monkeypatch):
    summary = json.loads((finished / "summary.json").read_text())
    assert [e["file"] for e in summary["endpoints"]] == ["endpoints/seed0.pt", "endpoints/seed1.pt"]
    run = copy_run(finished, tmp_path)  # a copy whose own endpoint file was replaced is not "finished"
    other = torch.load(run / "endpoints" / "seed0.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in other.items()}, run / "endpoints" / "seed0.pt")
    refused_unchanged([*TINY, *DIGITS_LIKE], run, capsys, monkeypatch, "seed0.pt", "changed")


def test_train_names_the_first_differing_identity_key(tmp_path):
    from modeconn.models import build
    from modeconn.training.train import TrainConfig, check_reusable, train

    data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    cfg = TrainConfig(epochs=1, batch_size=16)
    net = build("mlp", (4,), 3, hidden=[4])
    train(net, data, cfg, seed=0, checkpoint_path=tmp_path / "a.pt", progress=False, identity={"model.dropout": 0.5})
    assert check_reusable(net, cfg, 0, tmp_path / "a.pt", {"model.dropout": 0.5}) == "finished"
    with pytest.raises(ValueError, match=r"first difference: model.dropout; model.dropout 0.5 vs 0.3"):
        train(net, data, cfg, seed=0, checkpoint_path=tmp_path / "a.pt", progress=False, identity={"model.dropout": 0.3})


@pytest.fixture(scope="module")
def curve_run(finished, tmp_path_factory):
    """An interrupted run between given endpoints (``finished``'s) whose trained Bezier curve is in work/."""
    root = tmp_path_factory.mktemp("curve")
    ends = f"endpoints=[{finished}/endpoints/seed0.pt,{finished}/endpoints/seed1.pt]"
    args = [*CURVE, ends]
    mp = pytest.MonkeyPatch()
    try:
        code, _, err = invoke([*args, f"hydra.run.dir={root}/run"], _NoCapture(), mp, root)
    finally:
        mp.undo()
    assert code == 0, err
    (root / "run" / "summary.json").unlink()
    assert (root / "run" / "work" / "bezier.pt").is_file()
    return root / "run", args


CURVE = [*(a for a in TINY if not a.startswith("path=")), *DIGITS_LIKE, "path=[bezier]", "path.bezier.epochs=1"]


@pytest.mark.parametrize("override, key", [
    ("data.seed=1", "data.seed"), ("model.dropout=0.3", "model.dropout"), ("path.bezier.lr=0.1", "path.bezier.lr"),
    ("seed=1", "seed"),
])
@pytest.mark.slow  # the CLI end to end, seconds per case
def test_work_files_of_another_config_are_refused_before_anything_is_written(override, key, curve_run, tmp_path,
                                                                            capsys, monkeypatch):
    """Given endpoints, so no endpoint file vouches for the data and model: the curve in work/ was trained on
    other data or another model (wrong results with exit 0 before), or with another lr (refused only after
    config.yaml, .hydra/ and provenance.json were rewritten)."""
    run = copy_run(curve_run[0], tmp_path)
    line = refused_unchanged([*curve_run[1], override], run, capsys, monkeypatch, key, "work/")
    assert line.index(key) < line.index(";")
    linear = [*(a for a in curve_run[1] if not a.startswith("path.bezier")), "path=[linear]"]
    code, _, err = invoke([*linear, f"hydra.run.dir={run}"], capsys, monkeypatch, tmp_path)
    assert code == 0, err  # another selection of paths goes on; the curve's entries stay recorded
    (run / "summary.json").unlink()
    refused_unchanged([*curve_run[1], "path.bezier.lr=0.1"], run, capsys, monkeypatch, "path.bezier.lr")


@pytest.mark.slow  # the CLI end to end, seconds per case
def test_log_lines_of_the_checks_leave_cli_log_alone(tmp_path, finished, capsys, monkeypatch):
    """Reading DDP-prefixed endpoints logs what was stripped; a refused or already-finished rerun must not
    append that to the run's cli.log."""
    files = []
    for seed in (0, 1):
        state = torch.load(finished / "endpoints" / f"seed{seed}.pt", weights_only=True)
        files.append(tmp_path / f"ddp{seed}.pt")
        torch.save({f"module.{k}": v for k, v in state.items()}, files[-1])
    args = [*TINY, *DIGITS_LIKE, f"endpoints=[{files[0]},{files[1]}]"]
    run = tmp_path / "run"
    code, _, err = invoke([*args, f"hydra.run.dir={run}"], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    assert "stripped the prefix 'module.'" in (run / "cli.log").read_text()
    line = refused_unchanged([*args, "trainer.lr=0.1"], run, capsys, monkeypatch, "first difference: trainer.lr")
    assert "another config" in line
    before = tree(run)
    code, out, err = invoke([*args, f"hydra.run.dir={run}"], capsys, monkeypatch, tmp_path)
    assert code == 0 and "already finished" in out, err
    assert tree(run) == before


# ----------------------------------------------------------------- 3: malformed files and values


@pytest.mark.parametrize("dtype, ok", [(torch.float16, True), (torch.float64, True), (torch.int64, False)])
@pytest.mark.slow  # the CLI end to end, seconds per case
def test_endpoint_checkpoints_of_other_dtypes(dtype, ok, finished, tmp_path, capsys, monkeypatch):
    files = []
    for seed in (0, 1):
        state = torch.load(finished / "endpoints" / f"seed{seed}.pt", weights_only=True)
        files.append(tmp_path / f"end{seed}.pt")
        torch.save({k: (v * 100 if dtype == torch.int64 else v).to(dtype) if v.is_floating_point() else v
                    for k, v in state.items()}, files[-1])
    args = [*TINY, *DIGITS_LIKE, f"endpoints=[{files[0]},{files[1]}]", f"hydra.run.dir={tmp_path}/run"]
    code, _, err = invoke(args, capsys, monkeypatch, tmp_path)
    if ok:
        assert code == 0, err
    else:
        one_line(code, err, "end0.pt", "int64", "float32")


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("file, content, words", [
    ("endpoints/seed0.json", '{"finished": true, "metrics": 5}', ["seed0.json", "metrics"]),
    ("endpoints/seed0.json", DEEP, ["seed0.json", "nested too deeply"]),
    ("summary.json", '{"paths": 5}', ["summary.json", "paths"]),
    ("summary.json", '{"endpoints": [{"file": 3}]}', ["summary.json", "endpoints[0].file"]),
    ("summary.json", DEEP, ["summary.json", "nested too deeply"]),
    ("provenance.json", "[1, 2]", ["provenance.json", "holds a JSON list, not an object"]),
    ("config.yaml", "seed: !!python/object/apply:os.system ['true']\n", ["config.yaml", "Python tag"]),
])
@pytest.mark.slow  # the CLI end to end, seconds per case
def test_malformed_run_files_are_one_line(file, content, words, finished, tmp_path, capsys, monkeypatch):
    run = copy_run(finished, tmp_path)
    if file != "summary.json" and file != "config.yaml":
        (run / "summary.json").unlink()  # an interrupted run reads its sidecars and provenance
    (run / file).write_text(content)
    refused_unchanged([*TINY, *DIGITS_LIKE], run, capsys, monkeypatch, *words)
    if file in ("summary.json", "config.yaml"):  # modeconn report reads them too
        code, _, err = invoke(["report", str(run)], capsys, monkeypatch, tmp_path)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert file in err


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    from modeconn.io import checkpoint

    target = tmp_path / "kept.pt"
    checkpoint.atomic_torch_save({"w": torch.ones(2)}, target)

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.atomic_torch_save({"w": torch.zeros(2)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.pt"]  # no temporary file left
    code, _, err = invoke([*TINY, f"hydra.run.dir={tmp_path}/run"], capsys, monkeypatch, tmp_path)
    one_line(code, err, "No space left on device", "seed0.pt")


def test_a_file_name_too_long_is_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = invoke([*TINY, f"hydra.run.dir={tmp_path}/{'x' * 300}"], capsys, monkeypatch, tmp_path)
    one_line(code, err, "File name too long")


@pytest.mark.parametrize("mutate, words", [
    (lambda x: {**x, "identity": 5}, ["bezier.pt", "identity"]),
    (lambda x: {k: v for k, v in x.items() if k != "state"}, ["bezier.pt", "state: missing"]),
    (lambda x: {**x, "epoch": "x"}, ["bezier.pt", "epoch"]),
    (lambda x: [1, 2], ["bezier.pt", "list"]),
    (lambda x: {**x, "state": {"free": torch.zeros(3)}}, ["bezier.pt", "state.free"]),
], ids=["identity", "no-state", "epoch", "a-list", "too-narrow"])
@pytest.mark.slow  # the CLI end to end, seconds per case
def test_a_malformed_resume_file_in_work_is_one_line_before_anything_is_written(mutate, words, curve_run, tmp_path,
                                                                              capsys, monkeypatch):
    run = copy_run(curve_run[0], tmp_path)
    file = run / "work" / "bezier.pt"
    torch.save(mutate(torch.load(file, weights_only=True)), file)
    refused_unchanged(curve_run[1], run, capsys, monkeypatch, *words, "delete")


@pytest.mark.parametrize("dtype, ok", [(torch.float64, True), (torch.int64, False)])
@pytest.mark.slow  # the CLI end to end, seconds per case
def test_the_runs_own_endpoint_files_of_other_dtypes(dtype, ok, finished, tmp_path, capsys, monkeypatch):
    """An interrupted run's own finished endpoint converted to float64 is used as float32 (a crash before);
    one of integers is refused by name before anything is written."""
    run = interrupted(finished, tmp_path)
    file = run / "endpoints" / "seed0.pt"
    torch.save({k: (v * 100).to(dtype) if v.is_floating_point() else v
                for k, v in torch.load(file, weights_only=True).items()}, file)
    if ok:
        code, _, err = invoke([*TINY, *DIGITS_LIKE, f"hydra.run.dir={run}"], capsys, monkeypatch, tmp_path)
        assert code == 0, err
    else:
        refused_unchanged([*TINY, *DIGITS_LIKE], run, capsys, monkeypatch, "seed0.pt", "int64", "float32")


def _edit_summary(run, fn):
    summary = json.loads((run / "summary.json").read_text())
    fn(summary)
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("paths"), ["summary.json", "paths: missing"]),
    (lambda s: s["paths"]["linear"].pop("barriers"), ["summary.json", "barriers: missing"]),
    (lambda s: s["paths"]["linear"]["barriers"]["train_loss"].pop("chord"), ["summary.json", "chord: missing"]),
], ids=["no-paths", "no-barriers", "no-column"])
@pytest.mark.slow  # the finished run's fixture
def test_report_reads_only_summaries_of_its_shape(edit, words, finished, tmp_path, capsys, monkeypatch):
    run = copy_run(finished, tmp_path)
    _edit_summary(run, edit)
    code, _, err = invoke(["report", str(run)], capsys, monkeypatch, tmp_path)
    one_line(code, err.replace("modeconn report: error:", "modeconn: error:"), *words)


@pytest.mark.slow  # the finished run's fixture
def test_report_arguments_and_interpolations_are_one_line(finished, tmp_path, capsys, monkeypatch):
    code, _, err = invoke(["report", str(finished), "--metric", "bogus"], capsys, monkeypatch, tmp_path)
    one_line(code, err.replace("modeconn report: error:", "modeconn: error:"), "--metric", "bogus")
    run = copy_run(finished, tmp_path)
    (run / "config.yaml").write_text("name: ${nosuch}\nseed: 0\n")
    code, _, err = invoke(["report", str(run)], capsys, monkeypatch, tmp_path)
    one_line(code, err.replace("modeconn report: error:", "modeconn: error:"), "config.yaml", "nosuch")


def test_a_random_bytes_npz_is_named_without_advice_to_unpickle(tmp_path, capsys, monkeypatch):
    (tmp_path / "d.npz").write_bytes(os.urandom(300))
    code, _, err = invoke([*TINY[1:], "data=tensors", "data.path=d.npz", f"hydra.run.dir={tmp_path}/run"], capsys,
                          monkeypatch, tmp_path)
    line = one_line(code, err, "data.path d.npz", "not a .npz archive")
    assert "pickle" not in line and "unsafe" not in line


@pytest.mark.parametrize("override, classes, words", [
    ("data.augment=maybe", 2, ["data.augment", "true or false"]), ("data.mean=[nan,0,0]", 2, ["data.mean"]),
    ("data.size=100000", 2, ["data.size=100000", "would need about"]), ("", 1, ["data.root", "at least 2"]),
])
def test_an_image_folder_of_bad_values_is_refused_before_any_work(override, classes, words, tmp_path, capsys,
                                                                  monkeypatch):
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for c in "ab"[:classes]:
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), "uint8")).save(tmp_path / "imgs" / split / c / "0.png")
    args = [*TINY[1:], "data=folder", f"data.root={tmp_path}/imgs", *override.split(), f"hydra.run.dir={tmp_path}/run"]
    code, _, err = invoke(args, capsys, monkeypatch, tmp_path)
    one_line(code, err, *words)
    assert not (tmp_path / "run").exists()


def test_running_out_of_memory_past_the_estimates_is_one_line(tmp_path, capsys, monkeypatch):
    import modeconn.run.pipeline as pipeline

    def short_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 688001376 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(pipeline, "train", short_of_memory)
    code, _, err = invoke([*TINY, f"hydra.run.dir={tmp_path}/run"], capsys, monkeypatch, tmp_path)
    one_line(code, err, "out of memory", "688001376 bytes")


# ----------------------------------------------------------------- 4 and 5: bad values, refused early

BAD_VALUES = [
    ("eval.batched=maybe", "eval.batched"), ("progress=maybe", "progress"), ("seed=true", "seed"),
    ("seed=100000000000000000000", "seed"), ("model.dropout=nan", "model.dropout"),
    ("model.dropout=1.5", "model.dropout"), ("data.input_shape=[0]", "data.input_shape"),
    ("data.input_shape=[]", "data.input_shape"), ("data.num_classes=0", "data.num_classes"),
    ("data.num_train=0", "data.num_train"), ("threads=100000", "threads"), ("+sed=3", "sed"),
    ("+eval.num_point=5", "eval"), ("+stability.trial=5", "stability"),
    ("eval.num_points=1000000000", "eval.num_points"), ("data.num_train=1000000000", "data.num_train"),
    ("path=[bezier] path.bezier.num_bends=1000000000", "path.bezier.num_bends"),
    ("path=[dropout] model.hidden=[]", "path.dropout"),
    ("path=[noise] model=preresnet20", "path.noise"),
    ("endpoints=5", "endpoints"), ("endpoints=abc", "endpoints"), ("stability.figure2=5", "stability.figure2"),
    ("+stability.figure2={trials:0}", "stability.figure2.trials"),
    ("+stability.figure2={segment_p:nan}", "stability.figure2.segment_p"),
    ("data.num_test=1000000000", "data.num_test"), ("data.input_shape=[100000,100000]", "data.input_shape"),
    ("model.hidden=[10000000000]", "would need about"),
    ("path=[autoneb] path.autoneb.cycles=[{insert: 'equal(1000000000)', iterations: 1, lr: 0.1}]",
     "path.autoneb.cycles"),
    ("path=[autoneb] path.autoneb.cycles=[{insert: leave, iterations: 1, lr: 0.1, repeat: 1000000000}]",
     "path.autoneb.cycles"),
]


@pytest.mark.parametrize("override, key", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
@pytest.mark.slow  # the CLI end to end, seconds per case
def test_bad_values_are_refused_before_any_work(override, key, tmp_path, capsys, monkeypatch):
    drop = "model=" in override or "model.hidden" in override  # the override replaces TINY's model.hidden
    args = [*(a for a in TINY if not (a.startswith("model.hidden") and drop)), *override.split(" path.")[0].split()]
    args += [f"path.{rest}" for rest in override.split(" path.")[1:]]
    code, _, err = invoke([*args, f"hydra.run.dir={tmp_path}/run"], capsys, monkeypatch, tmp_path)
    one_line(code, err, key)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_memory_refusals_name_the_estimate(tmp_path, capsys, monkeypatch):
    code, _, err = invoke([*TINY, "eval.num_points=1000000000", f"hydra.run.dir={tmp_path}/run"], capsys, monkeypatch,
                          tmp_path)
    assert "would need about 512.0 GB" in one_line(code, err, "eval.num_points")


def test_memory_estimates_cover_figure2_nets_and_name_the_key():
    from omegaconf import OmegaConf

    from modeconn.models import build
    from modeconn.run import memory

    cfg = OmegaConf.create({"eval": {"num_points": 3}, "path": {"linear": None},
                            "stability": {"figure2": {"trials": 10 ** 9}}})
    with pytest.raises(ValueError, match=r"stability.figure2.trials=1000000000 would need about .* GB"):
        memory.check_run(cfg, build("mlp", (64,), 10, hidden=[8]), torch.device("cpu"))
    huge = memory.model_parameters(lambda: build("mlp", (16,), 4, hidden=[10 ** 9]))  # counted, not allocated
    assert huge == 16 * 10 ** 9 + 10 ** 9 + 4 * 10 ** 9 + 4


def test_api_refuses_bad_sizes():
    from modeconn.align.weights import weight_matching
    from modeconn.evaluation.evaluate import evaluate_path
    from modeconn.models import build
    from modeconn.params.path import linear

    net = build("mlp", (4,), 3, hidden=[4])
    state = net.state_dict()
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluate_path(net, linear(state, state), data, num_points=3, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        weight_matching(net, state, state, example_input=data[0], max_iter=-1)
    from modeconn.align.activations import activation_matching
    from modeconn.align.repair import repair

    with pytest.raises(ValueError, match="max_items must be null or an integer >= 1; got -1"):
        activation_matching(net, state, state, data, max_items=-1)  # every max_items meets the data's check
    with pytest.raises(ValueError, match="max_items must be null or an integer >= 1; got 0"):
        repair(linear(state, state), net, data, max_items=0)


# ----------------------------------------------------------------- 6: one writer


@pytest.mark.slow  # the CLI end to end, seconds per case
def test_a_second_run_in_a_locked_directory_exits_2_naming_the_holder(finished, tmp_path, capsys, monkeypatch):
    run = copy_run(finished, tmp_path)
    with run_lock(run):
        assert holder(run) == os.getpid()
        line = refused_unchanged([*TINY, *DIGITS_LIKE], run, capsys, monkeypatch, "in use by process", str(os.getpid()))
        assert str(run) in line
    code, _, err = invoke([*TINY, *DIGITS_LIKE, f"hydra.run.dir={run}"], capsys, monkeypatch, tmp_path)
    assert code == 0 and "already finished" not in err, err  # released: the rerun goes through


def test_a_refused_first_run_under_the_lock_leaves_no_directory(tmp_path):
    with pytest.raises(RuntimeError):
        with run_lock(tmp_path / "fresh"):
            raise RuntimeError
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow  # a process interrupted twice
def test_a_second_ctrl_c_during_shutdown_prints_no_traceback(tmp_path):
    from test_errors import _as_from_a_terminal

    args = [sys.executable, "-m", "modeconn.run.cli", *TINY, "trainer.epochs=4000", f"hydra.run.dir={tmp_path}/run"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MODECONN_DEBUG", None)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)
    resume = tmp_path / "run" / "endpoints" / "seed0.pt.resume.pt"
    deadline = time.time() + 120
    while not resume.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for _ in range(3):  # Ctrl-C, then two more while it shuts down
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["modeconn: interrupted; rerun the same command to resume"], err
