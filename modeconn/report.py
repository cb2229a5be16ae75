"""``modeconn report RUN_DIR...``: a table across finished runs, mean and standard deviation of every
barrier per path (for example over a sweep of seeds)."""
from __future__ import annotations

import argparse
import json
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


def render(table: dict, metric: str, runs: int) -> str:
    cols = (*COLUMNS, "bound")
    lines = [f"{runs} run(s); {metric}; mean ± std over runs", "",
             "| path | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, row in table.items():
        n = max(c[2] for c in row.values())
        cells = [f"{row[c][0]:.4f} ± {row[c][1]:.4f}" if c in row else "—" for c in cols]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modeconn report", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (searched recursively for summary.json)")
    parser.add_argument("--metric", default="train_loss",
                        choices=["train_loss", "train_error", "test_loss", "test_error"])
    parser.add_argument("--figures", metavar="OUT_DIR", default=None,
                        help="also redraw the runs' figures (paths.png, figure2.png) pooled over the runs into OUT_DIR")
    args = parser.parse_args(argv)
    try:
        files = find_summaries(args.runs)
    except FileNotFoundError as e:
        print(f"modeconn report: error: {e}")
        return 2
    if not files:
        print("modeconn report: no finished runs (summary.json) found")
        return 1
    summaries = [json.loads(f.read_text()) for f in files]
    print(render(aggregate(summaries, args.metric), args.metric, len(summaries)))
    if args.figures is not None:
        from modeconn.figures import redraw

        for file in redraw(args.runs, args.figures):
            print(f"wrote {file}")
    return 0
