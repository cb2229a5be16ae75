#!/usr/bin/env python3
"""Set-up and the two everyday commands, needing nothing but Python 3.10+ and pip.

    python3 dev.py demo    # create .venv, install modeconn, run the default job on the embedded digits data
    python3 dev.py test    # create .venv, install modeconn with test extras, run the test suite
    python3 dev.py test --fast   # the same without the end-to-end tests marked slow (times: README.md)

The tests run in one pytest-xdist worker per core (pass ``-n 0`` for one process).

Extra arguments are passed on: ``python3 dev.py demo path=[linear,bezier]``, ``python3 dev.py test -k units``.

``MODECONN_VENV`` (default ``.venv``) picks the environment and ``MODECONN_EXTRAS`` (default ``test,launchers``)
the extras installed into it: ``MODECONN_VENV=.venv-bare MODECONN_EXTRAS=test python3 dev.py test --fast`` runs
the tests without any optional dependency (their tests skip), as ``.ci/run`` does.
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("MODECONN_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".modeconn-installed"
EXTRAS = os.environ.get("MODECONN_EXTRAS", "test,launchers")


def ensure_env() -> None:
    """Create the virtualenv and install the package (editable, with ``EXTRAS``) when out of date: older than
    pyproject.toml or installed with other extras (the stamp file holds them)."""
    if not (BIN / "python").exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stale = not STAMP.exists() or STAMP.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime
    if stale or STAMP.read_text().strip() not in ("", EXTRAS):  # an empty stamp: written before extras were recorded
        print(f"dev.py: installing modeconn[{EXTRAS}] and its dependencies into {VENV} (PyTorch takes a few minutes "
              "the first time)", flush=True)
        subprocess.run([str(BIN / "python"), "-m", "pip", "install", "-q", "-e", f"{ROOT}[{EXTRAS}]"], check=True)
        STAMP.write_text(EXTRAS + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    ensure_env()
    command, rest = argv[0], argv[1:]
    if command == "setup":
        return 0
    if command == "demo":
        return subprocess.call([str(BIN / "modeconn"), *rest], cwd=ROOT)
    return subprocess.call([str(BIN / "python"), "-m", "pytest", *pytest_args(rest)], cwd=ROOT)


def pytest_args(rest: list[str]) -> list[str]:
    """``--fast`` becomes ``-m "not slow"``; the tests run on every core (pytest-xdist, ``-n auto`` unless
    ``-n`` is given: the long end-to-end tests are pinned to one thread, so one worker per core); everything
    else goes to pytest as given."""
    args = [a for a in rest if a != "--fast"]
    if "--fast" in rest:
        args = ["-m", "not slow", *args]
    if not any(a.startswith(("-n", "--numprocesses")) for a in args):  # -n 2, -n0, -nauto, --numprocesses=2
        args = ["-n", "auto", "--dist", "worksteal", *args]
    return args


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
