"""Permutation alignment of two networks on their inferred unit specs, and REPAIR as a path transform.

- :func:`weight_matching`: Git Re-Basin's coordinate descent on summed weight inner products (no data).
- :func:`activation_matching`: one assignment per group on the correlation of unit activations.
- :func:`auto_matching`: both, keeping the one whose aligned straight line has the lower midpoint loss.
- :func:`repair`: any path, with every unit's pre-activation statistics reset to the interpolation of the
  endpoints' (Jordan et al., REPAIR), folded into the weights.

Align once, then build any path from ``theta_a`` to ``alignment.theta``.
"""
from modeconn.align.activations import activation_matching
from modeconn.align.alignment import Alignment
from modeconn.align.auto import auto_matching
from modeconn.align.repair import RepairedPath, repair
from modeconn.align.weights import weight_matching

__all__ = ["Alignment", "RepairedPath", "activation_matching", "auto_matching", "repair", "weight_matching"]
