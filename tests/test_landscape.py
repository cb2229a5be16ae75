"""The landscape of many minima: minimax barriers against brute force, the engines on hand-made cases, the
JSON schema, the exploration's resume, the pictures, and the ``modeconn landscape`` command."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from modeconn.landscape import Landscape, explore
from modeconn.landscape import edges as edges_module
from modeconn.landscape.engines import ENGINES, propose
from modeconn.landscape.plots import _edge_matrix
from modeconn.landscape.report import write_report
from modeconn.models import build
from modeconn.params.path import float_state
from conftest import requires
from nets import train_full_batch


def hand_made(losses: dict, weights: dict) -> Landscape:
    return Landscape.from_edges(list(losses), losses, [{"a": a, "b": b, "max_loss": w} for (a, b), w in weights.items()])


def brute_force_minimax(ls: Landscape) -> np.ndarray:
    """Over every simple path of the graph: the lowest possible highest edge."""
    n = len(ls.names)
    out = np.full((n, n), np.inf)
    for i, a in enumerate(ls.names):
        out[i, i] = ls.losses[a]
        for j, b in enumerate(ls.names):
            if i != j:
                for p in nx.all_simple_paths(ls.graph, a, b):
                    out[i, j] = min(out[i, j], max(ls.graph.edges[u, v]["max_loss"] for u, v in zip(p, p[1:])))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_minimax_equals_a_brute_force_minimax_over_all_paths(seed):
    rng = np.random.default_rng(seed)
    names = [f"m{i}" for i in range(7)]
    losses = {n: float(rng.uniform(0, 0.1)) for n in names}
    pairs = [p for p in itertools.combinations(names[:6], 2) if rng.random() < 0.6]  # m6 stays alone
    weights = {(a, b): max(losses[a], losses[b]) + float(rng.uniform(0, 1)) for a, b in pairs}
    ls = hand_made(losses, weights)
    expected = brute_force_minimax(ls)
    assert np.array_equal(np.isinf(ls.minimax), np.isinf(expected))
    np.testing.assert_allclose(ls.minimax[np.isfinite(expected)], expected[np.isfinite(expected)], rtol=0, atol=0)
    np.testing.assert_allclose(np.diag(ls.minimax_barrier), 0.0)
    # the dendrogram's single linkage merges at exactly the MST's edge heights
    connected = Landscape.from_edges(names[:6], {n: losses[n] for n in names[:6]},
                                     [e for e in ls.edge_records() if e["b"] != "m6"])
    if nx.is_connected(connected.graph):
        heights = linkage(squareform(_edge_matrix(connected)[0], checks=False), method="single")[:, 2]
        mst = sorted(d["max_loss"] for _, _, d in connected.mst.edges(data=True))
        np.testing.assert_allclose(sorted(heights), mst)


def test_the_minimax_of_a_small_hand_made_graph():
    # a -0.5- b -0.9- c, a -0.7- c: the MST drops b-c, so the b..c barrier is max(0.5, 0.7) = 0.7
    ls = hand_made({"a": 0.1, "b": 0.2, "c": 0.3}, {("a", "b"): 0.5, ("b", "c"): 0.9, ("a", "c"): 0.7})
    np.testing.assert_allclose(ls.minimax, [[0.1, 0.5, 0.7], [0.5, 0.2, 0.7], [0.7, 0.7, 0.3]])
    np.testing.assert_allclose(ls.minimax_barrier[1, 2], 0.7 - 0.3)
    assert ls.worst_mst_edge()["a"] == "a" and ls.worst_mst_edge()["b"] == "c"
    assert ls.components(0.35) == [["a", "b"], ["c"]] and ls.components(0.4) == [["a", "b", "c"]]
    assert ls.components(0.55, key="max_loss") == [["a", "b"], ["c"]]


def test_the_mst_engine_cuts_the_highest_edge_and_proposes_the_lowest_untried_pair():
    # chain a - b - c - d with the highest edge b-c: the cut is {a, b} | {c, d}; lowest minima first:
    # the side holding the lowest minimum (b, 0.01) first, then each side by loss: b-d (0.02) before b-c
    losses = {"a": 0.05, "b": 0.01, "c": 0.04, "d": 0.02}
    ls = hand_made(losses, {("a", "b"): 0.2, ("b", "c"): 0.9, ("c", "d"): 0.3})
    tried = {frozenset(p) for p in [("a", "b"), ("b", "c"), ("c", "d")]}
    assert propose(ls, ["unfinished", "disconnected", "mst"], tried, []) == ("mst", [("b", "d")])
    tried.add(frozenset(("b", "d")))
    assert ENGINES["mst"](ls, tried, []) == [("a", "d")]
    # then a-c, the last untried pair across b-c's cut; after it every pair is tried and mst has nothing left
    tried.add(frozenset(("a", "d")))
    assert ENGINES["mst"](ls, tried, []) == [("a", "c")]
    tried.add(frozenset(("a", "c")))
    assert ENGINES["mst"](ls, tried, []) == []
    # all: lowest minima first (b 0.01, d 0.02, c 0.04, a 0.05)
    assert ENGINES["all"](ls, {frozenset(("a", "b"))}, []) == [("b", "d"), ("b", "c"), ("c", "d"), ("a", "d"),
                                                               ("a", "c")]


def test_the_disconnected_and_unfinished_engines():
    losses = {"a": 0.3, "b": 0.1, "c": 0.2, "d": 0.05, "e": 0.4}
    ls = hand_made(losses, {("a", "b"): 0.5, ("c", "e"): 0.6})
    # components {a, b}, {c, e}, {d}: the lowest minimum d joins the lowest of every other component
    assert propose(ls, ["unfinished", "disconnected", "mst"], set(), []) == ("disconnected", [("b", "d"), ("c", "d")])
    assert propose(ls, ["unfinished", "disconnected"], set(), [("e", "a")]) == ("unfinished", [("a", "e")])
    whole = hand_made(losses, {("a", "b"): 0.5, ("b", "c"): 0.6, ("c", "d"): 0.3, ("d", "e"): 0.5})
    assert ENGINES["disconnected"](whole, set(), []) == []


def test_the_json_round_trips_and_bad_json_names_the_problem():
    ls = hand_made({"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.0}, {("a", "b"): 0.5, ("b", "c"): 0.9, ("a", "c"): 0.7})
    ls.info["note"] = "x"
    text = ls.to_json()
    doc = json.loads(text)  # plain JSON: no NaN/Infinity tokens, the disconnected d is null in the matrix
    assert doc["schema"] == "modeconn.landscape/1" and doc["minimax"][0][3] is None
    assert doc["mst"] == [["a", "b"], ["a", "c"]]
    back = Landscape.from_json(text)
    assert back.names == ls.names and back.losses == ls.losses and back.info == ls.info
    assert back.edge_records() == ls.edge_records() and back.to_json() == text
    np.testing.assert_array_equal(back.minimax, ls.minimax)
    with pytest.raises(ValueError, match="schema"):
        Landscape.from_json(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="max_loss"):
        Landscape.from_json(text.replace('"max_loss": 0.5', '"max_loss": null'))
    with pytest.raises(ValueError, match="distinct minima"):
        Landscape.from_edges(["a", "b"], {"a": 0, "b": 0}, [{"a": "a", "b": "z", "max_loss": 1.0}])


# ------------------------------------------------------------------------------------- exploration

@pytest.fixture(scope="module")
def minima(flat):
    """Four small MLPs trained from different seeds on the same digits."""
    make = lambda: build("mlp", (64,), 10, hidden=(16,))  # noqa: E731
    nets = {f"s{i}": train_full_batch(make, flat, seed=i, steps=40) for i in range(4)}
    return make().to(flat[0].device), {k: float_state(m.state_dict()) for k, m in nets.items()}


def _result(folder):
    doc = json.loads((folder / "landscape.json").read_text())
    return doc["edges"], doc["losses"], json.loads((folder / "plan.json").read_text())["rounds"]


def test_a_resumed_exploration_equals_an_uninterrupted_one(minima, flat, tmp_path, monkeypatch):
    model, thetas = minima
    kw = dict(constructor="linear", num_points=7, progress=False, device=flat[0].device)
    whole = explore(model, thetas, flat, out_dir=tmp_path / "whole", **kw)
    assert whole.graph.number_of_edges() == 6  # mst goes on until every pair is tried
    part = tmp_path / "part"
    first = explore(model, thetas, flat, out_dir=part, max_pairs=2, **kw)  # stopped by the budget mid-round
    assert first.graph.number_of_edges() == 2
    stamps = {f: f.stat().st_mtime_ns for f in part.glob("pairs/*/summary.json")}
    calls = {"n": 0}
    real = edges_module.evaluate_path

    def killed_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a job killed mid-pair: its folder exists, with no summary.json
        return real(*args, **kwargs)

    monkeypatch.setattr(edges_module, "evaluate_path", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        explore(model, thetas, flat, out_dir=part, **kw)
    assert len(list(part.glob("pairs/*/summary.json"))) == 3 and len(list(part.glob("pairs/*"))) == 4
    monkeypatch.setattr(edges_module, "evaluate_path", real)
    resumed = explore(model, thetas, flat, out_dir=part, **kw)
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # finished pairs were not redone
    assert _result(part) == _result(tmp_path / "whole")
    np.testing.assert_array_equal(resumed.minimax, whole.minimax)
    with pytest.raises(ValueError, match="num_points"):
        explore(model, thetas, flat, out_dir=part, **{**kw, "num_points": 9})


def test_a_curve_constructor_fills_the_edges_and_the_report_draws_them(minima, flat, tmp_path):
    model, thetas = minima
    three = {k: thetas[k] for k in ("s0", "s1", "s2")}
    ls = explore(model, three, flat, constructor="bezier", options={"epochs": 1, "batch_size": 128},
                 num_points=7, progress=False, out_dir=tmp_path, engines=["all"], device=flat[0].device)
    assert ls.path == "bezier" and ls.graph.number_of_edges() == 3
    for e in ls.edge_records():
        profile = edges_module.load_profile(tmp_path, e)
        assert profile.info.get("kind", "bezier") == "bezier"
        assert e["max_loss"] == pytest.approx(max(profile.metrics["train_loss"]))
        assert e["barrier"] == pytest.approx(e["max_loss"] - max(ls.losses[e["a"]], ls.losses[e["b"]]), abs=1e-5)
    report = write_report(tmp_path, ["# test"], threshold=0.05).read_text()
    assert "| s0 | 0.0000 |" in report and "Worst MST edge" in report
    for name in ("disconnectivity_bezier.png", "connectivity_bezier.png", "profiles.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_bad_names_and_constructors_are_refused_before_any_work(minima, flat, tmp_path):
    model, thetas = minima
    with pytest.raises(ValueError, match="names of minima"):
        explore(model, {"a/b": thetas["s0"], "c": thetas["s1"]}, flat, constructor="linear", out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="engines"):
        explore(model, thetas, flat, constructor="linear", engines=["best"], out_dir=tmp_path / "y", progress=False)


# -------------------------------------------------------------------------------------------- CLI

TINY = ["minima=3", "model.hidden=[16]", "trainer.epochs=2", "eval.num_points=5", "progress=false", "path=[linear]",
        "threads=1"]


def cli(*args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "modeconn.run.cli", "landscape", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_cli_refuses_bad_landscape_options_in_one_line(tmp_path, capsys, monkeypatch):
    from modeconn.run.cli import main

    for arg, words in (("engines=[foo]", "landscape.engines"), ("minima=1", "landscape.minima"),
                       ("landscape.bogus=1", "landscape: unknown option"), ("-m", "drop -m"),
                       (f"endpoints=[{tmp_path}/none.pt,{tmp_path}/b.pt]", "none.pt"),
                       ("threshold=inf", "landscape.threshold"), ("endpoints=5", "endpoints"),
                       ("minima=1000000000000", "landscape.minima=1000000000000 would need about"),
                       ("eval.num_points=1000000000", "eval.num_points")):
        monkeypatch.setattr(sys, "argv", ["modeconn", "landscape", arg, f"hydra.run.dir={tmp_path}/r"])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def _tree(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def _in_process(args, capsys, monkeypatch, cwd):
    from modeconn.run.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["modeconn", "landscape", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    return exit_.value.code, err


def test_a_landscape_directory_has_one_driver_and_its_minima_one_config(tmp_path, capsys, monkeypatch):
    """A second driver in a locked landscape directory exits 2 naming the holder; minima trained under another
    model option (found before any plan was written) are refused by name, and nothing is written."""
    from modeconn.run.lock import run_lock

    out = tmp_path / "ls"
    args = [*TINY, "minima=2", "data=synthetic", "trainer.epochs=1", f"hydra.run.dir={out}"]
    with run_lock(out):
        code, err = _in_process(args, capsys, monkeypatch, tmp_path)
    assert code == 2 and f"in use by process {os.getpid()}" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    from modeconn.run.landscape import compose_config, driver_overrides, pair_config, train_minima, trained_minima
    from modeconn.run.pipeline import load_data
    from modeconn.run.preflight import endpoint_identity

    cfg = pair_config(compose_config(driver_overrides(args)))  # minima of model.dropout=0.5, as an interrupted
    data = load_data(cfg, torch.device("cpu"))                  # landscape leaves them (no plan.json yet)
    train_minima(cfg, data, trained_minima(cfg, out, 2), torch.device("cpu"),
                 endpoint_identity(cfg, data, torch.device("cpu")))
    before = _tree(out)
    code, err = _in_process([*args, "model.dropout=0.3"], capsys, monkeypatch, tmp_path)
    assert code == 2 and "model.dropout" in err and "seed0.pt" in err and len(err.strip().splitlines()) == 1, err
    assert _tree(out) == before


@pytest.mark.slow  # three tiny minima, three pairs as Hydra jobs in subprocesses: about 25 s
def test_the_cli_runs_pairs_as_jobs_and_a_rerun_redoes_nothing(tmp_path):
    out = tmp_path / "ls"
    first = cli(*TINY, f"hydra.run.dir={out}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    pairs = sorted(p.name for p in (out / "pairs").iterdir() if p.is_dir())
    assert pairs == ["seed0__seed1", "seed0__seed2", "seed1__seed2"]
    doc = json.loads((out / "landscape.json").read_text())
    assert len(doc["edges"]) == 3 and len(doc["mst"]) == 2
    for pair in pairs:  # each pair is an ordinary run between its two minima
        summary = json.loads((out / "pairs" / pair / "summary.json").read_text())
        a, b = pair.split("__")
        assert [os.path.basename(e["file"]) for e in summary["endpoints"]] == [f"{a}.pt", f"{b}.pt"]
    stamps = {f: f.stat().st_mtime_ns for f in out.glob("pairs/*/*.json")}
    finished = _tree(out)
    again = cli(*TINY, f"hydra.run.dir={out}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stdout and _tree(out) == finished  # a finished landscape is not touched
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps
    before = _tree(out)
    other = cli(*TINY, "trainer.epochs=3", f"hydra.run.dir={out}", cwd=tmp_path)
    assert other.returncode == 2 and "run.trainer.epochs" in other.stderr
    assert _tree(out) == before  # a refused rerun changes no byte of the landscape directory
    assert "| seed0 |" in (out / "report.md").read_text()
    moved = tmp_path / "moved"  # the minima's files are recorded relative to the directory: a copy carries on
    out.rename(moved)
    again = cli(*TINY, f"hydra.run.dir={moved}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(moved.joinpath(f.relative_to(out)).stat().st_mtime_ns == t for f, t in stamps.items())  # not redone


@pytest.mark.parametrize("file, content, words", [
    ("plan.json", "[1]", ["plan.json", "not an object"]),
    ("plan.json", "[" * 100_000 + "]" * 100_000, ["plan.json", "nested too deeply"]),
    ("plan.json", '{"settings": {}, "rounds": [{"pairs": 5}]}', ["plan.json", "rounds[0].pairs"]),
    ("minima.json", '{"names": ["seed0"], "losses": 5}', ["minima.json", "losses"]),
])
def test_malformed_landscape_files_are_one_line_and_change_nothing(file, content, words, tmp_path, capsys,
                                                                    monkeypatch):
    out = tmp_path / "ls"
    out.mkdir()
    (out / file).write_text(content)
    before = _tree(out)
    code, err = _in_process([*TINY, "minima=2", "data=synthetic", "trainer.epochs=1", f"hydra.run.dir={out}"],
                            capsys, monkeypatch, tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert _tree(out) == before


@requires("hydra_plugins.hydra_joblib_launcher", extra="launchers")
@pytest.mark.slow
def test_the_cli_runs_pairs_through_the_joblib_launcher(tmp_path):
    out = tmp_path / "ls"
    done = cli(*TINY, "hydra/launcher=local", "hydra.launcher.n_jobs=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads((out / "landscape.json").read_text())["edges"]) == 3
    assert "Joblib" in done.stdout + done.stderr
