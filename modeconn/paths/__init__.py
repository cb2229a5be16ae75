"""Paths between two solutions: every constructor returns a :class:`Path`."""
from modeconn.params.path import LinearPath, Path, PiecewiseLinearPath, State, linear
from modeconn.paths.autoneb import autoneb
from modeconn.paths.curve_fit import fit_curve
from modeconn.paths.curves import CurvePath, coefficients, load_curve
from modeconn.paths.dropout import dropout_path
from modeconn.paths.narrow import narrow_path
from modeconn.paths.noise import noise_path

__all__ = ["Path", "LinearPath", "PiecewiseLinearPath", "State", "linear",
           "CurvePath", "coefficients", "fit_curve", "load_curve", "dropout_path",
           "noise_path", "narrow_path", "autoneb"]
