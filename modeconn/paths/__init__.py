"""Paths between two solutions: every constructor returns a :class:`Path`."""
from modeconn.paths.base import LinearPath, Path, PiecewiseLinearPath, State, linear

__all__ = ["Path", "LinearPath", "PiecewiseLinearPath", "State", "linear"]
