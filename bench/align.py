"""Benchmark: weight matching of full-width VGG-16 and PreResNet-164 (CIFAR-sized, random weights).

Two independently initialised networks of each architecture (BatchNorm statistics drawn at random too)
are aligned by ``modeconn.align.weight_matching`` with sweeps to convergence. Reported per model: the
unit spec's inference time, matching seconds, sweeps, and where the time goes: the cost matrices
(``A @ B^T`` over every tensor a group touches, on ``--device``) versus the linear assignments (scipy, CPU),
with the rest (moving tensors, applying permutations) as the remainder; "CPU s" is the process's CPU time
(on a shared machine the wall time also counts other people's work; CPU s / threads is the unloaded wall
time); "solves" counts the assignment steps actually solved (a group none of whose neighbours moved since
its last solve is skipped, its answer cannot change). ``--dtype float32`` halves the
cost-matrix time on a CPU; the default float64 is what the API uses. Times are only reported.

    python bench/align.py                          # both models on the CPU
    python bench/align.py --models vgg16 --device cuda --json align_gpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from modeconn.align import weight_matching  # noqa: E402
from modeconn.models import build  # noqa: E402
from modeconn.units import infer  # noqa: E402

MODELS = {"vgg16": dict(name="vgg16", batch_norm=True), "preresnet164": dict(name="preresnet164")}


def random_state(model: torch.nn.Module, seed: int) -> dict:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if "running_mean" in k:
            state[k] = torch.randn(v.shape, generator=gen) * 0.1
        elif "running_var" in k:
            state[k] = torch.rand(v.shape, generator=gen) + 0.5
    return {k: v.clone() for k, v in state.items()}


def bench(name: str, device: str, dtype: torch.dtype) -> dict:
    opts = dict(MODELS[name])
    model = build(opts.pop("name"), (3, 32, 32), 10, **opts).eval()
    t0 = time.perf_counter()
    spec = infer(model, torch.zeros(2, 3, 32, 32))
    infer_s = time.perf_counter() - t0
    theta_a, theta_b = random_state(model, 0), random_state(model, 1)
    if device.startswith("cuda"):
        weight_matching(model, theta_a, theta_b, spec=spec, max_iter=1, device=device, dtype=dtype)  # warm-up
        torch.cuda.synchronize()
    cpu0 = time.process_time()
    al = weight_matching(model, theta_a, theta_b, spec=spec, device=device, dtype=dtype)
    cpu_s = time.process_time() - cpu0
    info = al.info
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "groups": len(spec.groups),
            "largest_group": max(g.size for g in spec.groups), "infer_s": infer_s, "match_s": al.seconds,
            "cpu_s": cpu_s, "sweeps": info["sweeps"], "solves": info["solves"], "converged": info["converged"], "cost_s": info["cost_seconds"],
            "assign_s": info["assign_seconds"],
            "other_s": al.seconds - info["cost_seconds"] - info["assign_seconds"],
            "objective": [al.objective[0], al.objective[-1]], "device": device, "dtype": str(dtype)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"# weight matching, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, {args.dtype}")
    print("| model | params | groups | largest | infer s | match s | CPU s | sweeps | solves | cost matrices s "
          "| assignments s | other s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        r = bench(name, args.device, dtype)
        rows.append(r)
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['groups']} | {r['largest_group']} | {r['infer_s']:.2f} | "
              f"{r['match_s']:.2f} | {r['cpu_s']:.1f} | {r['sweeps']} | {r['solves']} | {r['cost_s']:.2f} | {r['assign_s']:.2f} | {r['other_s']:.2f} |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
