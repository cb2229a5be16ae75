"""The user's own network by ``model._target_``: a module from the working directory, torchvision's resnet18,
timm when installed; the data's class count filled in; every refusal one exit-2 line naming the model."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import requires
from hydra import compose, initialize_config_dir

from modeconn.models import from_options
from modeconn.models.custom import target_kwargs
from modeconn.run.cli import CONF_DIR
from modeconn.run.config import ConfigError
from modeconn.run.pipeline import run

QUICK = ["trainer.epochs=1", "eval.num_points=3", "progress=false", "path=[linear]", "threads=1"]

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small conv net that takes its class count from the data (modeconn fills num_classes in)."""

    def __init__(self, num_classes, width=8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
'''


def config(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*QUICK, *overrides])


def cli(*args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": ""}  # the working directory only through modeconn
    return subprocess.run([sys.executable, "-m", "modeconn.run.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def images(file, n_train=24, n_test=8, classes=3, seed=0):
    """A tensors file of 3x32x32 images whose class is readable from the mean of one channel."""
    g = torch.Generator().manual_seed(seed)
    blob = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = torch.arange(n) % classes
        x = torch.randn(n, 3, 32, 32, generator=g)
        x[torch.arange(n), y] += 2.0
        blob[f"x_{split}"], blob[f"y_{split}"] = x, y
    torch.save(blob, file)
    return file


def package(root):
    (root / "mynets").mkdir()
    (root / "mynets" / "__init__.py").write_text("")
    (root / "mynets" / "nets.py").write_text(textwrap.dedent(NETS))


@pytest.mark.slow  # a subprocess end to end: about 10 s
def test_a_module_from_the_working_directory_trains_aligns_and_records_its_target(tmp_path):
    package(tmp_path)
    images(tmp_path / "d.pt")
    out = cli("model=custom", "model._target_=mynets.nets.Net", "+model.width=4", "data=tensors", "data.path=d.pt",
              *QUICK, "path=[linear,bezier]", "path.bezier.epochs=1", "align=weights", "hydra.run.dir=run",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"linear", "linear (aligned)", "bezier", "bezier (aligned)"} <= set(summary["paths"])
    side = json.loads((tmp_path / "run" / "endpoints" / "seed0.json").read_text())
    assert side["model"]["_target_"] == "mynets.nets.Net"
    assert side["model"]["kwargs"] == {"width": 4, "num_classes": 3}  # the class count came from the data
    assert summary["finished"]


@pytest.mark.slow  # resnet18 on 3x32x32 images: about 20 s
def test_torchvision_resnet18_runs_and_the_dropout_path_is_refused_in_one_line(tmp_path):
    images(tmp_path / "d.pt", n_train=16, n_test=4, classes=2)
    net = ["model=custom", "model._target_=torchvision.models.resnet18", "+model.num_classes=2", "data=tensors",
           "data.path=d.pt", "trainer.batch_size=8"]
    out = cli(*net, *QUICK, "align=weights", "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["paths"]) == {"linear", "linear (aligned)"}
    ends = "endpoints=[run/endpoints/seed0.pt,run/endpoints/seed1.pt]"  # no second training
    refused = cli(*net, *QUICK, ends, "path=[dropout]", "hydra.run.dir=run2", cwd=tmp_path)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert lines[-1].startswith("modeconn: error:") and "residual" in lines[-1]
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("overrides, words", [
    (["model._target_=torchvision.models.resnet18"], ["model torchvision.models.resnet18", "(N, 1, 8, 8)",
                                                      "(N, 3, H, W)"]),
    (["model._target_=torchvision.models.resnet18", "data=tensors"], ["data.path"]),
    (["model._target_=no_such_pkg.Net"], ["model._target_", "no_such_pkg", "cannot be imported"]),
    (["model._target_=torch.nn.Linear"], ["model torch.nn.Linear", "in_features"]),
    (["model._target_=torch.zeros", "+model.size=[2]"], ["model._target_", "returned a Tensor"]),
    ([], ["model._target_ must name"]),
])
def test_a_model_that_does_not_fit_is_refused_naming_model_and_shapes(tmp_path, overrides, words):
    with pytest.raises((ConfigError, ValueError, FileNotFoundError)) as err:
        run(config("model=custom", *overrides), tmp_path)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "endpoints").exists()


def test_the_class_count_comes_from_the_data_and_a_wrong_one_is_refused(tmp_path):
    images(tmp_path / "d.pt", classes=2)
    with pytest.raises(ConfigError, match="the data has 2 classes but the model has 1000 outputs"):
        run(config("model=custom", "model._target_=torchvision.models.resnet18", "+model.num_classes=1000",
                   "data=tensors", f"data.path={tmp_path}/d.pt"), tmp_path / "run")


def test_a_target_on_a_zoo_node_names_the_zoo_options():
    with pytest.raises(ConfigError, match=r"model._target_ must be set with model=custom .*'hidden'"):
        from modeconn.run.config import validate
        validate(config("+model._target_=torchvision.models.resnet18"))


def test_target_kwargs_fill_only_what_the_callable_names_and_the_config_leaves_out():
    def net(num_classes, input_shape, width=3):
        return torch.nn.Linear(int(np.prod(input_shape)), num_classes)

    options = {"_target_": "x.net", "width": 5}
    assert target_kwargs(net, options, (1, 8, 8), 10) == {"width": 5, "num_classes": 10, "input_shape": (1, 8, 8)}
    assert target_kwargs(net, {**options, "num_classes": 4}, (64,), 10)["num_classes"] == 4
    assert target_kwargs(torch.nn.Linear, {"_target_": "torch.nn.Linear"}, (64,), 10) == {}
    model = from_options({"_target_": "torch.nn.Linear", "in_features": 64, "out_features": 10}, (64,), 10)
    assert isinstance(model, torch.nn.Linear) and model.out_features == 10


def test_num_classes_reaches_builders_that_take_it_through_kwargs(tmp_path, monkeypatch):
    """torchvision's builders take num_classes through **kwargs: the data's class count reaches them; a
    callable whose **kwargs refuse it is built as configured."""
    model = from_options({"_target_": "torchvision.models.resnet18"}, (3, 32, 32), 10)
    assert model.fc.out_features == 10
    (tmp_path / "strict_kw.py").write_text(
        "import torch\n"
        "def net(**kw):\n"
        "    if kw: raise TypeError(f'net() got an unexpected keyword argument {next(iter(kw))!r}')\n"
        "    return torch.nn.Linear(64, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert from_options({"_target_": "strict_kw.net"}, (64,), 10).out_features == 10


@requires("timm")
def test_timm_create_model_builds_when_timm_is_installed():
    model = from_options({"_target_": "timm.create_model", "model_name": "resnet10t", "num_classes": 3}, (3, 32, 32), 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_timm_missing_names_the_optional_install():
    from conftest import installed
    if installed("timm"):
        pytest.skip("timm is installed")
    with pytest.raises(ValueError, match="pip install timm"):
        from_options({"_target_": "timm.create_model", "model_name": "convnext_atto"}, (3, 32, 32), 10)
