"""The landscape of many minima (Draxler et al. 2018): connect N solutions pair by pair as suggestion engines
propose, read off the minimum spanning tree of saddle losses, the minimax barrier between every pair, the
components below a threshold, and draw the disconnectivity graph.

``explore(model, thetas, data, constructor="bezier")`` runs it in-process; ``modeconn landscape`` runs the
pairs as ordinary runs through the configured Hydra launcher. Both write the same folder layout
(:mod:`modeconn.landscape.explore`).
"""
from modeconn.landscape.engines import ENGINES, propose
from modeconn.landscape.explore import explore
from modeconn.landscape.graph import SCHEMA, Landscape

__all__ = ["explore", "Landscape", "ENGINES", "propose", "SCHEMA"]
