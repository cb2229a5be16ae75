"""The run's alignment step: ``align=none|weights|activations|auto`` and ``align.repair``.

theta_B is aligned once; every selected path is then built twice (or three times), from the endpoints as
trained (row ``<path>``), to the aligned theta_B (``<path> (aligned)``) and, with ``repair: true``, with
REPAIR on top (``<path> (aligned+REPAIR)``; ``<path> (REPAIR)`` when nothing is aligned). On a network whose
REPAIR sites are all BatchNorms the REPAIR rows are skipped with a one-line notice (see ``only_batchnorm``).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

from modeconn.align.activations import activation_matching
from modeconn.align.alignment import Alignment
from modeconn.align.auto import auto_matching
from modeconn.align.repair import only_batchnorm, repair
from modeconn.align.weights import weight_matching
from modeconn.data import example_input

log = logging.getLogger("modeconn")

METHODS = ("none", "weights", "activations", "auto")
OPTIONS = {"method": None, "repair": False, "max_iter": 100, "max_items": 2048}


def check_options(options: Mapping | None) -> dict:
    """The ``align`` config with defaults filled in; raises ``ValueError`` naming a bad key."""
    opts = {**OPTIONS, "method": "none", **dict(options or {})}
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"align has unknown option(s) {unknown}; allowed: {', '.join(OPTIONS)}")
    if opts["method"] not in METHODS:
        raise ValueError(f"align must be one of {', '.join(METHODS)} (align=weights); got {opts['method']!r}")
    if not isinstance(opts["repair"], bool):
        raise ValueError(f"align.repair must be true or false; got {opts['repair']!r}")
    for key in ("max_iter", "max_items"):
        v = opts[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"align.{key} must be a positive integer; got {v!r}")
    return opts


def align_endpoints(options: Mapping | None, ctx) -> Alignment | None:
    """Align the run's theta_B to theta_A as configured (``None`` for ``align=none``)."""
    opts = check_options(options)
    if opts["method"] == "weights":
        al = weight_matching(ctx.model, ctx.theta_a, ctx.theta_b, example_input=example_input(ctx.data).to(ctx.device),
                             max_iter=opts["max_iter"], seed=ctx.seed, device=ctx.device)
    elif opts["method"] == "activations":
        al = activation_matching(ctx.model, ctx.theta_a, ctx.theta_b, ctx.data, max_items=opts["max_items"])
    elif opts["method"] == "auto":  # both matchers; the lower midpoint loss wins
        al = auto_matching(ctx.model, ctx.theta_a, ctx.theta_b, ctx.data, max_iter=opts["max_iter"],
                           max_items=opts["max_items"], seed=ctx.seed, device=ctx.device)
        log.info("%s", _auto_sentence(al.summary()).strip())
    else:
        return None
    log.info("alignment (%s): objective %.6g -> %.6g, %d of %d units moved, %.1f s", al.method, al.objective[0],
             al.objective[-1], sum(al.moved.values()), sum(len(p) for p in al.perms.values()), al.seconds)
    return al


def path_variants(paths: Iterable, ctx, options: Mapping | None, alignment: Alignment | None) -> Iterator[tuple]:
    """``(name, options, label, context, finish)`` for every configured path and each of its variants:
    build path ``name`` in ``context``, pass it through ``finish`` and report it as ``label``."""
    opts = check_options(options)
    if opts["repair"] and only_batchnorm(ctx.model, example_input(ctx.data).to(ctx.device)):
        log.warning("align.repair skipped: every unit REPAIR would correct feeds a BatchNorm, whose statistics the "
                    "evaluator recomputes at every point; REPAIR would change only the BatchNorm affine parameters "
                    "(on the straight line by about BatchNorm's eps) and double the evaluation time")
        opts["repair"] = False
    keep: Callable = lambda path: path  # noqa: E731
    fix: Callable = lambda path: repair(path, ctx.model, ctx.data, max_items=opts["max_items"])  # noqa: E731
    for name, path_options in paths:
        yield name, path_options, name, ctx, keep
        target = ctx
        if alignment is not None:
            target = dataclasses.replace(ctx, theta_b={k: v for k, v in alignment.theta.items() if k in ctx.theta_b},
                                         work_dir=ctx.work_dir / "aligned")
            target.work_dir.mkdir(parents=True, exist_ok=True)
            yield name, path_options, f"{name} (aligned)", target, keep
        if opts["repair"]:
            yield name, path_options, f"{name} ({'aligned+' if alignment is not None else ''}REPAIR)", target, fix


def report_lines(summary: Mapping) -> list[str]:
    """The report's alignment paragraph (empty without alignment)."""
    al = summary.get("alignment")
    if not al:
        return []
    what = {"weights": "weight matching (summed inner products of the weights)",
            "activations": "activation matching (summed correlations of matched units)"}[al["method"]]
    sweeps = f" over {al['sweeps']} sweep(s)" if "sweeps" in al else ""
    return ["", "## Alignment", "",
            f"theta_B permuted into theta_A's unit order by {what}: objective {al['objective'][0]:.6g} -> "
            f"{al['objective'][-1]:.6g}{sweeps}; {al['units_moved']} of {al['units']} units in {al['groups']} "
            f"groups moved; {100 * al['fraction_permuted']:.1f}% of the parameter entries have every unit axis permuted; "
            f"{al['seconds']:.2f} s. Rows \"(aligned)\" run to the aligned theta_B (same function as theta_B)."
            + _auto_sentence(al)]


def _auto_sentence(al: Mapping) -> str:
    """align=auto's comparison, for the report (empty for a plain method)."""
    if not al.get("auto"):
        return ""
    if "midpoint_loss_activations" not in al:
        return " align=auto: no data, so only weight matching ran."
    return (f" align=auto ran both matchers and kept {al['kept']} matching, the lower midpoint (t = 0.5) train "
            f"loss of the aligned line: weight matching {al['midpoint_loss_weights']:.4f}, activation matching "
            f"{al['midpoint_loss_activations']:.4f} (naive line {al['midpoint_loss_naive']:.4f}).")
