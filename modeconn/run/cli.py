"""The ``modeconn`` command: a Hydra app (``modeconn [overrides]``, ``modeconn -m ...`` sweeps) plus
``modeconn report RUN_DIR...`` to tabulate finished runs.

Exit codes: 0 done, 2 bad input (one line on stderr naming the key or file), 130 interrupted (rerun the
same command to resume), 1 a bug (with the traceback). ``MODECONN_DEBUG=1`` shows the traceback of
every error.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from modeconn.run.schema import conf_dir

log = logging.getLogger("modeconn")

EXIT_DONE, EXIT_BUG, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
INTERRUPTED = "modeconn: interrupted; rerun the same command to resume"


CONF_DIR = conf_dir()  # modeconn/conf in an installed wheel, <repo>/conf in a source tree
# errno values that mean the environment refused a file operation (bad input, not a bug)
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                       errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG}


def _user_errors() -> tuple[type[BaseException], ...]:
    from modeconn.params.batchnorm import BatchNormFoldError
    from modeconn.io.checkpoint import CheckpointMismatchError, UnreadableFileError
    from modeconn.run.config import ConfigError
    from modeconn.data import DatasetNotFoundError
    from modeconn.training.train import NonFiniteLossError
    from modeconn.units import UnsupportedLayerError

    # ValueError covers the rest of the input checks (a path's options, unsupported architectures ...)
    return (ConfigError, DatasetNotFoundError, CheckpointMismatchError, UnreadableFileError, NonFiniteLossError,
            UnsupportedLayerError, BatchNormFoldError, ValueError)


def _out_of_memory(e: BaseException) -> bool:
    """An allocation the machine could not serve (Python's MemoryError, torch's CPU allocator, CUDA OOM)."""
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _is_user_error(e: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, (HydraException, OmegaConfBaseException)) or _out_of_memory(e):
        return True
    if isinstance(e, OSError):
        return isinstance(e, FileNotFoundError) or e.errno in _ENVIRONMENT_ERRNOS
    return isinstance(e, _user_errors())


def one_line(e: BaseException) -> str:
    """The error as one line: Hydra's multi-line messages folded, lists joined by commas, search paths dropped."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, OverrideParseException) and e.override and e.override not in str(e):
        text = f"override {e.override!r} cannot be parsed: {e}"
    elif isinstance(e, OSError) and e.filename is not None and not isinstance(e, MissingConfigException):
        text = f"{e.strerror or type(e).__name__}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    elif _out_of_memory(e):  # past the estimates (modeconn/run/memory.py): the machine had less than they assume
        found = re.search(r"tried to allocate [^.]*", str(e))
        text = (f"out of memory ({found.group(0) if found else type(e).__name__}); lower the sizes in the config "
                "(the data, the model, eval.batch_size, a path's num_bends or cycles) or free memory")
    else:
        text = str(e)
    if isinstance(e.__cause__, OmegaConfBaseException) and not isinstance(e, OmegaConfBaseException):
        text += "\n(" + str(e.__cause__).splitlines()[0] + ")"
    out: list[str] = []
    listing = False  # after a line ending in ':' (Hydra's "Available options in 'path':"), join by commas
    for line in (s.strip() for s in text.split("Config search path:")[0].splitlines()):
        if not line:
            continue
        if listing:
            out[-1] += ("" if out[-1].endswith(":") else ",") + " " + line
        else:
            out.append(line)
            listing = line.endswith(":")
    result = " ".join(out)
    if isinstance(e, MissingConfigException) and not e.options:
        result += _available_options(result)
    if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
        result = f"{e.full_key}: {str(e).splitlines()[0]}"  # not OmegaConf's full_key / object_type lines
    return result


def _available_options(message: str) -> str:
    """``Could not load 'group/name'`` gains the group's options (Hydra lists them only sometimes)."""
    match = re.search(r"Could not (?:load|find) '([\w/]+)/([^']+)'", message)
    if not match or not (Path(CONF_DIR) / match.group(1)).is_dir():
        return ""
    names = sorted(p.stem for p in (Path(CONF_DIR) / match.group(1)).glob("*.yaml"))
    return f"; available in '{match.group(1)}': {', '.join(names)}"


def _fail(e: BaseException) -> int:
    """Print ``e`` as one ``modeconn: error:`` line (or its traceback with MODECONN_DEBUG=1); the exit code."""
    if _debug():
        traceback.print_exception(e)
    print(f"modeconn: error: {one_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _debug() -> bool:
    return os.environ.get("MODECONN_DEBUG", "") not in ("", "0")


def selected_paths(overrides: list[str]) -> list[str] | None:
    """The names a ``path=[...]`` command-line override selects, if there is one.

    A preset's options for its own paths would otherwise add them back to a narrower selection.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    mine = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "path"]
    chosen = None
    for override in OverridesParser.create().parse_overrides(mine):  # the last one wins, as in Hydra
        if override.key_or_group == "path" and not override.is_delete():
            value = override.value()
            chosen = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return chosen


def _task_overrides() -> list[str]:
    """The command line's overrides as typed (an override's own ``${...}`` is not resolved here)."""
    return [str(o) for o in OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)]


def _write_hydra_record(cfg: DictConfig) -> None:
    """Hydra's ``.hydra/{config,hydra,overrides}.yaml``, written only once a run really starts (Hydra's own
    writing is off: ``hydra.output_subdir: null``), so a refused rerun leaves a finished run untouched."""
    from modeconn.io.checkpoint import atomic_write_bytes

    hc = HydraConfig.get()
    folder = Path(hc.runtime.output_dir) / ".hydra"
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hc})),
                       ("overrides.yaml", hc.overrides.task)):
        atomic_write_bytes(folder / name, OmegaConf.to_yaml(node).encode())


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _run(cfg: DictConfig) -> None:
    from modeconn.io.heap import keep_freed_memory
    from modeconn.run.pipeline import run

    keep_freed_memory()  # the one process-wide allocator setting (see modeconn/io/heap.py)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, out_dir, only=selected_paths(_task_overrides()),
                      record=lambda: _write_hydra_record(cfg))
    except Exception as e:  # noqa: BLE001 - sorted into bad input (exit 2) and bugs (re-raised)
        if not _is_user_error(e):
            raise
        _remove_if_empty(out_dir)
        sys.exit(_fail(e))
    except BaseException:
        _remove_if_empty(out_dir)
        raise
    if summary.get("skipped"):
        print(f"modeconn: {out_dir} is already finished (nothing redone); report: {out_dir}/report.md")
    else:
        print(f"modeconn: run finished in {summary.get('seconds', 0):.1f} s; report: {out_dir}/report.md")


def _remove_if_empty(folder: Path) -> None:
    """Hydra creates the run directory before the job starts; a job refused before writing leaves none."""
    try:
        folder.rmdir()
    except OSError:
        pass


_TILDE_VALUE = re.compile(r"^(\+{0,2}[\w.@/-]+)=([^,\[\]{}()'\"$\\\s]*~[^,\[\]{}()'\"$\\\s]*)$")


def quote_tilde(arg: str) -> str:
    """``data.root=~/data`` -> ``data.root='~/data'``: Hydra's override grammar has no unquoted ``~`` in a
    value (a lexer error), so such a value can only be meant as a path."""
    match = _TILDE_VALUE.match(arg)
    return f"{match.group(1)}='{match.group(2)}'" if match else arg


def _ignore_interrupts() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _first_interrupt(signum, frame) -> None:
    """Ctrl-C: stop the run (KeyboardInterrupt) and ignore any further Ctrl-C, so a second one pressed while
    the run shuts down (files being closed, the resume file kept) cannot break in with a traceback."""
    _ignore_interrupts()
    raise KeyboardInterrupt


def _install_interrupt_handler():
    """:func:`_first_interrupt` for SIGINT when Python's default is in place (not when the shell made the
    process ignore it, nor off the main thread); returns the handler to restore, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return None
    signal.signal(signal.SIGINT, _first_interrupt)
    return previous


def main() -> None:
    """Console entry point: exit 0 done, 2 bad input, 130 interrupted, 1 a bug."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from modeconn.reporting.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    landscape = len(sys.argv) > 1 and sys.argv[1] == "landscape"  # many minima: modeconn/run/landscape.py
    sys.argv = [sys.argv[0], *(quote_tilde(a) for a in sys.argv[1:])]
    handler = _install_interrupt_handler()
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors reach us instead of being printed and exit 1
    try:
        if landscape:  # its errors and Ctrl-C are handled below, as a run's
            from modeconn.run.landscape import main as landscape_main

            sys.exit(landscape_main(sys.argv[2:]))
        _run()
    except KeyboardInterrupt:
        handler = None  # the shutdown is under way: further Ctrl-C stay ignored until the process exits
        _ignore_interrupts()
        if _debug():
            traceback.print_exc()
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001
        if not _is_user_error(e):
            traceback.print_exc()
            print(f"modeconn: internal error (a bug, please report it): {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(EXIT_BUG)
        sys.exit(_fail(e))
    finally:
        if handler is not None:  # a finished or refused run in this process: Ctrl-C as before
            signal.signal(signal.SIGINT, handler)
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


if __name__ == "__main__":
    main()
