"""Stability of a trained network: dropout stability (Kuditipudi et al. Definition 1), Algorithm 1's random
dropout and the noise-stability quantities of Definitions 2-4. The measures live in
:mod:`modeconn.kuditipudi`; this package names them for users (and holds the endpoint-stability step of a
run, :mod:`modeconn.run.endpoint_stability`)."""
from modeconn.kuditipudi.algorithm1 import apply_dropout, dropout_masks, random_dropout
from modeconn.kuditipudi.chain import NotAChainError
from modeconn.kuditipudi.dropout_stability import DropoutStability, dropout_stability
from modeconn.kuditipudi.noise_result import NoiseStability
from modeconn.kuditipudi.noise_stability import noise_stability
from modeconn.kuditipudi.norms import operator_frobenius_norm, spectral_norms

__all__ = ["DropoutStability", "dropout_stability", "random_dropout", "apply_dropout", "dropout_masks",
           "NoiseStability", "NotAChainError", "noise_stability", "operator_frobenius_norm", "spectral_norms"]
