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
