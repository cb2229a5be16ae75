"""The reporting stage: figures (:mod:`~modeconn.reporting.plots`, :mod:`~modeconn.reporting.plots_stability`),
a run's ``report.md`` (:mod:`~modeconn.reporting.report_md`), ``modeconn report`` over many runs
(:mod:`~modeconn.reporting.report`, :mod:`~modeconn.reporting.figures`)."""
