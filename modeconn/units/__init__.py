"""Unit specs: which tensor axes of a model's state dict index its hidden units.

:mod:`modeconn.units.spec` holds the data model (:class:`UnitAxis`, :class:`UnitGroup`, :class:`UnitSpec`),
:mod:`modeconn.units.infer` derives a spec from an ``nn.Module`` with ``torch.fx``.
"""
from modeconn.units.infer import SUPPORTED, infer
from modeconn.units.spec import (UnitAxis, UnitGroup, UnitSpec, UnsupportedLayerError, join_perm, split_perm,
                                 unit_slices)

__all__ = ["UnitAxis", "UnitGroup", "UnitSpec", "UnsupportedLayerError", "infer", "unit_slices", "split_perm",
           "join_perm", "SUPPORTED"]
