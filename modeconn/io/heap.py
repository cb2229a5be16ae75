"""Let the C heap keep freed memory: the one process-wide allocator setting modeconn makes.

glibc serves every block above its mmap threshold (128 KiB at start) with freshly mapped pages and gives
freed heap tops above its trim threshold back to the system, so the activations of each data batch of a
batched evaluation are page-faulted in anew: about a quarter of the batched evaluation time of the default
MLP on a 2-core CPU (docs/benchmarks.md). :func:`keep_freed_memory` raises both thresholds with glibc's
``mallopt``, so blocks up to 32 MiB come from the heap and up to 256 MiB of freed heap is kept for reuse;
the environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do the same from outside.

It is a choice for the whole process, so the library never makes it by itself: the ``modeconn`` command
and the benchmarks call it once at start, and a script that evaluates many paths may do the same. It does
nothing (and returns False) where the C library has no ``mallopt`` (macOS, Windows) or refuses it.
"""
from __future__ import annotations

import ctypes
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); True when the C library took them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
