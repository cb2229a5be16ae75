"""The top: the ``modeconn`` command (:mod:`~modeconn.run.cli`), config validation
(:mod:`~modeconn.run.config`), one run end to end (:mod:`~modeconn.run.pipeline`) and its endpoint-stability
step (:mod:`~modeconn.run.endpoint_stability`)."""
