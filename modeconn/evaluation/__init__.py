"""The evaluation stage: metrics along any path (:mod:`~modeconn.evaluation.evaluate`), many points through
one model at once (:mod:`~modeconn.evaluation.stacked`) and every barrier definition
(:mod:`~modeconn.evaluation.barriers`)."""
