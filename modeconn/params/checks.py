"""Input checks at the API's boundaries: each raises a ``ValueError`` that says what is wrong before any
work starts (no training, no path, no evaluation on bad input).

* :func:`first_non_finite` / :func:`require_finite`: NaN or infinite values in a state dict;
* :func:`check_finite_endpoints` / :func:`check_path_losses`: a run's endpoints and its paths' losses;
* :func:`check_compatible`: two state dicts have the same keys and shapes;
* :func:`check_states`: two endpoints (and the model they belong to) agree in keys, shapes and dtypes;
* :func:`check_labels`: class labels are integers in ``[0, num_classes)``;
* :func:`check_model_data`: the model accepts the data's inputs, and its outputs cover the labels;
* :func:`check_times`: an evaluation grid (``num_points`` or explicit ``ts``).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modeconn.data.dataset import Dataset, _is_pair, check_labels

__all__ = ["NonFiniteError", "first_non_finite", "require_finite", "check_finite_endpoints", "check_path_losses",
           "check_compatible", "check_states", "check_labels", "check_model_data", "expected_input", "check_times"]


class NonFiniteError(ValueError):
    """A tensor or a loss that must be finite holds NaN or infinity."""


@contextlib.contextmanager
def _in_eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout, BatchNorm's running statistics), its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------ finiteness

def first_non_finite(state: Mapping[str, Any]) -> str | None:
    """The key of the first floating-point tensor in ``state`` that holds a NaN or an infinity, else None."""
    for key, value in state.items():
        if torch.is_tensor(value) and (value.is_floating_point() or value.is_complex()):
            if not bool(torch.isfinite(value).all()):
                return key
    return None


def require_finite(state: Mapping[str, Any], what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` and the first tensor with NaN or infinite values."""
    key = first_non_finite(state)
    if key is not None:
        value = state[key]
        nans, infs = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
        raise NonFiniteError(f"{what} holds non-finite values: {key!r} has {nans} NaN and {infs} infinite of "
                             f"{value.numel()} entries (first bad tensor); a diverged or damaged network cannot be "
                             "an endpoint")


def _is_bad_number(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


@torch.no_grad()
def check_finite_endpoints(ends: Sequence[Mapping[str, Any]] | None, model: nn.Module, data: Any,
                           items: int = 256) -> None:
    """A run's endpoints (``[{"state", "meta", "file"}]``) are finite before any path is built: their
    parameters and buffers, their recorded losses (``meta["metrics"]``), and their loss on the first
    ``items`` training examples (one forward pass through ``model`` with each state, eval mode). Raises
    :class:`NonFiniteError` naming the file and the first bad tensor or loss."""
    from torch.func import functional_call

    from modeconn.data.dataset import materialize

    for end in ends or []:
        what = f"endpoint {end['file']}"
        require_finite(end["state"], what)
        metrics = (end.get("meta") or {}).get("metrics") or {}
        bad = [f"{k} {v}" for k, v in metrics.items() if k.endswith("loss") and _is_bad_number(v)]
        if bad:
            raise NonFiniteError(f"{what} records non-finite losses ({', '.join(bad)}): it diverged in training")
        param = next(iter(model.parameters()), None)
        x, y = materialize(data, "train", max_items=items, device=param.device if param is not None else None)
        state = {k: v.to(x.device) for k, v in end["state"].items() if torch.is_tensor(v)}
        with _in_eval_mode(model):
            loss = torch.nn.functional.cross_entropy(functional_call(model, state, (x,)).float(), y)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"{what}: its loss on the first {len(y)} training examples is {loss.item()} "
                                 "(finite weights, but the network overflows)")


def check_path_losses(evaluation: Any) -> None:
    """A path evaluation (a :class:`~modeconn.evaluation.evaluate.PathEval`) has a finite loss at every t; else
    :class:`NonFiniteError` naming the path, the split and the first t (the run fails, unrecorded)."""
    for key, values in evaluation.metrics.items():
        if not key.endswith("loss"):
            continue
        for t, v in zip(evaluation.ts, values):
            if v is None or not math.isfinite(v):
                raise NonFiniteError(f"path {evaluation.name}: the {key.replace('_', ' ')} is {v} at t = {t:.6g}; "
                                     "the run failed and is not recorded as finished")


# ------------------------------------------------------------------------------------ endpoints

def _dtype(t: Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _dtype_names(state: Mapping[str, Tensor]) -> str:
    return ", ".join(sorted({_dtype(v) for v in state.values() if torch.is_tensor(v)}))


def check_compatible(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "endpoints") -> None:
    """Raise ``ValueError`` naming the keys or shapes that differ between two state dicts."""
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    shapes = [f"{k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}" for k in a if k in b and a[k].shape != b[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"only in the first: {missing[:5]}")
        if extra:
            parts.append(f"only in the second: {extra[:5]}")
        if shapes:
            parts.append(f"shapes differ: {shapes[:5]}")
        raise ValueError(f"the {what} do not have the same architecture ({'; '.join(parts)})")


def check_states(a: Mapping[str, Any], b: Mapping[str, Any], model: nn.Module | None = None,
                 what: str = "endpoints") -> None:
    """Two endpoint state dicts fit together (and, with ``model``, fit the model): the same keys and shapes,
    floating-point parameters of one dtype per key, no NaN or infinity. Raises ``ValueError`` naming the
    keys, shapes or dtypes that differ.

    Non-floating entries (``num_batches_tracked``) may be integers; the model may hold keys the endpoints
    lack (the endpoints may be parameters only), not the other way round.
    """
    for name, state in (("first", a), ("second", b)):
        if not isinstance(state, Mapping):
            raise TypeError(f"the {name} of the {what} must be a state dict {{name: tensor}}; got {type(state).__name__}")
        if state and not any(torch.is_tensor(v) and v.is_floating_point() for v in state.values()):
            raise ValueError(f"the {name} of the {what} holds no floating-point tensors (dtypes: {_dtype_names(state)}); "
                             "a path needs float parameters: convert them with .float()")
    shared = [k for k in a if k in b and torch.is_tensor(a[k]) and torch.is_tensor(b[k])]
    dtypes = [f"{k}: {_dtype(a[k])} vs {_dtype(b[k])}"
              for k in shared if a[k].dtype != b[k].dtype]
    if dtypes:
        raise ValueError(f"the {what} have different dtypes ({'; '.join(dtypes[:5])}"
                         f"{f', ... ({len(dtypes) - 5} more)' if len(dtypes) > 5 else ''}); convert both to one "
                         "floating dtype (.float() or .double())")
    check_compatible(a, b, what)
    if model is not None:
        own = model.state_dict()
        unknown = [k for k in a if k not in own]
        wrong = [f"{k}: {tuple(a[k].shape)} vs the model's {tuple(own[k].shape)}" for k in a
                 if k in own and torch.is_tensor(a[k]) and a[k].shape != own[k].shape]
        if unknown or wrong:
            detail = "; ".join(([f"keys the model does not have: {unknown[:5]}"] if unknown else [])
                               + ([f"shapes differ: {wrong[:5]}"] if wrong else []))
            raise ValueError(f"the {what} do not fit the model ({detail})")
        mixed = [f"{k}: {_dtype(a[k])} vs the model's {_dtype(own[k])}"
                 for k in a if torch.is_tensor(a[k]) and a[k].is_floating_point() and own[k].is_floating_point()
                 and a[k].dtype != own[k].dtype]
        if mixed:
            raise ValueError(f"the {what} have other dtypes than the model ({'; '.join(mixed[:5])}); convert the "
                             "model or the endpoints so that both use one floating dtype")
    for name, state in (("first", a), ("second", b)):
        require_finite(state, f"the {name} of the {what}")


# ------------------------------------------------------------------------------------ data

def expected_input(model: nn.Module) -> str:
    """What the model's first layer takes, in words (e.g. ``"(N, 64)"`` or ``"(N, 3, H, W)"``)."""
    flattens = False
    for module in model.modules():
        flattens = flattens or isinstance(module, nn.Flatten)
        if isinstance(module, nn.Linear):
            return f"(N, {module.in_features})" + (f", or {module.in_features} values per example in any shape, "
                                                  "flattened" if flattens else "")
        if isinstance(module, nn.modules.conv._ConvNd):
            dims = ", ".join("HWD"[i] for i in range(len(module.kernel_size)))
            return f"(N, {module.in_channels}, {dims})"
    return "another shape"


def _inputs_and_labels(data: Any) -> tuple[Tensor | None, list[Tensor]]:
    """A small input batch and every label tensor of ``data`` that can be read without consuming it."""
    if isinstance(data, Dataset):
        return data.x_train[:2], [data.y_train, data.y_test]
    if _is_pair(data):
        return data[0][:2], [data[1]]
    if isinstance(data, (list, tuple)) and data and all(_is_pair(batch) for batch in data):
        return data[0][0][:2], [batch[1] for batch in data]
    return None, []  # a one-shot iterator is not read ahead: its first batch would be lost to training


@torch.no_grad()
def check_model_data(model: nn.Module, data: Any, what: str = "data") -> None:
    """The model runs on ``data``'s inputs and its outputs cover the labels: one forward pass on two
    examples (eval mode, the model's training flag restored). Raises ``ValueError`` naming the input shape
    the model expects, or the labels' range against the model's number of outputs."""
    x, labels = _inputs_and_labels(data)
    if x is None:
        return
    param = next(iter(model.parameters()), None)
    if param is not None:
        x = x.to(device=param.device)
    try:
        with _in_eval_mode(model):
            out = model(x)
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:  # torch._assert: e.g. a ViT's image size
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what}: inputs of shape (N, {', '.join(map(str, x.shape[1:]))}) do not fit the model, "
                         f"which expects {expected_input(model)} ({reason})") from None
    num_classes = getattr(data, "num_classes", None)
    if torch.is_tensor(out) and out.dim() == 2:
        outputs = int(out.shape[1])
        if num_classes is not None and int(num_classes) != outputs:
            raise ValueError(f"{what}: the data has {num_classes} classes but the model has {outputs} outputs")
        num_classes = outputs
    if num_classes is not None:
        for y in labels:
            check_labels(y, int(num_classes), f"{what}: labels")


# ------------------------------------------------------------------------------------ evaluation grid

def check_times(num_points: Any = None, ts: Sequence[float] | Tensor | None = None) -> None:
    """``num_points`` is an int >= 2 (when ``ts`` is not given); ``ts`` is a non-empty sequence of finite
    times in [0, 1]."""
    if ts is None:
        if isinstance(num_points, bool) or not isinstance(num_points, numbers.Integral) or num_points < 2:
            raise ValueError(f"num_points must be an integer >= 2; got {num_points!r}")
        return
    if isinstance(ts, (str, bytes)) or not isinstance(ts, (Iterable, Tensor)):
        raise ValueError(f"ts must be a sequence of times in [0, 1]; got {ts!r}")
    try:
        values = [float(t) for t in (ts.reshape(-1).tolist() if torch.is_tensor(ts) else ts)]
    except (TypeError, ValueError):
        raise ValueError(f"ts must be a sequence of numbers in [0, 1]; got {ts!r}") from None
    if not values:
        raise ValueError("ts must hold at least one time in [0, 1]; got none")
    bad = [t for t in values if not (math.isfinite(t) and 0.0 <= t <= 1.0)]
    if bad:
        raise ValueError(f"ts must lie in [0, 1]; got {bad[:5]}")
