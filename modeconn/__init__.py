"""modeconn: find and measure low-loss paths between independently trained neural networks.

The stages are folders (lowest first): ``io``, ``data``/``models``/``units``, ``params``, ``training``/
``evaluation``/``align``, ``kuditipudi``, ``paths``, ``stability``, ``reporting``, ``landscape``, ``run``.
The public modules keep their short names: ``from modeconn import data, models, units, train, paths,
evaluate, align, stability, plots`` (``train`` is :mod:`modeconn.training.train`, ``evaluate``
:mod:`modeconn.evaluation.evaluate`, ``plots`` :mod:`modeconn.reporting.plots`); they are imported on first
use, so ``import modeconn`` stays cheap.
"""
import importlib

__version__ = "0.1.0"

#: short public name -> the module it stands for
_ALIASES = {
    "train": "modeconn.training.train",
    "evaluate": "modeconn.evaluation.evaluate",
    "barriers": "modeconn.evaluation.barriers",
    "checkpoint": "modeconn.io.checkpoint",
    "plots": "modeconn.reporting.plots",
}
_PACKAGES = ("data", "models", "units", "params", "training", "evaluation", "align", "kuditipudi", "paths",
             "stability", "reporting", "landscape", "run", "io")


def __getattr__(name: str):
    if name in _ALIASES or name in _PACKAGES:
        module = importlib.import_module(_ALIASES.get(name, f"{__name__}.{name}"))
        globals()[name] = module
        return module
    raise AttributeError(f"module 'modeconn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_ALIASES, *_PACKAGES])
