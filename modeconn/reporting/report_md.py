"""A run's ``report.md``: the endpoints, one row per path with its barriers and bound, endpoint stability,
alignment, and every path's certificate (:class:`~modeconn.params.certificate.Certificate`) as data rendered
into words."""
from __future__ import annotations

from modeconn.io import runrecord
from modeconn.align.step import report_lines as alignment_report
from modeconn.evaluation.evaluate import PathEval
from modeconn.params.certificate import Bound, Certificate

__all__ = ["render_report", "certificate", "certificate_lines"]


def render_report(summary: dict, evals: list[PathEval]) -> str:
    """A short Markdown report: the endpoints, then one row per path with its barriers and bound."""
    lines = [f"# modeconn run: {summary['name']}", "", f"Data: {summary['data']}. Device: {summary['device']}.", "",
             *([f"Numbers depend on: {runrecord.describe(summary['provenance'])}.", ""] if summary.get("provenance") else []),
             "## Endpoints", "", "| seed | train loss | train acc | test loss | test acc |", "|---|---|---|---|---|"]
    for e in summary["endpoints"]:
        m = e["metrics"]
        lines.append(f"| {e['seed']} | {m.get('train_loss', float('nan')):.4f} | {m.get('train_acc', float('nan')):.4f} "
                     f"| {m.get('test_loss', float('nan')):.4f} | {m.get('test_acc', float('nan')):.4f} |")
    lines += ["", "## Paths (train loss unless noted)", "",
              "| path | segments | max loss | epsilon barrier | chord | mean | midpoint | argmax t | bound | max <= bound | max test error |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ev in evals:
        b = ev.barriers["train_loss"]
        bound = "—" if ev.bound is None else f"{ev.bound:.4f}"
        ok = "—" if ev.within_bound is None else ("yes" if ev.within_bound else "NO")
        test_err = ev.barriers.get("test_error", {}).get("max", float("nan"))
        lines.append(f"| {ev.name} | {len(ev.knots) - 1} | {b['max']:.4f} | {b['epsilon']:.4f} | {b['chord']:.4f} | "
                     f"{b['mean']:.4f} | {b['midpoint']:.4f} | {b['argmax_t']:.3f} | {bound} | {ok} | {test_err:.4f} |")
    if summary.get("stability"):
        lines += ["", "## Endpoint stability", ""]
        for name, rows in summary["stability"]["dropout"].items():
            if not rows:
                continue
            cells = ", ".join(f"keep {r['keep']:.2f}: {r['loss_all_dropped']:.4f}" for r in rows)
            lines.append(f"- {name}, loss of the best dropout subnetwork (all hidden layers): {cells}")
        for name, ns in summary["stability"]["noise"].items():
            verdict = {True: "holds", False: "fails", None: "reported only"}
            held = ", ".join(f"{k} {verdict[v.get('holds')]}" for k, v in ns["conditions"].items()
                             if isinstance(v, dict) and "holds" in v)
            infinite = ns["conditions"].get("activation_contraction", {}).get("infinite_points")
            if infinite:
                held += f"; c infinite at data points {infinite[:10]}{' ...' if len(infinite) > 10 else ''}"
            lines.append(f"- {name}, noise stability: Definition 4 epsilon {ns['epsilon']:.4g} ({held}); "
                         f"histograms in noise_stability_{name}.png")
    lines += alignment_report(summary)
    certificates = [line for ev in evals for line in certificate(ev)]
    if certificates:
        lines += ["", "## Certificates (train loss on the constructors' data)", "", *certificates]
    lines += ["", "![paths](paths.png)", "", f"Wall time: {summary['seconds']:.1f} s.", ""]
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:.4f}"


def _terms(bound: Bound) -> str:
    return f" ({', '.join(f'{k} {_num(v)}' for k, v in bound.terms.items())})" if bound.terms else ""


def certificate_lines(name: str, cert: Certificate, measured_max: float) -> list[str]:
    """A path's certificate as one Markdown bullet: every bound (exact ones with their value, terms and
    the constructor's measurement), the measured pieces no bound covers, and the evaluation's maximum
    against the whole-path bound."""
    parts = []
    for b in cert.bounds:
        if not b.exact:
            parts.append(f"{b.covers}: {b.formula}")
            continue
        text = f"{b.covers}: {b.formula} = {_num(b.value)}{_terms(b)}"
        if b.measured is not None and not b.covers_all(cert.num_segments):
            text += f", measured {_num(b.measured)}"
        if b.covers_all(cert.num_segments):
            verdict = "holds" if measured_max <= b.value + 1e-5 else "VIOLATED"
            text += f"; measured max {_num(measured_max)}: {verdict}"
        parts.append(text)
    parts += [f"{k} measured {_num(v)}" for k, v in cert.measured.items()]
    if cert.path_bound is None:
        parts.append(f"whole path measured max {_num(measured_max)}")
    return [f"- **{name}** ({cert.construction}, {cert.items} points): " + "; ".join(parts) + "."]


def certificate(ev: PathEval) -> list[str]:
    """What a constructed path guarantees beside what was measured, as Markdown bullets (none without a
    certificate)."""
    if "certificate" not in ev.info:
        return []
    return certificate_lines(ev.name, Certificate.from_dict(ev.info["certificate"]), ev.barriers["train_loss"]["max"])
