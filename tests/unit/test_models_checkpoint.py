"""Model directories: safetensors-only weights, atomic writes, clear refusals."""

import os
import pickle

import pytest
import torch

from models.checkpoint import CheckpointError, load_model_dir, load_weights, save_model_dir
from models.dit import PRESETS, build

EXPECTED_FILES = {"model.safetensors", "config.json", "state.json"}


def test_round_trip_preserves_weights_config_and_state(tmp_path):
    model = build(PRESETS["tiny"])
    weights = model.state_dict()
    weights["extra.bf16"] = torch.randn(3, 4).bfloat16()
    config = {"model": PRESETS["tiny"].to_dict(), "text": {"max_tokens": 32}}
    state = {"step": 30, "val_loss": 0.25}

    out = save_model_dir(tmp_path / "run", weights, config, state)
    assert set(os.listdir(out)) == EXPECTED_FILES

    loaded, loaded_config, loaded_state = load_model_dir(out)
    assert loaded.keys() == weights.keys()
    for name, tensor in weights.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    assert loaded_config == config and loaded_state == state

    fresh = build(PRESETS["tiny"])
    del loaded["extra.bf16"]
    fresh.load_state_dict(loaded, strict=True)


def test_overwrite_and_shared_storage(tmp_path):
    base = torch.arange(6.0)
    save_model_dir(tmp_path, {"a": base, "b": base[:3]}, {}, {"n": 1})
    save_model_dir(tmp_path, {"a": base * 2}, {}, {"n": 2})
    weights, _, state = load_model_dir(tmp_path)
    assert state == {"n": 2} and set(weights) == {"a"}
    assert set(os.listdir(tmp_path)) == EXPECTED_FILES


def test_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    with pytest.raises(CheckpointError, match="pickle payloads are refused") as info:
        load_weights(path)
    assert str(path) in str(info.value)


def test_torch_save_zip_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    # Writing with torch.save is fine; it is the loading of such files that is unsafe.
    torch.save({"weight": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="pickle payloads are refused"):
        load_weights(path)


@pytest.mark.parametrize("keep", [4, 20, -5])
def test_truncated_safetensors_is_refused(tmp_path, keep):
    save_model_dir(tmp_path, {"w": torch.randn(16, 16)}, {}, {})
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(path)


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nope.safetensors")
    save_model_dir(tmp_path, {"w": torch.zeros(1)}, {}, {})
    (tmp_path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json"):
        load_model_dir(tmp_path)


def test_failed_save_leaves_no_temp_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        save_model_dir(tmp_path, {"w": torch.zeros(1)}, {"bad": object()}, {})
    save_model_dir(tmp_path, {"w": torch.zeros(1)}, {}, {})
    with pytest.raises(CheckpointError, match="state.json"):
        save_model_dir(tmp_path, {"w": torch.zeros(1)}, {}, {"loss": float("nan")})
    assert set(os.listdir(tmp_path)) == EXPECTED_FILES


# --- training checkpoints (resume) -------------------------------------------------------------

import math  # noqa: E402

from models.checkpoint import (  # noqa: E402
    CHECKPOINT_STATE_FILE,
    CHECKPOINT_TENSORS_FILE,
    checkpoint_name,
    flatten_state,
    latest_training_checkpoint,
    list_training_checkpoints,
    load_training_checkpoint,
    prune_training_checkpoints,
    save_training_checkpoint,
    unflatten_state,
    verify_training_checkpoint,
)


def _state(step: int = 3) -> dict:
    """A Lightning-like checkpoint dict: tensors of several dtypes, int keys, tuples, nan, None."""
    base = torch.arange(12.0)
    return {
        "global_step": step,
        "state_dict": {"w": torch.randn(4, 5), "view": base[2:6], "base": base, "count": torch.tensor(7)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 5).bfloat16()}},
                              "param_groups": [{"betas": (0.9, 0.95), "params": [0], "foreach": None,
                                                "lr": 1e-3, "amsgrad": False}]}],
        "metrics": {"nan": float("nan"), "inf": float("-inf")},
        "lookalike": {"__tensor__": "not a tensor"},  # plain data that looks like a marker
        "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2, 3), None)},
        (1, "tuple-key"): ["mixed", 1, 2.5, True],
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert a == b and type(a) is type(b)


def test_flatten_round_trips_nested_state_without_pickle():
    state = _state()
    skeleton, tensors = flatten_state(state)
    import json

    json.dumps(skeleton, allow_nan=False)  # the skeleton is plain JSON
    assert all(isinstance(t, torch.Tensor) for t in tensors.values()) and len(tensors) == 7
    _assert_same(state, unflatten_state(json.loads(json.dumps(skeleton)), tensors))


def test_flatten_refuses_objects_that_would_need_pickle():
    with pytest.raises(CheckpointError, match=r"'a/b'.*cannot be stored without pickle"):
        flatten_state({"a": {"b": object()}})


def test_training_checkpoint_round_trip_is_atomic_directory(tmp_path):
    state = _state()
    path = save_training_checkpoint(tmp_path / checkpoint_name(3), state)
    assert path.name == "step-00000003"
    assert set(os.listdir(path)) == {CHECKPOINT_TENSORS_FILE, CHECKPOINT_STATE_FILE}
    assert os.listdir(tmp_path) == [path.name]  # no temporaries left behind
    _assert_same(state, load_training_checkpoint(path))
    # Writing the same step again (e.g. over a damaged copy) replaces the directory.
    (path / CHECKPOINT_TENSORS_FILE).write_bytes(b"garbage")
    save_training_checkpoint(path, _state(4))
    assert load_training_checkpoint(path)["global_step"] == 4 and os.listdir(tmp_path) == [path.name]


def test_interrupted_or_damaged_checkpoints_are_skipped_for_the_previous_one(tmp_path):
    for step in (2, 4):
        save_training_checkpoint(tmp_path / checkpoint_name(step), _state(step))
    good = tmp_path / checkpoint_name(4)
    # A kill during a write: the temporary directory (no completion record) never counts...
    temp = tmp_path / ".step-00000006.x1y2.tmp"
    temp.mkdir()
    (temp / CHECKPOINT_TENSORS_FILE).write_bytes((good / CHECKPOINT_TENSORS_FILE).read_bytes())
    # ...nor does a directory without checkpoint.json, one with a truncated tensor file, or a torn one.
    no_record = tmp_path / checkpoint_name(8)
    no_record.mkdir()
    (no_record / CHECKPOINT_TENSORS_FILE).write_bytes((good / CHECKPOINT_TENSORS_FILE).read_bytes())
    truncated = save_training_checkpoint(tmp_path / checkpoint_name(10), _state(10))
    data = (truncated / CHECKPOINT_TENSORS_FILE).read_bytes()
    (truncated / CHECKPOINT_TENSORS_FILE).write_bytes(data[: len(data) // 2])
    torn = save_training_checkpoint(tmp_path / checkpoint_name(12), _state(12))
    data = bytearray((torn / CHECKPOINT_TENSORS_FILE).read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    (torn / CHECKPOINT_TENSORS_FILE).write_bytes(bytes(data))

    assert [p.name for p in list_training_checkpoints(tmp_path)] == [checkpoint_name(s) for s in (2, 4, 8, 10, 12)]
    latest, skipped = latest_training_checkpoint(tmp_path)
    assert latest == good
    reasons = [str(e) for e in skipped]
    assert "sha256" in reasons[0] and "truncated" in reasons[1] and "incomplete checkpoint" in reasons[2]
    assert load_training_checkpoint(latest)["global_step"] == 4
    with pytest.raises(CheckpointError, match=r"step-00000010.*tensors\.safetensors"):
        load_training_checkpoint(truncated)


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_in_a_training_checkpoint_is_refused_naming_the_file(tmp_path, kind):
    from models.resume import SafetensorsCheckpointIO

    path = save_training_checkpoint(tmp_path / checkpoint_name(1), _state(1))
    tensors = path / CHECKPOINT_TENSORS_FILE
    if kind == "pickle":
        tensors.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    else:
        torch.save({"weight": torch.ones(2)}, tensors)
    for load in (verify_training_checkpoint, load_training_checkpoint, SafetensorsCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match="pickle payloads are refused") as info:
            load(path)
        assert str(tensors) in str(info.value)
    assert latest_training_checkpoint(tmp_path)[0] is None


def test_prune_keeps_the_newest_k_and_clears_leftovers(tmp_path):
    for step in (1, 2, 3, 10, 11):
        save_training_checkpoint(tmp_path / checkpoint_name(step), {"global_step": step})
    (tmp_path / ".step-00000012.abc.tmp").mkdir()
    (tmp_path / "key.json").write_text("{}")
    removed = prune_training_checkpoints(tmp_path, keep=2)
    assert len(removed) == 4
    assert sorted(os.listdir(tmp_path)) == ["key.json", "step-00000010", "step-00000011"]
    with pytest.raises(ValueError):
        prune_training_checkpoints(tmp_path, keep=0)


def test_safetensors_whose_header_length_starts_with_the_pickle_byte_loads(tmp_path):
    """Regression: a header of 0x..80 bytes made the first byte 0x80 and the file was refused as a pickle."""
    from safetensors.torch import save_file

    from models.checkpoint import load_weights

    path = tmp_path / "w.safetensors"
    for pad in range(256):
        save_file({"w": torch.ones(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert torch.equal(load_weights(path)["w"], torch.ones(2))
