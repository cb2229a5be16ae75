"""The result of a noise-stability measurement (Kuditipudi et al. 2019, Definitions 2-4), and its JSON
form."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path as FilePath

import numpy as np

from modeconn.io.checkpoint import atomic_write_json
from modeconn.kuditipudi.json_codec import decode, decode_array, decode_float, encode
from modeconn.kuditipudi.norms import nanmedian, nanmin

__all__ = ["NoiseStability", "ARRAY_LISTS"]

ARRAY_LISTS = ("cushion", "interlayer_min", "contraction", "smoothness")


@dataclass
class NoiseStability:
    """Noise-stability measurements of one network (conventions: :mod:`modeconn.kuditipudi.noise_stability`).

    Layer lists have one entry per weight layer A_1..A_d (0-based position i is the paper's layer i+1);
    per-point arrays have one value per measured data point. ``None`` marks a quantity the paper does not
    define for that layer (contraction of the output layer; smoothness of layers 1 and d).
    """

    layers: list[str]                       # module paths of A_1..A_d
    kinds: list[str]                        # layer class names
    widths: list[int]                       # h_1..h_{d-1} (units = neurons / channels)
    activations: list[str]                  # phi after each hidden layer
    d: int
    h_min: int
    num_points: int
    cushion: list[np.ndarray]               # mu_i(x), d arrays
    interlayer_min: list[np.ndarray]        # mu_{i->}(x) = min_{j>=i} mu_{i,j}(x), d arrays
    interlayer: dict[str, np.ndarray]       # "i,j" (1-based, i < j) -> mu_{i,j}(x)
    contraction: list[np.ndarray | None]    # ||x^i|| / ||phi(x^i)||, hidden layers (None for layer d)
    contraction_max: np.ndarray             # c(x) = max over hidden layers
    smoothness: list[np.ndarray | None]     # rho_i(x), pooled over draws; None for layers 1 and d
    dominance: list[float]                  # kappa_i (unit blocks), hidden layers
    dominance_entry: list[float]            # kappa_i (flattened entries), hidden layers
    mu: list[float]                         # mu_i = min_x mu_i(x)
    mu_arrow: list[float]                   # mu_{i->} = min_x mu_{i->}(x)
    c: float
    rho: float
    rho_draws: list[float]
    max_output_norm: float
    epsilon: float
    beta: float
    conditions: dict
    settings: dict
    info: dict = field(default_factory=dict)


    def summaries(self) -> dict[str, dict[str, list[float | None]]]:
        """Per quantity and layer, the min and median over the data points."""
        out: dict[str, dict[str, list[float | None]]] = {}
        for name in ARRAY_LISTS:
            arrays = getattr(self, name)
            out[name] = {
                "min": [None if a is None else nanmin(a) for a in arrays],
                "median": [None if a is None else nanmedian(a) for a in arrays],
            }
        return out

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["summaries"] = self.summaries()
        return encode(d)

    @classmethod
    def from_dict(cls, d: Mapping) -> "NoiseStability":
        d = dict(d)
        d.pop("summaries", None)
        for name in ARRAY_LISTS:
            d[name] = [decode_array(a) for a in d[name]]
        d["contraction_max"] = decode_array(d["contraction_max"])
        d["interlayer"] = {k: decode_array(v) for k, v in d["interlayer"].items()}
        for name in ("dominance", "dominance_entry", "mu", "mu_arrow", "rho_draws"):
            d[name] = [decode_float(v) for v in d[name]]
        for name in ("c", "rho", "max_output_norm", "epsilon", "beta"):
            d[name] = decode_float(d[name])
        for name in ("conditions", "settings", "info"):
            d[name] = decode(d.get(name, {}))
        return cls(**d)

    def save_json(self, path: str | FilePath) -> FilePath:
        """Write the result as JSON atomically (non-finite numbers as the strings "inf", "-inf", "nan")."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | FilePath) -> "NoiseStability":
        return cls.from_dict(json.loads(FilePath(path).read_text()))
