"""Stability of a trained network: dropout stability (Kuditipudi et al. Definition 1) and the
noise-stability quantities of Definitions 2-4, plus Algorithm 1's random dropout."""
from modeconn.stability.dropout import DropoutStability, dropout_stability
from modeconn.stability.dropout_mask import apply_dropout, dropout_masks, random_dropout
from modeconn.stability.noise import NoiseStability, NotAChainError, noise_stability

__all__ = ["DropoutStability", "dropout_stability", "random_dropout", "apply_dropout", "dropout_masks",
           "NoiseStability", "NotAChainError", "noise_stability"]
