import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modeconn.io.checkpoint import (
    CheckpointMismatchError,
    UnreadableFileError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    describe_mismatch,
    fingerprint,
    load_checkpoint,
    read_meta,
    safe_load,
    save_checkpoint,
    sidecar_path,
)


def mlp(width=8, inp=4, out=3, bn=True):
    layers = [nn.Linear(inp, width)]
    if bn:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(), nn.Linear(width, out)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_includes_buffers_and_num_batches_tracked():
    fp = fingerprint(mlp())
    assert set(fp) == {"digest", "shapes"}
    assert fp["shapes"]["0.weight"] == [8, 4]
    assert fp["shapes"]["1.running_mean"] == [8]
    assert fp["shapes"]["1.num_batches_tracked"] == []
    assert isinstance(fp["digest"], str) and len(fp["digest"]) == 16
    int(fp["digest"], 16)


def test_fingerprint_parameter_only_and_keys():
    model = mlp()
    params = fingerprint(model, parameters_only=True)
    assert "1.running_mean" not in params["shapes"]
    assert "1.num_batches_tracked" not in params["shapes"]
    assert set(params["shapes"]) == {n for n, _ in model.named_parameters()}
    # the same restriction works on a state dict through keys=
    names = [n for n, _ in model.named_parameters()]
    assert fingerprint(model.state_dict(), keys=names) == params
    assert params["digest"] != fingerprint(model)["digest"]


def test_fingerprint_same_arch_same_digest_and_order_independent():
    a, b = mlp(), mlp()
    with torch.no_grad():
        b[0].weight.add_(1.0)  # values do not matter
    assert fingerprint(a) == fingerprint(b)
    reordered = dict(reversed(list(a.state_dict().items())))
    assert fingerprint(reordered)["digest"] == fingerprint(a)["digest"]
    assert fingerprint(mlp(width=9))["digest"] != fingerprint(a)["digest"]
    # a fingerprint is accepted too (e.g. read back from a sidecar)
    assert fingerprint(json.loads(json.dumps(fingerprint(a)))) == fingerprint(a)


def test_describe_mismatch_lists_missing_unexpected_and_shapes():
    expected = fingerprint(mlp(width=8))
    got = fingerprint(mlp(width=16, bn=False))
    msg = describe_mismatch(expected, got)
    assert "missing" in msg and "1.running_mean" in msg and "1.num_batches_tracked" in msg
    assert "2 unexpected key(s): 2.weight, 2.bias" in msg
    assert "7 missing key(s)" in msg and "(2 more)" in msg
    assert "shape difference" in msg
    assert "0.weight expected [8, 4], got [16, 4]" in msg
    assert describe_mismatch(expected, fingerprint(mlp(width=8))) == ""


def test_describe_mismatch_truncates_long_lists():
    exp = {"digest": "x", "shapes": {f"w{i}": [i + 1] for i in range(20)}}
    got = {"digest": "y", "shapes": {f"w{i}": [i + 2] for i in range(20)}}
    msg = describe_mismatch(exp, got, limit=3)
    assert "20 shape difference(s)" in msg
    assert "w2 expected" in msg and "w3 expected" not in msg
    assert "17 more" in msg


# --------------------------------------------------------------------------- atomic writes


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"abc")
    atomic_write_json(tmp_path / "b.json", {"x": 1, "p": Path("/tmp/q"), "t": torch.tensor(2.5)})
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "sub" / "c.pt")
    atomic_write_bytes(tmp_path / "a.bin", b"defg")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json", "sub"]
    assert os.listdir(tmp_path / "sub") == ["c.pt"]
    assert (tmp_path / "a.bin").read_bytes() == b"defg"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1, "p": "/tmp/q", "t": 2.5}
    assert torch.equal(torch.load(tmp_path / "sub" / "c.pt", weights_only=True)["w"], torch.ones(2))


def test_failed_atomic_write_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "c.pt"
    atomic_torch_save({"w": torch.zeros(3)}, target)
    with pytest.raises(Exception):
        atomic_torch_save({"f": lambda: 0}, target)  # lambdas cannot be pickled
    assert os.listdir(tmp_path) == ["c.pt"]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(3))
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "d.json", {"obj": object()})
    assert os.listdir(tmp_path) == ["c.pt"]


# --------------------------------------------------------------------------- checkpoints


def test_save_and_load_roundtrip(tmp_path):
    model = mlp()
    path = tmp_path / "run" / "model.pt"
    save_checkpoint(path, model.state_dict(), {"seed": 3, "note": "hi"})
    assert sidecar_path(path) == tmp_path / "run" / "model.json"
    assert sorted(os.listdir(path.parent)) == ["model.json", "model.pt"]
    side = json.loads(sidecar_path(path).read_text())
    assert side["seed"] == 3 and side["note"] == "hi"
    assert side["fingerprint"] == fingerprint(model)
    assert read_meta(path) == side

    state, meta = load_checkpoint(path, model=mlp())
    assert meta == side
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
        assert state[k].device.type == "cpu"


def test_load_without_sidecar_gives_empty_meta(tmp_path):
    path = tmp_path / "w.pt"
    atomic_torch_save(mlp().state_dict(), path)
    state, meta = load_checkpoint(path)
    assert meta == {} and "0.weight" in state
    assert read_meta(path) is None


def test_load_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(path)


def test_load_with_wrong_model_raises_mismatch(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, mlp(width=8).state_dict(), {})
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(path, model=mlp(width=5))
    msg = str(err.value)
    assert str(path) in msg
    assert "different architecture than the config's model" in msg
    assert "0.weight expected [5, 4], got [8, 4]" in msg
    assert isinstance(err.value, ValueError)
    # buffers count: a model without BatchNorm does not fit either
    with pytest.raises(CheckpointMismatchError, match="unexpected key"):
        load_checkpoint(path, model=mlp(width=8, bn=False))


def test_load_rejects_pickled_objects(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model": mlp()}, path)  # a whole module, not a state dict
    with pytest.raises(UnreadableFileError, match="bad.pt holds Python objects .*could run code"):
        load_checkpoint(path)


def _damaged(tmp_path) -> dict:
    good = tmp_path / "good.pt"
    torch.save(mlp().state_dict(), good)
    raw = good.read_bytes()
    flipped = bytearray(raw)
    flipped[200:400] = bytes(b ^ 0xFF for b in flipped[200:400])
    files = {"empty": b"", "truncated": raw[: len(raw) // 2], "random bytes": os.urandom(2000),
             "text": b"hello, not weights\n", "corrupt inside": bytes(flipped),
             "plain pickle": pickle.dumps({"w": [1, 2]})}
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / (name.replace(" ", "_") + ".pt")
        out[name].write_bytes(data)
    return out


EXPECTED = {"empty": "is empty", "truncated": "is truncated or corrupt", "random bytes": "is not a PyTorch file",
            "text": "is not a PyTorch file", "corrupt inside": "is truncated or corrupt",
            "plain pickle": "plain Python pickle"}


def test_safe_load_names_the_file_and_what_is_wrong_with_it(tmp_path):
    for name, path in _damaged(tmp_path).items():
        with pytest.raises(UnreadableFileError) as err:
            safe_load(path, "resume file", restart_hint=True)
        msg = str(err.value)
        assert msg.startswith(f"resume file {path} ") and EXPECTED[name] in msg, (name, msg)
        assert f"delete {path} to start that step over" in msg
        assert "weights_only" not in msg and "\n" not in msg, (name, msg)
    with pytest.raises(UnreadableFileError, match="curve checkpoint not found: .*nope.pt") as err:
        safe_load(tmp_path / "nope.pt", "curve checkpoint")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    with pytest.raises(UnreadableFileError, match="is not a file"):
        safe_load(tmp_path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_safe_load_refuses_a_payload_without_running_it(tmp_path, legacy):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (open, (os.fspath(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"state": Payload()}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnreadableFileError, match="evil.pt holds Python objects .*(io.open).*could run code"):
        safe_load(path)
    assert not marker.exists()


def test_safe_load_reads_weights_and_plain_containers(tmp_path):
    path = tmp_path / "ok.pt"
    obj = {"format": 1, "t": torch.arange(3.0), "nested": [{"a": 1.5, "b": "x"}], "none": None}
    torch.save(obj, path)
    back = safe_load(path)
    assert back["nested"] == obj["nested"] and torch.equal(back["t"], obj["t"]) and back["none"] is None


def test_json_files_are_strict_json(tmp_path):
    path = tmp_path / "x.json"
    nan, inf = float("nan"), float("inf")
    atomic_write_json(path, {"a": nan, "b": [1.0, inf, (-inf, 2)], "t": torch.tensor([nan, 1.0]),
                             "s": torch.tensor(inf), "n": np.float64(nan), "arr": np.array([1.0, np.nan]),
                             "deep": {"x": {"y": [nan]}}, "ok": 0.5, "flag": True})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    assert back == {"a": None, "b": [1.0, None, [None, 2]], "t": [None, 1.0], "s": None, "n": None,
                    "arr": [1.0, None], "deep": {"x": {"y": [None]}}, "ok": 0.5, "flag": True}


def test_save_checkpoint_moves_tensors_to_cpu_and_copies(tmp_path):
    big = torch.arange(10.0)
    state = {"w": big[2:4]}  # a view of a larger storage
    save_checkpoint(tmp_path / "v.pt", state, {})
    loaded, _ = load_checkpoint(tmp_path / "v.pt")
    assert torch.equal(loaded["w"], torch.tensor([2.0, 3.0]))
    assert loaded["w"].untyped_storage().nbytes() == 2 * 4


@pytest.mark.parametrize("content, words", [(b"{not json", "is not valid JSON"), (b"\xff\xfe\x00garbage", "is not text"),
                                            (b"[1, 2]", "holds a JSON list, not an object")])
def test_a_damaged_sidecar_is_named_with_what_to_delete(tmp_path, content, words):
    path = tmp_path / "model.pt"
    save_checkpoint(path, mlp().state_dict(), {})
    sidecar_path(path).write_bytes(content)
    with pytest.raises(UnreadableFileError) as err:
        read_meta(path)
    msg = str(err.value)
    assert f"checkpoint sidecar {sidecar_path(path)} {words}" in msg and "delete it and model.pt" in msg
