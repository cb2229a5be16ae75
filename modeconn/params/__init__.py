"""Points and paths in parameter space, below every constructor and evaluator: plain state dicts
(:mod:`~modeconn.params.state`), the *path* abstraction (:mod:`~modeconn.params.path`) and what a path
guarantees (:mod:`~modeconn.params.certificate`), loading a point into a network with its BatchNorm
statistics recomputed (:mod:`~modeconn.params.batchnorm`), and the input checks at the API's boundaries
(:mod:`~modeconn.params.checks`)."""
