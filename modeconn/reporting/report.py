"""``modeconn report RUN_DIR...``: tables across finished runs, mean and standard deviation of every
barrier per path over the runs that share a config but for the seed (for example a sweep of seeds).

Runs are grouped by their ``config.yaml`` minus ``seed`` and the keys that change no result (``progress``
...); each group gets its own table, headed by the keys in which the groups differ. Numbers of different
configs are never averaged together."""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path as FilePath

import numpy as np

COLUMNS = ("max", "epsilon", "chord", "mean", "midpoint", "length_weighted_mean")


def find_summaries(dirs: list[str]) -> list[FilePath]:
    """Every ``summary.json`` in or below the given run directories."""
    found: list[FilePath] = []
    for d in dirs:
        p = FilePath(d)
        if p.is_file() and p.name == "summary.json":
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("summary.json")))
        else:
            raise FileNotFoundError(f"no run directory or summary.json at {d}")
    return found


def aggregate(summaries: list[dict], metric: str = "train_loss") -> dict[str, dict[str, tuple[float, float, int]]]:
    """path -> barrier -> (mean, std, count) over runs."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        for name, p in s["paths"].items():
            b = p["barriers"].get(metric)
            if b is None:
                continue
            for col in COLUMNS:
                values[name][col].append(b[col])
            if p.get("bound") is not None:
                values[name]["bound"].append(p["bound"])
    return {name: {col: (float(np.mean(v)), float(np.std(v)), len(v)) for col, v in cols.items()}
            for name, cols in values.items()}


GROUP_IGNORED = ("seed",)  # besides runrecord.NOT_COMPARED: what a group of repeated runs may differ in


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def run_config(summary_file: FilePath) -> tuple[dict, object]:
    """(the run's result config as dotted keys without its seed, its seed); a run without ``config.yaml``
    is keyed by its directory, so it forms a group of its own."""
    from modeconn.io.runrecord import result_config

    config_file = summary_file.parent / "config.yaml"
    if not config_file.exists():
        return {"run": str(summary_file.parent)}, None
    from modeconn.io.jsonfile import read_yaml

    flat = _flatten(result_config(read_yaml(config_file, "run config")))
    seed = flat.pop("seed", None)
    return {k: v for k, v in flat.items() if k not in GROUP_IGNORED}, seed


def group_runs(files: list[FilePath]) -> list[tuple[dict, list[object], list[dict]]]:
    """[(the keys in which this group differs from the others, its seeds, its summaries)], in the order of
    ``files``; one group per config minus seed."""
    groups: dict[str, tuple[dict, list, list]] = {}
    for file in files:
        config, seed = run_config(file)
        key = json.dumps(config, sort_keys=True, default=str)
        groups.setdefault(key, (config, [], []))
        groups[key][1].append(seed)
        groups[key][2].append(_read(file))
    configs = [g[0] for g in groups.values()]
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
    return [({k: c.get(k) for k in differing}, seeds, summaries) for c, seeds, summaries in groups.values()]


def _read(file: FilePath) -> dict:
    """A run summary, of the shape this report reads (else a ValueError naming the file)."""
    from modeconn.io.jsonfile import Required, read_json
    from modeconn.io.runrecord import SUMMARY_SHAPE

    barrier = {str: (int, float), **{c: Required((int, float)) for c in COLUMNS}}
    return read_json(file, "run summary", {**SUMMARY_SHAPE, "paths": Required(
        {str: {"barriers": Required({str: barrier}), "bound": (int, float, type(None))}})})


def render_groups(groups: list[tuple[dict, list, list[dict]]], metric: str) -> str:
    """One table per group; with more than one group each is headed by its differing keys."""
    blocks = []
    for differing, seeds, summaries in groups:
        head = ", ".join(f"{k}={v}" for k, v in differing.items())
        seen = ", ".join(str(s) for s in seeds if s is not None)
        lines = [f"### {head}", ""] if head else []
        if seen:
            lines.append(f"seed(s) {seen}")
        lines.append(render(aggregate(summaries, metric), metric, len(summaries)))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render(table: dict, metric: str, runs: int) -> str:
    cols = (*COLUMNS, "bound")
    lines = [f"{runs} run(s); {metric}; mean ± std over runs", "",
             "| path | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, row in table.items():
        n = max(c[2] for c in row.values())
        cells = [f"{row[c][0]:.4f} ± {row[c][1]:.4f}" if c in row else "—" for c in cols]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one ``modeconn report: error:`` line and exit 2, as every other bad input."""

    def error(self, message: str):
        print(f"modeconn report: error: {message} (see modeconn report --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="modeconn report", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (searched recursively for summary.json)")
    parser.add_argument("--metric", default="train_loss",
                        choices=["train_loss", "train_error", "test_loss", "test_error"])
    parser.add_argument("--figures", metavar="OUT_DIR", default=None,
                        help="also redraw the runs' figures (paths.png, figure2.png) pooled over the runs into OUT_DIR")
    args = parser.parse_args(argv)
    try:
        files = find_summaries(args.runs)
        groups = group_runs(files)
    except (FileNotFoundError, ValueError) as e:
        print(f"modeconn report: error: {e}", file=sys.stderr)
        return 2
    if not files:
        print("modeconn report: no finished runs (summary.json) found", file=sys.stderr)
        return 1
    print(render_groups(groups, args.metric))
    if args.figures is not None:
        from modeconn.reporting.figures import redraw

        try:
            written = redraw(args.runs, args.figures)
        except (OSError, ValueError) as e:  # a damaged run file (named), or an unwritable OUT_DIR
            print(f"modeconn report: error: {e}", file=sys.stderr)
            return 2
        for file in written:
            print(f"wrote {file}")
    return 0
