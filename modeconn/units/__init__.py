"""Unit specs: which tensor axes of a model's state dict index its hidden units, and which move together.

:mod:`modeconn.units.spec` holds the data model (its docstring gives the settled shape):
:class:`UnitAxis` ``(name, axis, block, offset, within)``, :class:`UnitGroup` ``(name, size, producers,
consumers, layers, blocks, tie, mixing)`` and :class:`UnitSpec` ``(groups, output, skipped, covered)`` with
``permute``, ``random_perms``, ``check_perms``, ``coverage``, ``check_per_unit`` and ``from_axes``.
:func:`infer` (:mod:`modeconn.units.infer`) derives a spec from an ``nn.Module`` with ``torch.fx``, one
handler per kind of node (:mod:`~modeconn.units.ops`, :mod:`~modeconn.units.layers`,
:mod:`~modeconn.units.attention`).
"""
from modeconn.units.infer import infer
from modeconn.units.supported import SUPPORTED
from modeconn.units.spec import (UnitAxis, UnitGroup, UnitSpec, UnsupportedLayerError, join_perm, split_perm,
                                 unit_slices)

__all__ = ["UnitAxis", "UnitGroup", "UnitSpec", "UnsupportedLayerError", "infer", "unit_slices", "split_perm",
           "join_perm", "SUPPORTED"]
