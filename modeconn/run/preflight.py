"""The checks a run makes before it writes anything or trains: what identifies its endpoints, whether the
endpoint files already in the run directory belong to this configuration, whether its other intermediate
files (``work/``, ``figure2/``) do (:func:`check_run_identity`), whether each selected path can apply to the
model.

An endpoint's *identity* is everything that determines its weights: the seed, the trainer settings
(:func:`modeconn.training.train.train` adds those), the model's options, the data's options and a digest
of its training split, and, unless ``allow_provenance_change=true``, the CPU thread count, the device type
and the torch version. A finished endpoint or a resume file made under another identity is refused with a
message naming the first differing key, before the run directory is touched.
"""
from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from pathlib import Path as FilePath
from typing import Any

import torch
from torch import nn

from modeconn.data import Dataset, example_input
from modeconn.io.options import ConfigError, to_container

__all__ = ["endpoint_identity", "data_digest", "check_endpoint_files", "check_trained_files", "run_identity",
           "check_run_identity", "check_work_files", "check_paths_apply", "IDENTITY_FILE"]

DATA_KEYS_IGNORED = ("root", "download")  # where the data is found, not what it is (its digest says that)
IDENTITY_FILE = "identity.json"  # the run identity its intermediate files were made under
PROVENANCE_KEYS = ("threads", "device", "torch")  # compared through provenance.json (allow_provenance_change)


def _flat(prefix: str, node: Any) -> dict:
    if isinstance(node, Mapping):
        return {k: v for key, value in node.items() for k, v in _flat(f"{prefix}.{key}", value).items()}
    return {prefix: list(node) if isinstance(node, tuple) else node}


def data_digest(data: Dataset) -> str:
    """A short sha256 of the training split (inputs and labels, as stored): equal data, equal digest."""
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train):
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def endpoint_identity(cfg, data: Dataset, device: torch.device) -> dict:
    """Plain values (dotted keys, JSON-safe) that, with the seed and trainer settings, determine an endpoint."""
    model = to_container(cfg.model)
    options = {k: v for k, v in to_container(cfg.data).items() if k not in DATA_KEYS_IGNORED}
    out = {**_flat("model", model), **_flat("data", options), "data.train_sha256": data_digest(data),
           "data.augment": bool(data.augment)}
    if not cfg.get("allow_provenance_change", False):
        out.update({"threads": torch.get_num_threads(), "device": device.type, "torch": str(torch.__version__)})
    return out


def check_endpoint_files(cfg, data: Dataset, out_dir: FilePath, device: torch.device, build) -> dict:
    """Refuse (``ValueError`` naming the file and the first differing key) endpoint checkpoints or resume
    files in ``out_dir/endpoints`` made by another configuration; nothing is written or trained.
    ``build(seed)`` makes the untrained model of that seed. Returns the identity to train with."""
    seeds = (2 * cfg.seed, 2 * cfg.seed + 1)
    return check_trained_files(cfg, data, {s: out_dir / "endpoints" / f"seed{s}.pt" for s in seeds}, device, build)


def check_trained_files(cfg, data: Dataset, files: Mapping[int, FilePath], device: torch.device, build) -> dict:
    """:func:`check_endpoint_files` for any nets the config trains: ``files`` maps a seed to its checkpoint
    (the endpoints; a landscape's minima). Returns the identity to train them with."""
    from modeconn.training.train import TrainConfig, check_reusable

    identity = endpoint_identity(cfg, data, device)
    tcfg = TrainConfig(**to_container(cfg.trainer), device=str(device))
    for seed, file in files.items():
        file = FilePath(file)
        if file.exists() or FilePath(f"{file}.resume.pt").exists() or file.with_suffix(".json").exists():
            check_reusable(build(seed), tcfg, seed, file, identity)
    return identity


def run_identity(cfg, endpoint: Mapping, given: list[dict] | None) -> dict:
    """What the run's intermediate files (curves, chains, the narrow net in ``work/``, Figure 2's nets) depend on,
    as flat dotted keys: the ``endpoint`` identity (:func:`endpoint_identity`), the seed, the trainer,
    ``eval.max_items``, the given endpoint files' sha256 (``endpoints``), ``align.*``, ``stability.figure2.*``
    and every selected path's options."""
    from modeconn.io.runrecord import sha256

    values = to_container(cfg)
    figure2 = (values.get("stability") or {}).get("figure2")
    out = {**endpoint, "seed": values["seed"], **_flat("trainer", values["trainer"]),
           "eval.max_items": values["eval"].get("max_items"),
           "endpoints": None if given is None else [sha256(e["file"]) for e in given],
           **_flat("align", values.get("align") or {}),
           **(_flat("stability.figure2", figure2) if figure2 else {"stability.figure2": None})}
    for name, options in values["path"].items():
        out.update(_flat(f"path.{name}", options) if options else {f"path.{name}": None})
    return out


def _files_under(folder: FilePath, prefix: str = "") -> bool:
    return folder.is_dir() and any(p.is_file() and p.name.startswith(prefix) for p in folder.rglob("*"))


def _made(out_dir: FilePath, names: set[str]) -> set[str]:
    """Which intermediate files ``out_dir`` holds: ``"*"`` (any), ``"aligned"``, ``"figure2"``, the names of the
    paths with files in ``work/``, and ``"eval.max_items"`` when one of those paths takes ``max_items``."""
    from modeconn.paths.registry import BUILDERS

    work = out_dir / "work"
    made = {n for n in names if _files_under(work, f"{n}.")}
    made |= {"aligned"} if _files_under(work / "aligned") else set()
    made |= {"figure2"} if _files_under(out_dir / "figure2") else set()
    made |= {"*"} if made or _files_under(work) else set()
    if any(n in BUILDERS and "max_items" in inspect.signature(BUILDERS[n].function).parameters for n in made):
        made.add("eval.max_items")
    return made


def _scope(key: str) -> str:
    """Which intermediate files ``key`` determines (a :func:`_made` name)."""
    if key.startswith("path."):
        return key.split(".")[1]
    if key.startswith("align"):
        return "aligned"
    if key.startswith("stability.figure2"):
        return "figure2"
    return "eval.max_items" if key == "eval.max_items" else "*"


def _flat_width(saved: Mapping) -> tuple[str, Any] | None:
    """A curve's or AutoNEB chain's points as saved: (entry, tensor ``[points, parameters]``), else None."""
    state = saved.get("state")
    if isinstance(state, Mapping) and set(state) == {"free"}:
        return "state.free", state["free"]
    return ("pivots", saved["pivots"]) if "pivots" in saved else None


def check_work_files(out_dir: FilePath, model: nn.Module | None = None) -> None:
    """Every checkpoint already in ``work/`` and ``figure2/`` loads weights-only, its sidecar (if any) reads, and a
    resume file (a mapping with a ``format``) has the entries its format needs (a curve's or chain's points as
    wide as ``model``'s parameters); else one error naming the file (and that deleting it starts that step
    over), before anything is written."""
    from modeconn.io.checkpoint import read_meta, safe_load
    from modeconn.io.jsonfile import UnreadableFileError, check_shape
    from modeconn.paths.autoneb import CHECKPOINT_FORMAT as AUTONEB_FORMAT, RESUME_SHAPE as AUTONEB_SHAPE, chain_problem
    from modeconn.training.loop import LOOP_SHAPE

    folders = [f for f in (out_dir / "work", out_dir / "figure2") if f.is_dir()]
    for file in sorted(p for folder in folders for p in folder.rglob("*.pt") if p.is_file()):
        saved = safe_load(file, what="checkpoint", restart_hint=True)
        read_meta(file)
        if isinstance(saved, Mapping) and isinstance(saved.get("format"), str):
            problem = check_shape(dict(saved), AUTONEB_SHAPE if saved["format"] == AUTONEB_FORMAT else LOOP_SHAPE)
            flat = None if problem or model is None else _flat_width(saved)
            width = sum(p.numel() for p in model.parameters()) if flat is not None else None
            if flat is not None and not (flat[1].dim() == 2 and flat[1].shape[1] == width):
                problem = f"{flat[0]} is {list(flat[1].shape)}, not [points, {width}] for the model's parameters"
            if not problem and saved["format"] == AUTONEB_FORMAT:
                problem = chain_problem(saved)
        elif isinstance(saved, Mapping) and all(torch.is_tensor(v) for v in saved.values()):
            problem = None  # a trained net's weights (its sidecar says whether it is finished)
        else:
            problem = f"it holds a {type(saved).__name__}, neither weights nor a modeconn resume file"
        if problem:
            raise UnreadableFileError(f"resume file {file} has the wrong shape ({problem}); delete {file} to "
                                      "start that step over")


def check_run_identity(cfg, out_dir: FilePath, identity: dict) -> dict:
    """Refuse (:class:`ConfigError` naming the first differing key) to continue an interrupted run whose
    intermediate files were made under another :func:`run_identity`: the model, data, seed, trainer or given
    endpoint files when ``work/`` or ``figure2/`` holds files; a selected path's options when ``work/`` holds
    files of that path; ``align.*`` for ``work/aligned/``, ``stability.figure2.*`` for ``figure2/``. Nothing is
    written. Returns the identity to record (the entries of paths not selected now whose files remain stay)."""
    from modeconn.io.jsonfile import read_json

    file = out_dir / IDENTITY_FILE
    if not file.exists():
        return identity
    stored = read_json(file, "run identity", hint="delete it to start the run's intermediate steps over")
    made = _made(out_dir, {k.split(".")[1] for k in {*stored, *identity} if k.startswith("path.")})
    selected = set(cfg.path)
    keys = [k for k in {**identity, **stored} if k not in PROVENANCE_KEYS and _scope(k) in made
            and (not k.startswith("path.") or _scope(k) in selected)]
    diffs = [f"{k}: {stored.get(k)!r} vs {identity.get(k)!r}" for k in keys if stored.get(k) != identity.get(k)]
    if diffs:
        raise ConfigError(f"{out_dir}: this interrupted run's intermediate files (work/, figure2/) were made under "
                          f"another configuration (first difference: {diffs[0].split(':')[0]}; {'; '.join(diffs[:4])}; "
                          "saved vs requested); rerun with the same settings, choose a new run directory, or delete "
                          "those files to start their steps over")
    kept = {k: v for k, v in stored.items()
            if k.startswith("path.") and _scope(k) not in selected and _scope(k) in made}
    return {**identity, **kept}


def check_paths_apply(cfg, model: nn.Module, data: Dataset, device: torch.device) -> None:
    """Refuse a selected path that cannot apply to the model (the Kuditipudi et al. constructions on a model
    without hidden units, or with residual connections), before the endpoints are trained."""
    from modeconn.kuditipudi.chain import Chain
    from modeconn.paths.registry import BUILDERS
    from modeconn.units import infer

    needing = [name for name in cfg.path if getattr(BUILDERS.get(name), "needs_chain", False)]
    if not needing:
        return
    try:
        Chain.from_spec(infer(model, example_input(data).to(device)))
    except ValueError as e:  # UnsupportedArchitectureError, UnsupportedLayerError
        raise ConfigError(f"path.{needing[0]} cannot apply to model {cfg.model.get('name') or 'the model'}: {e}; "
                          f"drop it (e.g. '~path.{needing[0]}') or choose another model") from None
