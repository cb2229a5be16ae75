"""Sweep: curve-training defaults against the reference scheme over architectures, weight decays and seeds.

For every architecture (``--archs``: an MLP, a ConvFC-like conv net without BatchNorm, VGG-11-BN, a small
ViT-like transformer written here), weight decay (``--wds``), endpoint pair (``--pairs``, endpoints seeds
2i and 2i + 1, trained ``--endpoint-epochs`` with SGD at the same weight decay) and curve seed
(``--curve-seeds``), it fits a quadratic Bezier curve (3 bends, fixed ends, batch ``--batch-size``) with
each scheme of ``--schemes`` at each budget of ``--budgets`` (the ``garipov`` schedule sized to the budget)
and scores it with one scorer: the train NLL on all training items at ``--num-points`` uniform t, the
epsilon barrier max_t L(t) - max(L(0), L(1)). Schemes:

* ``reference``: Garipov et al.'s scheme: lr 0.015, one t ~ U(0, 1) per batch, bends initialised on the
  line (``t_sequence="random", t_density="uniform", init="line"``);
* ``defaults``: ``fit_curve``'s defaults as they are now (nothing passed);
* ``recipe@LR``: golden / bends-weighted t, scaled bends at a fixed learning rate LR; ``recipe@auto``: the
  same with ``lr="auto"`` (modeconn/paths/curve_lr.py), scored as the probe's choice ``recipe@<lr>`` (the
  training after the probe is bit for bit that one) with the probe's seconds added to the wall time.

Data: scikit-learn's digits (1437 train items), 1x8x8 (MLP, transformer) or bilinearly upsampled to 1x16x16
(conv nets). ``convfc_wide`` and ``convfc_garipov`` (not run by default) are Garipov et al.'s ConvFC at its own widths on
1x16x16 (1.4M parameters) and on digits upsampled to 3x32x32 (2.4M, the issue's case). It prints, per architecture, weight decay, budget and scheme, the mean ± std of the barrier over
pairs x curve seeds and the mean seconds per curve epoch (wall time of the epochs, plus a scheme's own lr
choice, if any, spread over its epochs), and the table in Markdown. Everything is cached under ``--work``
(endpoint checkpoints, one JSON line per scored curve), so a rerun or a new scheme only fits what is missing.

    nice .venv/bin/python bench/curve_defaults.py --work /tmp/curve_sweep
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from modeconn import data as D  # noqa: E402
from modeconn import models  # noqa: E402
from modeconn.evaluation.evaluate import evaluate_path  # noqa: E402
from modeconn.paths.curve_fit import fit_curve  # noqa: E402
from modeconn.training.train import TrainConfig, train  # noqa: E402

ARCHS = ("mlp", "convfc", "vgg11_bn", "vit", "convfc_wide", "convfc_garipov")
REFERENCE = {"lr": 0.015, "t_sequence": "random", "t_density": "uniform", "init": "line"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS[:4]), choices=ARCHS)
    p.add_argument("--wds", nargs="+", type=float, default=[1e-4, 5e-4])
    p.add_argument("--pairs", type=int, default=2, help="endpoint pairs (seeds 2i, 2i + 1)")
    p.add_argument("--curve-seeds", type=int, default=2, help="curve seeds per pair (0..N-1)")
    p.add_argument("--budgets", nargs="+", type=int, default=[5, 10, 20])
    p.add_argument("--schemes", nargs="+", default=["reference", "defaults"])
    p.add_argument("--endpoint-epochs", type=int, default=40)
    p.add_argument("--endpoint-lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-points", type=int, default=61)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/curve_sweep", help="cache folder (endpoints, scored curves)")
    p.add_argument("--markdown", default=None, help="also write the Markdown table to this file")
    return p.parse_args(argv)


class TinyViT(nn.Module):
    """A ViT-like patch encoder for 1x8x8 images: 2x2 patches -> 16 tokens of width ``dim``, learned positions,
    ``depth`` pre-norm encoder layers (``heads`` heads, MLP 2 x dim, no dropout), mean pool, LayerNorm, linear head."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, patch: int = 2, side: int = 8,
                 classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, (side // patch) ** 2, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        p = self.patch
        x = F.unfold(x, p, stride=p).transpose(1, 2)  # [N, tokens, p*p]
        h = self.encoder(self.embed(x) + self.pos)
        return self.head(self.norm(h.mean(1)))


def convfc(channels=(16, 32, 32), hidden=128, classes=10) -> nn.Module:
    """ConvFC-like for 1x16x16 (Garipov et al.'s ConvFC, narrower): 3 x [conv 3x3, ReLU, max-pool 2], 2 hidden
    linear layers, no BatchNorm."""
    c1, c2, c3 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c3 * 4, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, classes))


def convfc_wide(classes=10, channels=1, flat=128) -> nn.Module:
    """Garipov et al.'s ConvFC at its own widths (conv 5x5 32-64-128, max-pool 3/2, linear 1000-1000) on 1x16x16
    inputs: 1.2M parameters, most in its wide linear layers (the issue's failing case had 2.4M on 3x32x32)."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 128, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(), nn.Linear(flat, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, classes))


def build(arch: str) -> nn.Module:
    if arch == "mlp":
        return models.build("mlp", (1, 8, 8), 10, hidden=(128, 128))
    if arch == "convfc":
        return convfc()
    if arch == "convfc_wide":
        return convfc_wide()
    if arch == "convfc_garipov":  # the case: 3x32x32 inputs, 2.4M parameters
        return convfc_wide(channels=3, flat=1152)
    if arch == "vgg11_bn":
        return models.build("vgg11_bn", (1, 16, 16), 10, width=0.125, fc_width=64, fc_dropout=0.0)
    return TinyViT()


def datasets() -> dict[int, D.Dataset]:
    """Digits as 1x8x8 and upsampled to 1x16x16."""
    ds = D.load("digits", image=True)

    def up(x):
        return F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    def up3(x):
        return F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return {8: ds, 16: dataclasses.replace(ds, x_train=up(ds.x_train), x_test=up(ds.x_test), input_shape=(1, 16, 16)),
            32: dataclasses.replace(ds, x_train=up3(ds.x_train), x_test=up3(ds.x_test), input_shape=(3, 32, 32))}


def side(arch: str) -> int:
    return 32 if arch == "convfc_garipov" else 16 if arch in ("convfc", "convfc_wide", "vgg11_bn") else 8


def scheme_options(scheme: str) -> dict:
    if scheme == "reference":
        return dict(REFERENCE)
    if scheme == "defaults":
        return {}
    if scheme.startswith("recipe@"):
        return {"lr": float(scheme.split("@", 1)[1]), "t_sequence": "golden", "t_density": "bends", "init": "scaled"}
    raise SystemExit(f"unknown scheme {scheme!r}: reference | defaults | recipe@LR")


def scheme_key(scheme: str) -> str:
    """``scheme`` for the cache; ``defaults`` with fit_curve's current default values (they may change)."""
    if scheme == "recipe@auto":
        return "auto"
    if scheme != "defaults":
        return scheme
    params = inspect.signature(fit_curve).parameters
    if (params["lr"].default, params["init"].default, params["t_sequence"].default,
            params["t_density"].default) == ("auto", "scaled", "golden", "bends"):
        return "auto"
    return "defaults:" + ",".join(f"{k}={params[k].default}" for k in ("lr", "init", "t_sequence", "t_density"))


def endpoint(arch: str, wd: float, seed: int, ds: D.Dataset, args) -> tuple[dict, float]:
    """Train (or load the cached) endpoint; returns its state and final train loss."""
    torch.manual_seed(seed)
    model = build(arch)
    cfg = TrainConfig(lr=args.endpoint_lr, weight_decay=wd, epochs=args.endpoint_epochs, batch_size=64,
                      schedule="cosine", device="cpu")
    ckpt = Path(args.work) / f"end_{arch}_wd{wd:g}_s{seed}.pt"
    metrics = train(model, ds, cfg, seed=seed, checkpoint_path=ckpt, progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, float(metrics["train_loss"])


def fit_and_score(arch, ends, ds, scheme, budget, curve_seed, wd, args) -> dict:
    model = build(arch)
    started = time.perf_counter()
    path = fit_curve(model, ends[0], ends[1], ds, epochs=budget, wd=wd, batch_size=args.batch_size,
                     seed=curve_seed, augment=False, device="cpu", progress=False, **scheme_options(scheme))
    wall = time.perf_counter() - started
    ev = evaluate_path(model, path, ds, (ds.x_test[:1], ds.y_test[:1]), num_points=args.num_points,
                       device="cpu", progress=False)
    return {"barrier": ev.barriers["train_loss"]["epsilon"], "epoch_seconds": wall / budget,
            "lr": path.info["settings"]["lr"], "line_start": ev.barriers["train_loss"]["start"]}


def cached(arch, wd, pair, cs, budget, scheme, ends, losses, ds, args, cache, cache_file) -> dict:
    """The scored curve of these settings from the cache, fitted and scored (and cached) if missing."""
    key = f"{arch}|{wd:g}|{pair}|{cs}|{budget}|{scheme_key(scheme)}|{args.batch_size}|{args.num_points}"
    if key not in cache:
        r = fit_and_score(arch, ends, ds, scheme, budget, cs, wd, args)
        cache[key] = {"key": key, "arch": arch, "wd": wd, "pair": pair, "curve_seed": cs, "budget": budget,
                      "scheme": scheme, "end_loss": list(losses), **r}
        with cache_file.open("a") as f:
            f.write(json.dumps(cache[key]) + "\n")
        print(f"  {scheme:>14} {budget:>2} ep seed {cs}: barrier {r['barrier']:.4f} "
              f"(lr {r['lr']:.4g}, {1000 * r['epoch_seconds']:.0f} ms/epoch)", flush=True)
    return cache[key]


def auto_row(arch, wd, pair, cs, budget, ends, losses, ds, args, cache, cache_file, scheme="recipe@auto") -> dict:
    """``lr="auto"``: the probe alone (``epochs=0``; it does not depend on the budget), then the curve of
    ``recipe@<chosen lr>``, which is bit for bit the training that follows the probe (tests/test_curves.py);
    the probe's seconds are added to the epochs' wall time."""
    key = f"probe|{arch}|{wd:g}|{pair}|{cs}|{args.batch_size}"
    if key not in cache:
        model = build(arch)
        path = fit_curve(model, ends[0], ends[1], ds, epochs=0, lr="auto", wd=wd, batch_size=args.batch_size,
                         seed=cs, augment=False, device="cpu", progress=False,
                         **{k: v for k, v in scheme_options("recipe@1").items() if k != "lr"})
        cache[key] = {"key": key, **path.info["lr_probe"]}
        with cache_file.open("a") as f:
            f.write(json.dumps(cache[key]) + "\n")
        print(f"  probe seed {cs}: lr {cache[key]['lr']:g} (scores {cache[key]['scores']}, "
              f"{cache[key]['seconds']:.2f} s)", flush=True)
    probe = cache[key]
    r = dict(cached(arch, wd, pair, cs, budget, f"recipe@{probe['lr']:g}", ends, losses, ds, args, cache, cache_file))
    r.update(scheme=scheme, epoch_seconds=r["epoch_seconds"] + probe["seconds"] / budget)
    return r


def summarize(rows: list[dict], args) -> str:
    lines = ["| architecture | wd | epochs | " + " | ".join(args.schemes) + " |",
             "|---|---|---|" + "---|" * len(args.schemes)]
    for arch in args.archs:
        for wd in args.wds:
            for budget in args.budgets:
                cells = []
                for scheme in args.schemes:
                    got = [r for r in rows if (r["arch"], r["wd"], r["budget"], r["scheme"]) == (arch, wd, budget, scheme)]
                    if not got:
                        cells.append("-")
                        continue
                    b = [r["barrier"] for r in got]
                    sd = statistics.stdev(b) if len(b) > 1 else 0.0
                    s = statistics.mean(r["epoch_seconds"] for r in got)
                    cells.append(f"{statistics.mean(b):.4f} ± {sd:.4f} ({1000 * s:.0f} ms)")
                lines.append(f"| {arch} | {wd:g} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache_file = work / "curves.jsonl"
    cache = {}
    if cache_file.exists():
        for line in cache_file.read_text().splitlines():
            r = json.loads(line)
            cache[r["key"]] = r
    data = datasets()
    rows = []
    for arch in args.archs:
        ds = data[side(arch)]
        for wd in args.wds:
            for pair in range(args.pairs):
                ends, losses = zip(*(endpoint(arch, wd, s, ds, args) for s in (2 * pair, 2 * pair + 1)))
                print(f"{arch} wd {wd:g} pair {pair}: endpoint train loss {losses[0]:.4f} / {losses[1]:.4f}",
                      flush=True)
                for scheme in args.schemes:
                    for budget in args.budgets:
                        for cs in range(args.curve_seeds):
                            if scheme_key(scheme) == "auto":  # the probe, then recipe@(its choice)
                                rows.append(auto_row(arch, wd, pair, cs, budget, ends, losses, ds, args, cache,
                                                     cache_file, scheme))
                                continue
                            rows.append(cached(arch, wd, pair, cs, budget, scheme, ends, losses, ds, args, cache,
                                               cache_file))
    table = summarize(rows, args)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s); barrier mean ± std over "
          f"{args.pairs} pairs x {args.curve_seeds} curve seeds (ms per curve epoch)\n")
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
