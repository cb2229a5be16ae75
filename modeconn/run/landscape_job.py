"""One pair of a landscape as an ordinary run: the Hydra app that ``modeconn landscape`` launches as a multirun
(``+pair=a__b,c__d`` over the launcher, ``hydra.sweep.subdir=${pair}``), one job per pair.

The job reads the two minima's files from ``<landscape_dir>/minima.json``, drops the landscape's own keys
and runs :func:`modeconn.run.pipeline.run` with ``endpoints=[a, b]`` into ``pairs/<a>__<b>/``: resumable,
and a finished pair is returned untouched. Exit codes as the ``modeconn`` command's.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from modeconn.io.runrecord import endpoint_file
from modeconn.landscape.explore import read_minima
from modeconn.run import cli

JOB_KEYS = ("pair", "landscape_dir", "landscape")


def pair_run_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without the landscape's keys, with ``endpoints`` set to the pair's two minima."""
    folder = Path(str(cfg.landscape_dir))
    files = read_minima(folder)["files"]  # relative to the landscape's directory when inside it
    a, b = str(cfg.pair).split("__")
    files = {n: str(endpoint_file(folder, f)) for n, f in files.items()}
    out = cfg.copy()
    with open_dict(out):
        for key in JOB_KEYS:
            out.pop(key, None)
        out.endpoints = [files[a], files[b]]
    return out


@hydra.main(version_base="1.3", config_path=cli.CONF_DIR, config_name="config")
def _job(cfg: DictConfig) -> None:
    from modeconn.io.heap import keep_freed_memory
    from modeconn.run.pipeline import run

    keep_freed_memory()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        pair_cfg = pair_run_config(cfg)
        run(pair_cfg, out_dir, only=cli.selected_paths(cli._task_overrides()),
            record=lambda: cli._write_hydra_record(pair_cfg))
    except Exception as e:  # noqa: BLE001 - bad input (exit 2) vs bugs (re-raised), as the modeconn command
        if not cli._is_user_error(e):
            raise
        cli._remove_if_empty(out_dir)
        sys.exit(cli._fail(e))


def main() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _job()
    except KeyboardInterrupt:
        print(cli.INTERRUPTED, file=sys.stderr)
        sys.exit(cli.EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
