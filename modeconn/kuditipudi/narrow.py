"""The narrow network theta* of Theorem 3 (Kuditipudi et al. 2019), inside the wide architecture.

theta* has hidden widths h*_i <= p h_i / 1.5 and is embedded in the wide model (every other unit exactly
zero), so that Lemma 2 can connect it to both endpoints' dropout copies. It is either the wide model
trained with every unit but 0..h*-1 held at zero by gradient masks, or a user's narrow model of the same
architecture, trained and embedded as units 0..h*-1. Training goes through :func:`modeconn.training.train.train`
(checkpointed; a finished checkpoint is reused).
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from modeconn.io.checkpoint import read_meta
from modeconn.data import resolve_device
from modeconn.kuditipudi.chain import Chain
from modeconn.kuditipudi.chain_loss import ChainLoss
from modeconn.kuditipudi.edits import complement
from modeconn.training.loop import global_rng
from modeconn.params.state import State
from modeconn.training.train import TrainConfig, train
from modeconn.units import infer, unit_slices

__all__ = ["narrow_widths", "default_narrow_trainer", "narrow_network", "theta_star", "outside_support", "placement",
           "placed"]


def narrow_widths(sizes: Sequence[int], p: float, width=None) -> list[int]:
    """Theorem 3's narrow widths h*: ``width`` (one int for every hidden layer, or one per layer), or by
    default the largest allowed, ``floor(p * h / 1.5)`` (at least 1). Raises ``ValueError`` unless
    ``1 <= h* <= h`` and ``1.5 * max(h*/h) <= p``."""
    sizes = [int(n) for n in sizes]
    if width is None:
        widths = [max(1, math.floor(p * n / 1.5 + 1e-9)) for n in sizes]
    elif isinstance(width, (int, float)) and not isinstance(width, bool):
        if width != int(width):
            raise ValueError(f"width must be a whole number of units, got {width!r}")
        widths = [int(width)] * len(sizes)
    else:
        widths = [int(w) for w in width]
        if len(widths) != len(sizes):
            raise ValueError(f"width: need one narrow width per hidden layer ({len(sizes)}), got {len(widths)}")
    for h_star, h in zip(widths, sizes):
        if not 1 <= h_star <= h:
            raise ValueError(f"narrow width {h_star} must lie in 1..{h} (hidden widths {sizes})")
    worst = max(1.5 * hs / h for hs, h in zip(widths, sizes))
    if worst > p + 1e-9:
        raise ValueError(
            f"Theorem 3 needs p >= 1.5 * max(h*/h) = {worst:.4g} for narrow widths {widths} in hidden layers "
            f"{sizes} (got p = {p}): the dropout copies must free at least h* units of every layer. "
            "Raise p or lower width.")
    return widths


def default_narrow_trainer() -> TrainConfig:
    """The trainer :func:`narrow_path` uses for theta* by default: SGD (momentum 0.9), lr 0.05, cosine
    schedule, 30 epochs of batch 64, weight decay 1e-4 (on digits, CPU: seconds for the conv nets, about
    half a minute for the default (256, 256) MLP, whose full width the masked training still computes)."""
    return TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, epochs=30, batch_size=64,
                       schedule="cosine")


def _trainer_config(trainer, device: torch.device) -> TrainConfig:
    if trainer is None:
        cfg = default_narrow_trainer()
        cfg.device = str(device)
    elif isinstance(trainer, TrainConfig):
        cfg = copy.deepcopy(trainer)
    elif isinstance(trainer, Mapping):
        d = dict(trainer)
        d.setdefault("device", str(device))
        cfg = TrainConfig.from_dict(d)
    else:
        raise TypeError(f"trainer must be None, a TrainConfig or a mapping of its fields; got {type(trainer).__name__}")
    return cfg.validate()


def _unit_masks(chain: Chain, params: Mapping[str, Tensor], support: Sequence[Tensor]) -> dict[str, Tensor]:
    """Per parameter touched by a hidden group: 1 where every unit axis of the entry is in ``support``."""
    masks: dict[str, Tensor] = {}
    for g, n in enumerate(chain.sizes):
        for ax in (*chain.rows[g], *chain.cols[g]):
            if ax.name not in params:
                continue  # a buffer (BatchNorm statistics): not trained
            t = params[ax.name]
            ind = torch.zeros(t.shape[ax.axis], dtype=t.dtype, device=t.device)
            ind[unit_slices(ax, support[g], n).to(t.device)] = 1
            shape = [1] * t.dim()
            shape[ax.axis] = -1
            masks[ax.name] = masks.get(ax.name, torch.ones_like(t)) * ind.reshape(shape)
    return masks


def outside_support(chain: Chain, state: Mapping[str, Tensor], support: Sequence[Tensor]) -> list[str]:
    """The tensors of ``state`` with a non-zero entry for a unit outside ``support`` (rows or columns)."""
    bad = []
    for g, n in enumerate(chain.sizes):
        rest = complement(support[g], n)
        if not len(rest):
            continue
        for ax in (*chain.rows[g], *chain.cols[g]):
            if ax.name not in state:
                continue
            t = state[ax.name]
            sub = t.index_select(ax.axis, unit_slices(ax, rest, n).to(t.device))
            if sub.numel() and bool((sub != 0).any()):
                bad.append(f"{ax.name} (units of {chain.names[g]!r})")
    return bad


def _embed(wide: Mapping[str, Tensor], narrow: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The narrow state written into the leading entries of every axis of the wide state (zeros elsewhere):
    narrow unit i of every hidden layer becomes wide unit i (blocks of a flatten included, since a unit's
    block is contiguous)."""
    if set(wide) != set(narrow):
        missing, extra = sorted(set(wide) - set(narrow)), sorted(set(narrow) - set(wide))
        raise ValueError(f"narrow_model's state dict keys differ from the model's (missing {missing[:5]}, "
                         f"extra {extra[:5]})")
    out = {}
    for k, w in wide.items():
        t = narrow[k]
        if t.dim() != w.dim() or any(a > b for a, b in zip(t.shape, w.shape)):
            raise ValueError(f"narrow_model's {k!r} has shape {tuple(t.shape)}, which does not fit in the "
                             f"model's {tuple(w.shape)}")
        if t.dim() == 0 or not w.is_floating_point():
            out[k] = t.to(w.device, w.dtype).clone() if t.shape == w.shape else w.clone()
            continue
        z = torch.zeros_like(w)
        z[tuple(slice(0, s) for s in t.shape)] = t.to(w.device, w.dtype)
        out[k] = z
    return out


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()


def _reused(ckpt: str | None, expect: dict) -> bool:
    """Whether ``ckpt`` holds a finished theta* for ``expect``; one made for other widths is refused."""
    saved = read_meta(ckpt) if ckpt is not None else None
    if saved is None or not saved.get("finished"):
        return False
    have = saved.get("narrow")
    if have != expect:
        raise ValueError(f"narrow network checkpoint {ckpt} holds {have}, not the requested {expect}. Use "
                         "another checkpoint_path, or delete the file to retrain.")
    return True


def _train_masked(model: nn.Module, data, widths: list[int], seed: int, cfg: TrainConfig, dev, example: Tensor,
                  problem: ChainLoss, train_args: dict) -> tuple[State, dict]:
    """A copy of the wide model restricted to units 0..h*-1 of every hidden layer, trained.

    Fresh init (reset_parameters under seed), every entry touching another unit zeroed, and those entries'
    gradients masked to zero. With zero gradients SGD (momentum, weight decay) and Adam leave a zero
    parameter at exactly zero, so the other units stay zero throughout - for any activation and with
    BatchNorm."""
    net = copy.deepcopy(model).to(dev)
    with global_rng(int(seed), dev):  # seeded for the initialisation only; the caller's RNG is left alone
        _reset(net)
    chain = Chain.from_spec(infer(net.eval(), example))
    if list(chain.sizes) != list(problem.chain.sizes):
        raise RuntimeError("internal error: the model's hidden layers differ before and after BatchNorm folding")
    support = [torch.arange(h) for h in widths]
    params = dict(net.named_parameters())
    masks = _unit_masks(chain, params, support)
    with torch.no_grad():
        for k, m in masks.items():
            params[k].mul_(m)
        for g in range(chain.depth):  # incoming weights at the fan-in scale of a width-h* layer
            factor = math.sqrt(chain.sizes[g] / widths[g])
            for ax in chain.cols[g]:
                if ax.name in params:
                    params[ax.name].mul_(factor)
    hooks = [params[k].register_hook(lambda grad, m=m: grad * m) for k, m in masks.items()]
    try:
        metrics = train(net, data, cfg, int(seed), **train_args)
    finally:
        for h in hooks:
            h.remove()
    state = {k: v.detach() for k, v in net.state_dict().items()}
    bad = outside_support(chain, {k: v for k, v in state.items() if k in params}, support)
    if bad:
        raise RuntimeError(f"internal error: masked training changed units outside the narrow network: {bad[:3]}")
    return state, metrics


def _train_embedded(model: nn.Module, data, widths: list[int], seed: int, cfg: TrainConfig, dev, example: Tensor,
                    problem: ChainLoss, narrow_model: nn.Module, train_args: dict) -> tuple[State, dict]:
    """The user's narrow model, trained, then embedded as units 0..h*-1 (checked to compute the same
    function)."""
    net = copy.deepcopy(narrow_model).to(dev)
    got = list(Chain.from_spec(infer(net.eval(), example)).sizes)
    if len(got) != len(widths):
        raise ValueError(f"narrow_model has {len(got)} hidden layers, the model {len(widths)}")
    if got != list(widths):
        raise ValueError(f"narrow_model's hidden widths {got} differ from the narrow widths {widths} "
                         "(pass width=None to use the narrow model's, or a matching width)")
    metrics = train(net, data, cfg, int(seed), **train_args)
    net.eval()
    state = _embed(model.state_dict(), net.state_dict())
    wide = copy.deepcopy(model).to(dev).eval()
    wide.load_state_dict(state)
    with torch.no_grad():  # the embedding computes the narrow network's function
        x = problem.x[:64].to(dev)
        want, have = net(x), wide(x)
    if not torch.allclose(want, have, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max()))):
        raise ValueError("narrow_model does not embed in the model as a prefix of every hidden layer (the "
                         "embedded network computes another function): build it with the same architecture "
                         "and smaller hidden widths")
    return state, metrics


def narrow_network(model: nn.Module, data, widths: list[int], seed: int, trainer, narrow_model: nn.Module | None,
                   checkpoint_path, progress: bool, problem: ChainLoss) -> tuple[State, dict]:
    """theta* as a state dict of (the unfolded) ``model``, non-zero only on units 0..h*-1 of every hidden
    layer, and facts about it. Trained with :func:`modeconn.training.train.train` (checkpointed, reused)."""
    cfg = _trainer_config(trainer, problem.device)
    mode = "masked" if narrow_model is None else "narrow_model"
    expect = {"widths": list(widths), "mode": mode}
    ckpt = os.fspath(checkpoint_path) if checkpoint_path is not None else None
    reused = _reused(ckpt, expect)
    dev = resolve_device(cfg.device)  # where the trainer will put the network
    example = problem.x[:2].to(dev)
    meta = {"narrow": expect, "construction": "Kuditipudi et al. 2019, Theorem 3: theta*"}
    train_args = {"checkpoint_path": ckpt, "meta": meta, "progress": progress}
    if narrow_model is None:
        state, metrics = _train_masked(model, data, widths, seed, cfg, dev, example, problem, train_args)
        source = "masked training of the wide model (units 0..h*-1)"
    else:
        state, metrics = _train_embedded(model, data, widths, seed, cfg, dev, example, problem, narrow_model,
                                         train_args)
        source = "narrow_model, trained and embedded (units 0..h*-1)"
    info = {"widths": list(widths), "source": source, "train_metrics": dict(metrics), "trainer": cfg.to_dict(),
            "seed": int(seed), "checkpoint": ckpt, "reused": reused}
    return state, info


def placement(kept_a: Sequence[Tensor], kept_b: Sequence[Tensor], widths: Sequence[int], sizes: Sequence[int]
               ) -> list[Tensor]:
    """Where theta*'s units go: units dropped in theta_B,1 (so the second Lemma 2 needs no permutation),
    those also dropped in theta_A,1 first (so the first needs none where that suffices)."""
    out = []
    for ka, kb, h_star, n in zip(kept_a, kept_b, widths, sizes):
        sa = set(ka.tolist())
        free_b = complement(kb, n).tolist()
        order = [u for u in free_b if u not in sa] + [u for u in free_b if u in sa]
        if len(order) < h_star:
            raise RuntimeError("internal error: too few units dropped in theta_B,1 for the narrow network")
        out.append(torch.tensor(sorted(order[:h_star]), dtype=torch.long))
    return out



def theta_star(model: nn.Module, data, widths: list[int], seed: int, trainer, narrow_model: nn.Module | None,
               checkpoint_path, progress: bool, problem: ChainLoss) -> tuple[State, dict]:
    """theta* in the problem's (BatchNorm-folded) parametrisation, checked to be zero outside units
    0..h*-1, and facts about it (:func:`narrow_network`'s, its loss and support)."""
    raw, info = narrow_network(model, data, widths, seed, trainer, narrow_model, checkpoint_path, progress, problem)
    star = problem.prepare(model, raw)
    support = [torch.arange(h) for h in widths]
    bad = outside_support(problem.chain, star, support)
    if bad:
        raise RuntimeError(f"the narrow network is not zero outside its {widths} units: {bad[:3]}")
    info.update({"loss": problem.loss(star), "support": [s.tolist() for s in support]})
    return star, info


def placed(chain: Chain, star: State, place: Sequence[Tensor]) -> State:
    """pi(theta*): theta*'s units 0..h*-1 moved onto the units ``place`` (an exact permutation of units)."""
    perms = {}
    for g, (P, n) in enumerate(zip(place, chain.sizes)):
        perm = torch.empty(n, dtype=torch.long)
        perm[P] = torch.arange(len(P))
        perm[complement(P, n)] = torch.arange(len(P), n)
        perms[chain.names[g]] = perm
    return chain.spec.permute(star, perms)
