"""The checkpoint formats people save, through ``load_checkpoint`` and ``endpoints=[A, B]``: bare state dicts,
wrappers, Lightning ``.ckpt`` (hyper-parameters included, read weights-only), DDP / Lightning / torch.compile
prefixes (stripped only on an exact key match), ``.safetensors``; mismatches name keys, shapes and the reason."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import requires
from hydra import compose, initialize_config_dir

from modeconn.io.checkpoint import CheckpointMismatchError, UnreadableFileError, load_checkpoint, safe_load
from modeconn.io.state_formats import match_prefixes, unwrap
from modeconn.models import build
from modeconn.run.cli import CONF_DIR
from modeconn.run.pipeline import run

HIDDEN = [8, 8]


def mlp(seed=0):
    torch.manual_seed(seed)
    return build("mlp", (64,), 10, hidden=HIDDEN)


def prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def lightning_hparams():
    """An object pickled as Lightning's AttributeDict, without Lightning: a stand-in module, removed after."""
    name = "lightning.fabric.utilities.data"
    parts = ["lightning", "lightning.fabric", "lightning.fabric.utilities", name]
    mods = {p: types.ModuleType(p) for p in parts}
    cls = type("AttributeDict", (dict,), {"__module__": name})
    mods[name].AttributeDict = cls
    return mods, cls


def save_as(fmt, state, file):
    """Write ``state`` the way ``fmt`` does."""
    if fmt == "bare":
        torch.save(state, file)
    elif fmt in ("state_dict", "model", "model_state_dict"):
        torch.save({fmt: state, "epoch": 3, "optimizer": {"lr": 0.1}}, file)
    elif fmt == "ddp":
        torch.save(prefixed(state, "module."), file)
    elif fmt == "compile":
        torch.save(prefixed(state, "_orig_mod."), file)
    elif fmt == "compiled_ddp":
        torch.save(prefixed(state, "module._orig_mod."), file)
    elif fmt == "lightning":
        mods, cls = lightning_hparams()
        saved = {k: sys.modules.get(k) for k in mods}
        sys.modules.update(mods)
        try:
            hp = cls(lr=0.1, hidden=HIDDEN)
            torch.save({"epoch": 2, "global_step": 10, "pytorch-lightning_version": "2.4.0",
                        "state_dict": prefixed(state, "model."), "hyper_parameters": hp,
                        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}]}, file)
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return file


FORMATS = ["bare", "state_dict", "model", "model_state_dict", "ddp", "compile", "compiled_ddp", "lightning",
           pytest.param("safetensors", marks=requires("safetensors"))]
SUFFIX = {"lightning": ".ckpt", "safetensors": ".safetensors"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_the_exact_weights(tmp_path, fmt, caplog):
    net = mlp()
    file = save_as(fmt, net.state_dict(), tmp_path / f"a{SUFFIX.get(fmt, '.pt')}")
    with caplog.at_level("INFO", logger="modeconn"):
        state, _ = load_checkpoint(file, model=mlp(1))
    assert set(state) == set(net.state_dict())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    if fmt in ("ddp", "compile", "lightning"):
        assert "stripped the prefix" in caplog.text  # what was stripped is logged


def test_lightning_files_load_weights_only_and_other_objects_stay_refused(tmp_path):
    file = save_as("lightning", mlp().state_dict(), tmp_path / "a.ckpt")
    blob = safe_load(file)
    assert type(blob["hyper_parameters"]) is dict and blob["hyper_parameters"]["lr"] == 0.1  # a plain dict
    torch.save({"state_dict": mlp().state_dict(), "extra": torch.nn.ReLU()}, tmp_path / "b.ckpt")
    with pytest.raises(UnreadableFileError, match=r"torch.nn.modules.activation.ReLU.*refused"):
        load_checkpoint(tmp_path / "b.ckpt", model=mlp())


def test_a_prefix_is_stripped_only_when_the_keys_then_match_exactly():
    model_keys = {"model.0.weight": 0, "model.0.bias": 0}  # a model whose own keys start with 'model.'
    state = {"model.0.weight": torch.ones(1), "model.0.bias": torch.ones(1)}
    assert match_prefixes(state, model_keys) == (state, [])  # already exact: kept
    partial = {"module.0.weight": torch.ones(1), "0.bias": torch.ones(1)}
    assert match_prefixes(partial, {"0.weight": 0, "0.bias": 0}) == (partial, [])  # not on every key: kept
    with pytest.raises(ValueError, match="does not hold a state dict"):
        unwrap([torch.ones(1)], "checkpoint x")


def test_mismatches_name_keys_shapes_and_what_a_prefix_or_wrapper_explains(tmp_path):
    other = build("mlp", (64,), 10, hidden=[8, 16]).state_dict()
    save_as("ddp", other, tmp_path / "ddp.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(tmp_path / "ddp.pt", model=mlp())
    msg = str(err.value)
    assert "different architecture" in msg and "expected [8, 8], got [16, 8]" in msg and "'module.' (DDP)" in msg
    torch.save(prefixed(mlp().state_dict(), "net."), tmp_path / "net.pt")
    with pytest.raises(CheckpointMismatchError, match=r"every key starts with 'net\.'.*submodule"):
        load_checkpoint(tmp_path / "net.pt", model=mlp())
    torch.save({"ema": mlp().state_dict(), "epoch": 1}, tmp_path / "ema.pt")
    with pytest.raises(CheckpointMismatchError, match=r"entries holding tensors: 'ema' \(6 tensors\)"):
        load_checkpoint(tmp_path / "ema.pt", model=mlp())


@requires("safetensors")
def test_a_damaged_safetensors_file_is_named(tmp_path):
    file = save_as("safetensors", mlp().state_dict(), tmp_path / "a.safetensors")
    file.write_bytes(file.read_bytes()[:-20])
    with pytest.raises(UnreadableFileError, match=r"a.safetensors is truncated or corrupt"):
        load_checkpoint(file, model=mlp())


def test_safetensors_missing_says_how_to_install(tmp_path, monkeypatch):
    file = tmp_path / "a.safetensors"
    file.write_bytes(len(b'{"__metadata__":{}}').to_bytes(8, "little") + b'{"__metadata__":{}}')
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(UnreadableFileError, match="pip install safetensors"):
        load_checkpoint(file)


def config(*overrides):
    quick = [f"model.hidden=[{HIDDEN[0]},{HIDDEN[1]}]", "model.dropout=0.0", "eval.num_points=3", "progress=false",
             "path=[linear]"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*quick, *overrides])


@pytest.mark.parametrize("fmt_a, fmt_b", [("lightning", "ddp"), ("compile", "model_state_dict"),
                                          pytest.param("safetensors", "state_dict", marks=requires("safetensors"))])
def test_endpoints_in_any_format_run_a_path(tmp_path, fmt_a, fmt_b):
    a = save_as(fmt_a, mlp(0).state_dict(), tmp_path / f"a{SUFFIX.get(fmt_a, '.pt')}")
    b = save_as(fmt_b, mlp(1).state_dict(), tmp_path / f"b{SUFFIX.get(fmt_b, '.pt')}")
    summary = run(config(f"endpoints=[{a},{b}]"), tmp_path / "run")
    assert summary["finished"] and set(summary["paths"]) == {"linear"}
    ev = json.loads((tmp_path / "run" / "paths" / "linear.json").read_text())
    assert ev["metrics"]["train_loss"][0] != ev["metrics"]["train_loss"][-1]  # A and B are both there


@pytest.mark.slow  # a subprocess: about 6 s
def test_the_cli_takes_a_lightning_file_and_refuses_a_foreign_one_in_one_line(tmp_path):
    a = save_as("lightning", mlp(0).state_dict(), tmp_path / "a.ckpt")
    b = save_as("ddp", mlp(1).state_dict(), tmp_path / "b.pt")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    args = [sys.executable, "-m", "modeconn.run.cli", "model.hidden=[8,8]", "model.dropout=0.0", "eval.num_points=3",
            "progress=false", "path=[linear]", f"endpoints=[{a},{b}]"]
    ok = subprocess.run([*args, "hydra.run.dir=run"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "stripped the prefix 'model.' (Lightning)" in (tmp_path / "run" / "cli.log").read_text()
    bad = subprocess.run([*args[:3], "model.hidden=[8,16]", *args[4:], "hydra.run.dir=run2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("modeconn: error: checkpoint") and "a.ckpt" in line and "shape difference" in line


def test_safetensors_is_a_declared_dependency():
    text = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    assert '"safetensors' in text.split("[project.optional-dependencies]")[0]  # a core dependency
