"""One NEB iteration's model work: loss and gradient of every interior pivot in one vmapped call.

The pivots carry only the model's *parameters* (``named_parameters``), stacked as rows of one ``[Q, D]``
tensor. :class:`ChainStep` runs ``torch.func.vmap(grad_and_value(...))`` of a ``functional_call`` over the
rows: one call computes every interior pivot's train-mode loss and gradient, each on its own batch.
Every pivot, the endpoints included, draws its own minibatch from one shared stream, as the reference does:
with one batch shared by all pivots the chain's gradient noise is common to every pivot, and on Kuditipudi
et al.'s conv net at lr 0.1 (momentum 0.9) three of six seeds of one pair ended with a max pivot loss of
0.19, 0.17 and 0.39 (the reference: 0.03-0.06); with a batch per pivot the same seeds end at 0.037, 0.125
and 0.039 (bench/autoneb_compare.py's pair 1, its compact schedule at N = 10).
Random ops (dropout masks, stochastic depth) are drawn once for all pivots (``randomness="same"``): what
vmap can batch for every model (a random op that draws in place into a new tensor, as torchvision's
StochasticDepth does, cannot differ per pivot), and drawing the masks once instead of once per pivot
halves a dropout MLP's iteration on a CPU. BatchNorm uses each pivot's own batch statistics (every
pivot gets its own copy of the buffers, discarded afterwards: running statistics are no path coordinates).
The endpoints get an eval-mode loss only, with their own buffers.
:func:`chain_force` is the whole iteration but the optimiser's step, on a chain kept in one ``[P, D]`` tensor
whose interior rows are updated in place (no new chain is concatenated per iteration).
:class:`BatchStream` draws the shuffled batches, with a state to save and restore.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from modeconn.data import augment_batch
from modeconn.evaluation.stacked import is_convolutional
from modeconn.paths.neb import nudge, redistributed_interior, spring_gradient, tangents
from modeconn.params.batchnorm import has_batchnorm
from modeconn.params.state import State, float_state


class ChainStep:
    """The model side of a chain between ``theta_a`` and ``theta_b``: flat parameter vectors and the
    batched loss and gradient of the interior pivots."""

    def __init__(self, model: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor],
                 device: torch.device) -> None:
        self.model, self.device = model, device
        self.a, self.b = float_state(theta_a), float_state(theta_b)
        self.names = [n for n, _ in model.named_parameters()]
        missing = [n for n in self.names if n not in self.a]
        if missing:
            raise KeyError(f"the endpoints lack the model's parameters {missing[:5]}: were they saved from this model?")
        dtypes = {self.a[n].dtype for n in self.names}
        if len(dtypes) != 1:
            raise TypeError(f"autoneb needs parameters of one floating dtype; got {sorted(map(str, dtypes))}")
        self.shapes = [self.a[n].shape for n in self.names]
        self.sizes = [self.a[n].numel() for n in self.names]
        self.flat_a, self.flat_b = self.flatten(self.a), self.flatten(self.b)
        self.batchnorm = has_batchnorm(model)
        own = {n: b for n, b in model.named_buffers()}
        self.ends_buffers = [{n: s[n].to(device) if n in s else v.to(device) for n, v in own.items()}
                             for s in (self.a, self.b)]
        self.buffers = {n: v.detach().clone().to(device) for n, v in own.items()}
        self._grad = vmap(grad_and_value(self._loss), in_dims=(0, 0 if self.batchnorm else None, 0, 0),
                          randomness="same")
        # vmap over pivots turns a convolution into a grouped one, which a CPU runs about 2x slower than the
        # same convolutions one pivot at a time (bench/autoneb.py); a GPU batches them
        self.one_by_one = device.type == "cpu" and is_convolutional(model)

    def flatten(self, state: Mapping[str, Tensor]) -> Tensor:
        """A state's parameters as one flat vector ``[D]`` on the step's device."""
        return torch.cat([state[n].detach().reshape(-1) for n in self.names]).to(self.device)

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat vector as views shaped like the model's parameters."""
        return {n: v.view(s) for n, v, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def digest(self) -> str:
        """A sha256 of the endpoints' exact parameters and the parameter layout (identifies a chain)."""
        h = hashlib.sha256(repr(list(zip(self.names, map(tuple, self.shapes)))).encode())
        for flat in (self.flat_a, self.flat_b):
            h.update(flat.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def _loss(self, flat: Tensor, buffers: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(self.model, (self.params(flat), buffers), (x,)), y)

    def interior(self, rows: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Train-mode losses ``[Q]`` and gradients ``[Q, D]`` of the pivots ``rows``, pivot i on the batch
        ``(x[i], y[i])`` (``x`` is ``[Q, batch, ...]``), in one call (a convolutional model on a CPU: one pivot
        after another with the same random draws, see :attr:`one_by_one`)."""
        if len(x) != len(rows) or len(y) != len(rows):
            raise ValueError(f"interior: {len(rows)} pivots need as many batches, got {len(x)} inputs and {len(y)} targets")
        if self.one_by_one:
            state = torch.get_rng_state()
            out = []
            for row, xi, yi in zip(rows, x, y):  # every pivot starts from the same random state: vmap's "same"
                torch.set_rng_state(state)
                out.append(self.one(row, xi, yi))
            return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
        buffers = self.buffers
        if self.batchnorm:  # each pivot normalises by its own batch statistics; the updated copies are dropped
            buffers = {k: v.unsqueeze(0).expand(len(rows), *v.shape).clone() for k, v in buffers.items()}
        was = self.model.training
        self.model.train()
        try:
            grads, losses = self._grad(rows.detach(), buffers, x, y)
        finally:
            self.model.train(was)
        return losses.detach(), grads.detach()

    def one(self, row: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One pivot's train-mode loss and gradient by plain autograd (the one-at-a-time reference)."""
        was = self.model.training
        self.model.train()
        try:
            flat = row.detach().clone().requires_grad_(True)
            buffers = {k: v.clone() for k, v in self.buffers.items()}
            loss = self._loss(flat, buffers, x, y)
            (grad,) = torch.autograd.grad(loss, flat)
        finally:
            self.model.train(was)
        return loss.detach(), grad

    @torch.no_grad()
    def endpoints(self, x: Tensor, y: Tensor) -> Tensor:
        """Eval-mode losses ``[2]`` of the two endpoints, endpoint j on the batch ``(x[j], y[j])`` (their own
        buffers)."""
        was = self.model.training
        self.model.eval()
        try:
            out = [F.cross_entropy(functional_call(self.model, (self.params(f), b), (xj,)), yj)
                   for f, b, xj, yj in zip((self.flat_a, self.flat_b), self.ends_buffers, x, y)]
        finally:
            self.model.train(was)
        return torch.stack(out)

    def state(self, flat: Tensor, t: float) -> State:
        """A full state dict at a pivot: its parameters, and the endpoints' other floating entries
        interpolated at ``t`` (never used by the evaluator for BatchNorm, which recomputes statistics)."""
        out = {n: p.detach().clone().to(self.a[n].device) for n, p in self.params(flat).items()}
        for k in self.a:
            if k not in out:
                out[k] = torch.lerp(self.a[k], self.b[k], t)
        return {k: out[k] for k in self.a}


Interior = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # (rows, x, y) -> (losses, gradients)


def chain_force(step: ChainStep, chain: Tensor, weights: Tensor, x: Tensor, y: Tensor, *, weight_decay: float,
                spring: float | None, tangent: str, interior: Interior | None = None) -> tuple[Tensor, Tensor]:
    """One NEB iteration's force on ``chain`` (``[P, D]``, the endpoints in rows 0 and P-1): with
    ``spring=None`` its interior rows are first redistributed in place (the string method); then every
    interior pivot's loss and gradient, pivot i on the batch ``(x[i], y[i])`` (``x``: ``[P, batch, ...]``,
    endpoints included; ``interior`` replaces :meth:`ChainStep.interior`, e.g. by a loop over pivots),
    plus ``weight_decay * theta``, nudged along the ``tangent`` rule's tangents (the endpoints' eval-mode
    losses enter them), plus a finite ``spring``'s gradient. Returns the interior losses ``[P-2]`` and the
    force ``[P-2, D]`` for the optimiser's step on ``chain[1:-1]``."""
    rows = chain[1:-1]
    if spring is None:
        with torch.no_grad():
            rows.copy_(redistributed_interior(chain, weights))
    loss, grad = (interior or step.interior)(rows, x[1:-1], y[1:-1])
    with torch.no_grad():
        ends = step.endpoints(x[[0, -1]], y[[0, -1]])
        tau = tangents(chain, torch.cat([ends[:1], loss, ends[1:]]), tangent)
        force = nudge(grad.add(rows, alpha=weight_decay) if weight_decay else grad, tau)
        if spring is not None:
            force = force + spring_gradient(chain, tau, weights, spring)
    return loss, force


class BatchStream:
    """Shuffled batches of ``batch_size`` indices into ``n`` examples (epochs without the short last batch;
    the whole set when it is smaller than a batch), drawn from ``generator``; optional augmentation."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.size, self.gen = int(n), min(int(batch_size), int(n)), generator
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def indices(self) -> Tensor:
        if self.pos + self.size > len(self.order):
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        out = self.order[self.pos : self.pos + self.size]
        self.pos += self.size
        return out

    def next(self, x: Tensor, y: Tensor, augment: bool = False) -> tuple[Tensor, Tensor]:
        idx = self.indices().to(x.device)
        xb, yb = x[idx], y[idx]
        return (augment_batch(xb, self.gen) if augment else xb), yb

    def many(self, count: int, x: Tensor, y: Tensor, augment: bool = False) -> tuple[Tensor, Tensor]:
        """``count`` consecutive batches, stacked: ``[count, batch, ...]`` inputs and ``[count, batch]`` targets."""
        batches = [self.next(x, y, augment) for _ in range(count)]
        return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])

    def state(self) -> dict:
        return {"generator": self.gen.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state(self, state: Mapping) -> None:
        self.gen.set_state(state["generator"])
        self.order, self.pos = state["order"].clone(), int(state["pos"])
