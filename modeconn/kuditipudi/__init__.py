"""Kuditipudi et al. (NeurIPS 2019), "Explaining Landscape Connectivity of Low-cost Solutions for
Multilayer Nets": the constructions, one idea per module, in the paper's order.

============================  ==========================================================================
module                        what of the paper
============================  ==========================================================================
``chain``                     the network as a chain A_1..A_d of hidden layers (section 1's setup)
``chain_loss``                the loss along a chain: L(theta) on the training data, any state dict
``edits``                     index sets and the primitive edits; the moves (a) and (b) as segment labels
``lemma1``                    theta_k (Definition 1's nested dropout) and Lemma 1's path to theta_1
``lemma4``                    Lemma 4: permuting non-zero units at constant loss
``lemma2``                    Lemma 2: two half-free networks connected without epsilon
``dropout_stability``         Definition 1: kept sets, the scale r, every L(theta_k), epsilon
``algorithm1``                Algorithm 1: a random dropout copy
``resample``                  Lemma 3's dropout segment, resampled until it stays low
``narrow``                    Theorem 3's narrow network theta*, trained and embedded
``norms``                     Definition 2's norm numerics (cushion ratios, spectral norms)
``layer_graph``               the traced model as A_1..A_d with M^{i,j} as functions (fx interpreter)
``noise_stability``           Definitions 2-4: the measurement and epsilon with its side conditions
``noise_result``              its result, with ``json_codec`` for non-finite numbers in JSON
============================  ==========================================================================

The path constructors :func:`modeconn.paths.dropout_path` (Theorem 1), :func:`modeconn.paths.noise_path`
(Theorem 2) and :func:`modeconn.paths.narrow_path` (Theorem 3) are thin layers over these modules; the
measures are named for users in :mod:`modeconn.stability`. Nothing here imports :mod:`modeconn.paths` or
:mod:`modeconn.stability`.
"""
