"""The ``modeconn`` command: a Hydra app (``modeconn [overrides]``, ``modeconn -m ...`` sweeps) plus
``modeconn report RUN_DIR...`` to tabulate finished runs."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger("modeconn")


def _user_errors() -> tuple[type[BaseException], ...]:
    from modeconn.batchnorm import BatchNormFoldError
    from modeconn.checkpoint import CheckpointMismatchError
    from modeconn.config import ConfigError
    from modeconn.data import DatasetNotFoundError
    from modeconn.train import NonFiniteLossError
    from modeconn.units import UnsupportedLayerError

    # ValueError covers the rest of the input checks (a path's options, unsupported architectures ...)
    return (ConfigError, DatasetNotFoundError, CheckpointMismatchError, NonFiniteLossError,
            UnsupportedLayerError, BatchNormFoldError, FileNotFoundError, ValueError)


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def selected_paths(overrides: list[str]) -> list[str] | None:
    """The names a ``path=[...]`` command-line override selects, if there is one.

    A preset's options for its own paths would otherwise add them back to a narrower selection.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group == "path" and not override.is_delete():
            value = override.value()
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _run(cfg: DictConfig) -> None:
    from modeconn.pipeline import run

    out_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run(cfg, out_dir, only=selected_paths(HydraConfig.get().overrides.task))
    except _user_errors() as e:
        if os.environ.get("MODECONN_DEBUG"):
            raise
        log.error("%s: %s", type(e).__name__, e)
        print(f"modeconn: error: {e}\n(set MODECONN_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    if summary.get("skipped"):
        print(f"modeconn: {out_dir} is already finished (nothing redone); report: {out_dir}/report.md")
    else:
        print(f"modeconn: run finished in {summary.get('seconds', 0):.1f} s; report: {out_dir}/report.md")


def main() -> None:
    """Console entry point."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from modeconn.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    _run()


if __name__ == "__main__":
    main()
