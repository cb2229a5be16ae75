"""``report.md`` of a landscape: per constructor the minimax barrier matrix, the measured edges, the worst
MST edge and the components within a barrier threshold; and the pictures of :mod:`modeconn.landscape.plots`."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path as FilePath

from modeconn.io.checkpoint import atomic_write_bytes
from modeconn.io.jsonfile import UnreadableFileError, read_json
from modeconn.landscape.edges import load_profile
from modeconn.landscape.graph import Landscape
from modeconn.landscape.plots import plot_connectivity, plot_disconnectivity, plot_profiles


def _num(x: float) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.4f}"


def basin_sentence(ls: Landscape, threshold: float) -> str:
    """Whether every minimum is within ``threshold`` of its partner's loss along the measured paths."""
    comps = ls.components(threshold)
    if len(comps) == 1:
        return (f"all {len(ls.names)} minima fall in one basin: every pair is joined by a chain of measured paths "
                f"whose max-endpoint barriers are at most {threshold:g}")
    parts = "; ".join("{" + ", ".join(c) + "}" for c in comps)
    return f"{len(comps)} components with max-endpoint barriers at most {threshold:g}: {parts}"


def landscape_section(ls: Landscape, label: str, threshold: float) -> list[str]:
    names, mm = ls.names, ls.minimax_barrier
    lines = [f"## {label}", "", "Minimax barrier matrix: the highest MST edge (max train loss) on the MST path between "
             "two minima, minus the higher of their own losses; an upper bound on the lowest barrier between them.",
             "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, a in enumerate(names):
        lines.append(f"| {a} | " + " | ".join(_num(mm[i, j]) for j in range(len(names))) + " |")
    lines += ["", "| pair | max train loss | max-endpoint barrier | t at saddle | on MST |", "|---|---|---|---|---|"]
    tree = ls.mst
    for e in ls.edge_records():
        lines.append(f"| {e['a']}–{e['b']} | {_num(e['max_loss'])} | {_num(e['barrier'])} | "
                     f"{_num(e['t_saddle'])} | {'yes' if tree.has_edge(e['a'], e['b']) else ''} |")
    worst = ls.worst_mst_edge()
    if worst is not None:
        lines += ["", f"Worst MST edge: {worst['a']}–{worst['b']}, max train loss {_num(worst['max_loss'])}, "
                      f"barrier {_num(worst['barrier'])} (path {worst['path']})."]
    lines += ["", basin_sentence(ls, threshold) + ".", ""]
    return lines


def render(landscapes: Mapping[str, Landscape], header: Sequence[str], threshold: float) -> str:
    """The markdown: ``header`` lines, the minima's losses, then one section per landscape."""
    first = next(iter(landscapes.values()))
    lines = [*header, "", "| minimum | train loss |", "|---|---|"]
    lines += [f"| {n} | {_num(first.losses[n])} |" for n in first.names]
    lines.append("")
    for label, ls in landscapes.items():
        lines += landscape_section(ls, label, threshold)
    return "\n".join(lines)


def write_figures(out_dir: FilePath, landscapes: Mapping[str, Landscape], threshold: float) -> list[FilePath]:
    """``disconnectivity_<label>.png`` and ``connectivity_<label>.png`` for every landscape and one
    ``profiles.png`` with every constructor's edges; returns the files."""
    out_dir = FilePath(out_dir)
    files = []
    profiles = {}
    for label, ls in landscapes.items():
        slug = "".join(c if c.isalnum() else "_" for c in label)
        files.append(plot_disconnectivity(ls, out_dir / f"disconnectivity_{slug}.png", threshold=threshold,
                                          title=f"disconnectivity graph: {label}"))
        files.append(plot_connectivity(ls, out_dir / f"connectivity_{slug}.png", title=f"connectivity graph: {label}"))
        if ls.path is not None:
            tree = ls.mst
            profiles[label] = [(f"{e['a']}–{e['b']}", load_profile(out_dir, e), tree.has_edge(e["a"], e["b"]))
                               for e in ls.edge_records()]
    if profiles:
        files.append(plot_profiles(profiles, out_dir / "profiles.png"))
    return files


def _read(file: FilePath) -> Landscape:
    """A landscape JSON file (:meth:`Landscape.to_json`); one error naming the file when it is damaged."""
    try:
        return Landscape.from_doc(read_json(file, "landscape file", hint="delete it; a rerun writes it again"))
    except UnreadableFileError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise UnreadableFileError(f"landscape file {file} has the wrong shape ({e}); delete it; a rerun writes it "
                                  "again") from None


def read_landscapes(out_dir: str | FilePath) -> dict[str, Landscape]:
    """The landscapes an exploration wrote: ``"best path per pair"`` (when there are several constructors)
    and one per constructor label."""
    out_dir = FilePath(out_dir)
    out = {}
    per_label = {f.stem: _read(f) for f in sorted((out_dir / "landscapes").glob("*.json"))}
    if len(per_label) != 1:
        out["best path per pair"] = _read(out_dir / "landscape.json")
    return {**out, **dict(sorted(per_label.items(), key=lambda kv: kv[0] != "linear"))}


def write_report(out_dir: str | FilePath, header: Sequence[str], threshold: float = 0.05) -> FilePath:
    """``report.md`` and the figures of the exploration in ``out_dir``; returns the report's path."""
    out_dir = FilePath(out_dir)
    landscapes = read_landscapes(out_dir)
    figures = write_figures(out_dir, landscapes, threshold)
    pictures = ["", *(f"![{f.stem}]({f.name})" for f in figures)]
    return atomic_write_bytes(out_dir / "report.md", render(landscapes, [*header, *pictures], threshold).encode())
