"""Benchmark: unit-spec inference (``modeconn.units.infer``) on the built-in models at full width and on the
models outside the zoo that tests/test_units.py checks (same definitions), printing for each the number of
groups, the fraction of parameters the spec covers and the inference time (median of ``--repeats`` runs
after one warm-up, float32, CPU, batch of one). Times are only reported, never asserted on.

    python bench/units.py                 # every model, a markdown table
    python bench/units.py --only resnet50 vit
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_units as t  # noqa: E402 - the test models, one definition

from modeconn.models import build  # noqa: E402
from modeconn.units import infer  # noqa: E402


def models():
    cifar = (3, 32, 32)
    for name in ("mlp", "convnet", "vgg11", "vgg16", "vgg16_bn", "preresnet20", "preresnet110", "preresnet164"):
        shape = (1, 8, 8) if name in ("mlp", "convnet") else cifar
        yield name, (lambda n=name, s=shape: build(n, s, 10)), torch.randn(1, *shape)
    for name, make in t.TORCHVISION.items():
        yield f"torchvision {name}", make, torch.randn(1, *cifar)
    yield "nn.TransformerEncoder (2 layers, d=16)", t.Encoder, torch.randn(1, 6, 5)
    yield "GPT-style decoder (2 layers, d=16)", t.GPT, torch.randint(0, 11, (1, 8))
    yield "DenseNet-style block (torch.cat)", t.DenseBlock, torch.randn(1, 3, 6, 6)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="substrings of the model names to run")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"| model | parameters | groups | blocked groups | covered | infer (s) |\n|---|---:|---:|---:|---:|---:|")
    for name, make, x in models():
        if args.only and not any(o in name for o in args.only):
            continue
        model = make().eval()
        infer(model, x)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            spec = infer(model, x)
            times.append(time.perf_counter() - start)
        n = sum(p.numel() for p in model.parameters())
        blocked = sum(g.blocks > 1 for g in spec.groups)
        print(f"| {name} | {n:,} | {len(spec.groups)} | {blocked} | {100 * spec.covered:.2f}% | "
              f"{statistics.median(times):.3f} |", flush=True)


if __name__ == "__main__":
    main()
