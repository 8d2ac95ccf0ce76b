"""Model directories on disk: ``model.safetensors`` + ``config.json`` + ``state.json``.

Weights are only ever read as safetensors: a pickle (``torch.save``) payload can execute code
when loaded, so anything that is not a well-formed safetensors file is refused with
:class:`CheckpointError`. Every file is written atomically (temp file in the same directory,
fsync, ``os.replace``) so a crash never leaves a half-written file under the final name;
``state.json`` is written last, so its presence marks a complete directory.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"

# A safetensors header is JSON; anything claiming more than this is corrupt, not a real model.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(Exception):
    """A model directory or weights file is missing, malformed, or not safetensors."""


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself; best effort on platforms that cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write bytes to path so readers see either the old file or the complete new one."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)


def _json_bytes(data: dict[str, Any], what: str) -> bytes:
    """Serialise a dict as stable, human-readable JSON, or explain which file could not be."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} must be a dict, got {type(data).__name__}")
    try:
        return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} is not JSON-serialisable: {exc}") from exc


def _prepare_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; storage shared between entries is cloned (safetensors forbids aliasing)."""
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in weights.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"weights must map str to Tensor, got {name!r}: {type(tensor).__name__}")
        if tensor.is_meta:
            raise CheckpointError(f"weight {name!r} is on the meta device and has no data to save")
        t = tensor.detach().cpu().contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in seen_storages:
            t = t.clone()
        elif t.numel():
            seen_storages.add(storage)
        prepared[name] = t
    return prepared


def save_model_dir(
    directory: str | os.PathLike[str],
    weights: dict[str, torch.Tensor],
    config: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write weights, config and state into directory (created if needed); returns the directory path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_bytes = _json_bytes(config, CONFIG_FILE)
    state_bytes = _json_bytes(state, STATE_FILE)
    weights_bytes = save(_prepare_weights(weights), metadata={"format": "pt"})
    _atomic_write(directory / WEIGHTS_FILE, weights_bytes)
    _atomic_write(directory / CONFIG_FILE, config_bytes)
    _atomic_write(directory / STATE_FILE, state_bytes)
    return directory


def _check_safetensors_header(path: Path) -> None:
    """Cheap structural checks that give a clear reason before the safetensors parser runs."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
    if head[:1] == b"\x80":
        raise CheckpointError(f"{path}: file is a pickle (protocol marker 0x80); pickle payloads are refused")
    if head[:2] == b"PK":
        raise CheckpointError(
            f"{path}: file is a zip archive (torch.save format, which wraps a pickle); pickle payloads are refused"
        )
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file (truncated?)")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(
            f"{path}: safetensors header claims {header_len} bytes but the file has {size} "
            "(truncated or not safetensors)"
        )
    if head[8:9] != b"{":
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)")


def load_weights(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file into a name->tensor dict, refusing anything else with CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file does not exist")
    _check_safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt): {exc}") from exc


def _load_json(path: Path) -> dict[str, Any]:
    """Read a JSON object file or raise CheckpointError saying what is wrong with it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (incomplete model directory?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_model_dir(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read (weights, config, state) written by :func:`save_model_dir`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory does not exist")
    state = _load_json(directory / STATE_FILE)
    config = _load_json(directory / CONFIG_FILE)
    weights = load_weights(directory / WEIGHTS_FILE, device=device)
    return weights, config, state
