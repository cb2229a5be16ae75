"""One writer per run directory: an exclusive ``flock`` on the directory itself, held for the whole run.

Locking the directory's own file descriptor (not a lock file inside it) writes nothing, so a refused
command still leaves every byte of the directory as it was; the kernel drops the lock when the process
ends, however it ends (Ctrl-C, SIGKILL), so a stale lock cannot block a rerun. A second run in the same
directory stops at once with :class:`RunDirectoryBusyError` (exit 2) naming the process that holds it,
read from ``/proc/locks`` where there is one.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from modeconn.io.options import ConfigError

__all__ = ["RunDirectoryBusyError", "run_lock", "holder"]


class RunDirectoryBusyError(ConfigError):
    """Another process is running in this run directory."""


def holder(folder: str | os.PathLike) -> int | None:
    """The pid of a process holding a ``flock`` on ``folder`` (from ``/proc/locks``), or None if unknown."""
    try:
        st = os.stat(folder)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":  # '->' marks a process waiting for it
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                return int(fields[4])
        except ValueError:
            continue
    return None


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on run directory ``folder`` (created if missing, and removed again on the way
    out if this call created it and it is still empty); :class:`RunDirectoryBusyError` if another process
    holds it."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder(folder)
            who = f"process {pid}" if pid is not None else "another process"
            raise RunDirectoryBusyError(
                f"run directory {folder} is in use by {who} (a run is writing there); wait for it to finish, "
                "stop it, or choose another directory (hydra.run.dir=...)") from None
        try:
            yield folder
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty directory: a refused first run leaves nothing behind
