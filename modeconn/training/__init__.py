"""The training stage: the one training loop (:mod:`~modeconn.training.loop`) and independent solutions,
one per seed (:mod:`~modeconn.training.train`)."""
