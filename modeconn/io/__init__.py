"""Files on disk, the lowest layer: checkpoints and their sidecars, atomic writes, the one weights-only
reader (:mod:`~modeconn.io.checkpoint`), a run directory's record (:mod:`~modeconn.io.runrecord`), option
errors (:mod:`~modeconn.io.options`) and the process-wide allocator setting (:mod:`~modeconn.io.heap`)."""
